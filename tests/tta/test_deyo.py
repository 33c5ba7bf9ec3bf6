"""DeYO (tta/methods/deyo.py, docs/METHODS.md §10.9): the augmentations, PLPD, the weights and
one full step on hand-computed cases and, when a checkout of Jhyun17/DeYO is given
(DEYO_OFFICIAL_SRC = the repository root), the official code."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

import tta
from tests.official import checkout_root
from tta.methods.deyo import deyo_weights, occlude, patch_shuffle, pixel_shuffle, plpd
from tta.methods.entropy import opinion_entropy, softmax_entropy


def inner(adapted):
    return getattr(adapted.method, "method", adapted.method)


def positional_model(num_classes: int = 4, size: int = 8, seed: int = 0, scale: float = 4.0) -> nn.Module:
    """conv-BN-ReLU x2 and a linear layer on the flattened map: the output depends on where
    things are in the image, so shuffling tiles changes the prediction (PLPD > 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Flatten(), nn.Linear(6 * ((size + 1) // 2) ** 2, num_classes),
        )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
        model[-1].weight.mul_(scale)
    return model.eval()


def images(n: int, size: int = 8, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.rand(batch, 3, size, size, generator=generator) * torch.rand(batch, 3, 1, 1, generator=generator) * 3
        for _ in range(n)
    ]


# -- augmentations -------------------------------------------------------------------------------
def test_patch_shuffle_moves_whole_tiles_by_the_generators_permutation() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = patch_shuffle(x, 2, torch.Generator().manual_seed(5))
    order = torch.rand(2, 4, generator=torch.Generator().manual_seed(5)).argsort(1)

    def tiles(img: torch.Tensor) -> list[torch.Tensor]:  # row-major 2 x 2 tiles of a 4 x 4 image
        return [img[0, r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]

    for b in range(2):
        for slot, source in enumerate(order[b].tolist()):
            assert torch.equal(tiles(y[b])[slot], tiles(x[b])[source])
    assert not torch.equal(y, x) or bool((order == torch.arange(4)).all())


def test_patch_shuffle_resizes_sides_that_are_not_multiples() -> None:
    x = torch.rand(3, 2, 10, 7, generator=torch.Generator().manual_seed(0))
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and torch.isfinite(y).all()
    # one tile per side: the resize down and back is all that happens
    z = patch_shuffle(x, 1, torch.Generator())
    assert torch.equal(z, x)
    with pytest.raises(ValueError, match="exceeds"):
        patch_shuffle(x, 11, torch.Generator())


def test_pixel_shuffle_and_occlusion_by_hand() -> None:
    x = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 2, 3)
    y = pixel_shuffle(x, torch.Generator().manual_seed(3))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, x.reshape(2, 2, 6)[:, :, order].reshape(2, 2, 2, 3))  # one order for all
    z = occlude(x, 2, 1, 1)  # rows 1 (clipped at 2), columns 1-2
    mean = x.mean((2, 3))
    expected = x.clone()
    expected[:, :, 1:, 1:] = mean[:, :, None, None]
    assert torch.equal(z, expected) and not torch.equal(z, x)


# -- PLPD, weights, one step ------------------------------------------------------------------------
def test_plpd_and_weights_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    aug = torch.tensor([[0.4, 0.4, 0.2], [0.3, 0.2, 0.5]])
    assert plpd(probs, aug).tolist() == pytest.approx([0.3, 0.4])
    ent = torch.tensor([0.5, 0.9])
    e0 = 0.4 * math.log(3)
    both = deyo_weights(ent, torch.tensor([0.3, 0.4]), e0)
    assert both.tolist() == pytest.approx([math.exp(e0 - 0.5) + math.exp(0.3), math.exp(e0 - 0.9) + math.exp(0.4)])
    assert deyo_weights(ent, torch.tensor([0.3, 0.4]), e0, reweight_plpd=False).tolist() == pytest.approx(
        [math.exp(e0 - 0.5), math.exp(e0 - 0.9)])
    assert deyo_weights(ent, torch.tensor([0.3, 0.4]), e0, False, False).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("loss", ["entropy", "come"])
def test_one_step_by_hand(loss: str) -> None:
    """Filters, augmented view, weights and the SGD update recomputed step by step."""
    model = positional_model(scale=6.0)
    x = images(1)[0]
    lr, threshold = 0.1, 0.25
    adapted = tta.adapt(model, "deyo", optimizer="sgd", lr=lr, sgd_momentum=0.0, plpd_threshold=threshold,
                        loss=loss, seed=7)
    reference = copy.deepcopy(model)
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:  # test-batch statistics, as the method's "norm" layers
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    params = [p for bn in bns for p in (bn.weight, bn.bias)]
    out = reference(x)
    entropy = opinion_entropy(out) if loss == "come" else softmax_entropy(out)
    tau, e0 = 0.5 * math.log(4), 0.4 * math.log(4)
    keep = (entropy < tau).nonzero().squeeze(1)
    x_aug = patch_shuffle(x[keep], 4, torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = plpd(out[keep].softmax(1), reference(x_aug).softmax(1))
    chosen = diff > threshold
    assert 0 < int(chosen.sum()) < keep.numel() < x.shape[0]  # both filters act
    weight = torch.exp(e0 - entropy[keep].detach()) + torch.exp(diff)
    expected_loss = (weight * entropy[keep])[chosen].mean()
    grads = torch.autograd.grad(expected_loss, params)

    prediction = adapted(x)
    torch.testing.assert_close(prediction, out.detach(), rtol=1e-5, atol=1e-5)
    method = inner(adapted)
    assert (int(method.num_reliable), int(method.num_selected)) == (keep.numel(), int(chosen.sum()))
    ours = dict(adapted.model.named_parameters())
    names = [f"{n}.{p}" for n, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")]
    for name, param, grad in zip(names, params, grads):
        torch.testing.assert_close(ours[name].detach(), param.detach() - lr * grad, rtol=1e-5, atol=1e-6)


def test_no_update_when_nothing_passes_and_the_global_rng_is_untouched() -> None:
    model = positional_model()
    xs = images(3)
    adapted = tta.adapt(model, "deyo", optimizer="sgd", lr=0.1, plpd_threshold=1.0)
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    state = torch.random.get_rng_state()
    for x in xs:
        adapted(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    method = inner(adapted)
    assert int(method.num_reliable) > 0 and int(method.num_selected) == 0
    assert all(torch.equal(p, before[n]) for n, p in adapted.model.named_parameters())
    # an entropy filter nothing passes: no augmented forward, no draw from the generator
    strict = tta.adapt(model, "deyo", ent_threshold=1e-9)
    generator_state = inner(strict).generator.get_state()
    strict(xs[0])
    assert int(inner(strict).num_reliable) == 0
    assert torch.equal(inner(strict).generator.get_state(), generator_state)


def test_seeded_wraps_agree_and_seeds_differ() -> None:
    model = positional_model(scale=6.0)
    xs = images(3)
    runs = [tta.adapt(model, "deyo", plpd_threshold=0.0, seed=s) for s in (1, 1, 2)]
    outs = [[run(x) for x in xs] for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(outs[0], outs[2]))


def test_official_exclusions_and_defaults() -> None:
    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
            self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer4(self.layer1(x)).mean((2, 3)))

    method = inner(tta.adapt(Staged(), "deyo"))
    assert method.param_names == ["layer1.1.weight", "layer1.1.bias"]
    assert method.thresholds(10) == pytest.approx((0.5 * math.log(10), 0.4 * math.log(10)))
    hp = method.hparams
    assert (hp.optimizer, hp.lr, hp.plpd_threshold, hp.patch_len, hp.aug, hp.loss) == (
        "adam", 1e-3, 0.2, 4, "patch", "entropy")
    with pytest.raises(ValueError, match="aug"):
        tta.adapt(Staged(), "deyo", aug="rotate")


@pytest.mark.parametrize("aug", ["patch", "pixel", "occ"])
def test_each_augmentation_adapts_a_groupnorm_model(aug: str) -> None:
    from tests.conftest import small_gn_cnn

    model = small_gn_cnn(num_classes=4)
    with torch.no_grad():
        model[-1].weight.mul_(8.0)
    adapted = tta.adapt(model, "deyo", aug=aug, plpd_threshold=-1.0, optimizer="sgd", lr=0.05)
    before = [p.detach().clone() for p in inner(adapted).params]
    for x in images(2):
        assert torch.isfinite(adapted(x)).all()
    assert int(inner(adapted).num_selected) > 0
    assert any(not torch.equal(p, b) for p, b in zip(inner(adapted).params, before))


# -- the official code -----------------------------------------------------------------------------
def _rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """A stand-in for ``einops.rearrange`` (reshape and permute by axis names, groups in
    parentheses), used only when einops is not installed."""

    def parse(side: str) -> list[list[str]]:
        groups, current = [], None
        for token in side.replace("(", " ( ").replace(")", " ) ").split():
            if token == "(":
                current = []
            elif token == ")":
                groups.append(current)
                current = None
            elif current is not None:
                current.append(token)
            else:
                groups.append([token])
        return groups

    left, right = (parse(side) for side in pattern.split("->"))
    known = dict(sizes)
    for group, extent in zip(left, tensor.shape):
        unknown = [a for a in group if a not in known]
        product = math.prod(known[a] for a in group if a in known)
        if unknown:
            known[unknown[0]] = extent // product
    axes = [a for group in left for a in group]
    flat = tensor.reshape([known[a] for a in axes])
    order = [a for group in right for a in group]
    moved = flat.permute([axes.index(a) for a in order])
    return moved.reshape([math.prod(known[a] for a in group) for group in right])


def _official_deyo() -> types.ModuleType:
    root = checkout_root("DEYO_OFFICIAL_SRC")
    stub = None
    if importlib.util.find_spec("einops") is None:  # the official module imports einops
        stub = types.ModuleType("einops")
        stub.rearrange = _rearrange  # type: ignore[attr-defined]
        sys.modules["einops"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_official_deyo", root / "methods" / "deyo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        if stub is not None:
            del sys.modules["einops"]
    return module


def test_the_einops_stand_in_matches_the_patterns_of_the_official_code() -> None:
    x = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    tiles = _rearrange(x, "b c (ps1 h) (ps2 w) -> b (ps1 ps2) c h w", ps1=4, ps2=4)
    assert tiles.shape == (2, 16, 3, 2, 2) and torch.equal(tiles[1, 6, 2], x[1, 2, 2:4, 4:6])
    assert torch.equal(_rearrange(tiles, "b (ps1 ps2) c h w -> b c (ps1 h) (ps2 w)", ps1=4, ps2=4), x)
    flat = _rearrange(x, "b c h w -> b c (h w)")
    assert torch.equal(flat, x.reshape(2, 3, 64))
    assert torch.equal(_rearrange(flat, "b c (ps1 ps2) -> b c ps1 ps2", ps1=8, ps2=8), x)


OFFICIAL_CASES = [
    # (augmentation, optimizer, image size, PLPD threshold)
    ("patch", "sgd", 8, 0.05),
    ("patch", "adam", 8, 0.05),
    ("patch", "sgd", 10, 0.05),  # sides not multiples of 4: resized down and back
    ("pixel", "sgd", 8, 0.2),
    ("occ", "sgd", 8, 0.02),
]


@pytest.mark.official
@pytest.mark.parametrize("aug,optimizer,size,threshold", OFFICIAL_CASES)
def test_matches_official_deyo(aug: str, optimizer: str, size: int, threshold: float) -> None:
    official_module = _official_deyo()
    num_classes, lr, seed = 4, (0.05 if optimizer == "sgd" else 0.01), 11
    source = positional_model(num_classes, size=size, seed=2, scale=6.0)
    xs = images(8, size=size, seed=3)

    net = official_module.configure_model(copy.deepcopy(source))
    params, _ = official_module.collect_params(net)
    if optimizer == "sgd":
        official_optimizer = torch.optim.SGD(params, lr, momentum=0.9)
    else:
        official_optimizer = torch.optim.Adam(params, lr, betas=(0.9, 0.999))
    args = types.SimpleNamespace(
        wandb_log=0, filter_ent=1, filter_plpd=1, reweight_ent=1, reweight_plpd=1, aug_type=aug, patch_len=4,
        plpd_threshold=threshold, occlusion_size=size // 2, row_start=size // 4, column_start=size // 4,
    )
    official = official_module.DeYO(
        net, args, official_optimizer, deyo_margin=0.5 * math.log(num_classes), margin_e0=0.4 * math.log(num_classes))

    ours = tta.adapt(source, "deyo", optimizer=optimizer, lr=lr, sgd_momentum=0.9, nesterov=False, aug=aug,
                     plpd_threshold=threshold, seed=seed)
    worst, counts = 0.0, [0, 0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the official draws come from the global RNG: the same stream
        for step, x in enumerate(xs):
            expected, reliable, selected = official(x, step)
            counts[0] += reliable
            counts[1] += selected
            worst = max(worst, (ours(x) - expected.detach()).abs().max().item())
    ours_params = dict(ours.model.named_parameters())
    param_diff = max((ours_params[n] - p).abs().max().item() for n, p in net.named_parameters())
    method = inner(ours)
    initial = dict(source.named_parameters())
    moved = max((ours_params[n] - initial[n]).abs().max().item() for n in method.param_names)
    print(f"deyo {aug}/{optimizer}/{size}px: max |output diff| {worst:.3g}, |param diff| {param_diff:.3g}, "
          f"moved {moved:.3g}, reliable/selected {(int(method.num_reliable), int(method.num_selected))} vs official {tuple(counts)}")
    assert (int(method.num_reliable), int(method.num_selected)) == tuple(counts)
    assert 0 < counts[1] < counts[0] < 8 * 16  # both filters were active
    assert moved > 1e-3 and worst < 1e-4 and param_diff < 1e-5
