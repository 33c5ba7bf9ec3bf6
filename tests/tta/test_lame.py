"""LAME (docs/METHODS.md §8): the solver against a hand-solved case and an independent
reimplementation of the official stopping rule, the affinities, the guards, the frozen
model, and penultimate features of timm / torchvision / generic classifiers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.features import find_classifier, logits_and_features
from tta.methods.lame import knn_affinity, laplacian_optimization, linear_affinity, rbf_affinity


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# -- solver ------------------------------------------------------------------------------------
def test_solver_reproduces_a_hand_solved_two_sample_assignment():
    """Two samples, two classes, W = [[0, 1], [1, 0]], lambda = 1. With a_i = z_i[class 0]:
    z_i = softmax(log p_i + W z)  <=>  a1 = s(l1 + 2 a2 - 1), a2 = s(l2 + 2 a1 - 1), l_i = logit(p_i).
    The right-hand side is a contraction (slope <= 1/4), so bisection on
    f(a1) = a1 - s(l1 + 2 s(l2 + 2 a1 - 1) - 1) gives the unique fixed point."""
    p = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    l1, l2 = (math.log(p[i, 0].item() + 1e-10) - math.log(p[i, 1].item() + 1e-10) for i in range(2))
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid - sigmoid(l1 + 2 * sigmoid(l2 + 2 * mid - 1) - 1) > 0:
            hi = mid
        else:
            lo = mid
    a1 = (lo + hi) / 2
    a2 = sigmoid(l2 + 2 * a1 - 1)
    kernel = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    log_z = laplacian_optimization(-torch.log(p + 1e-10)[None], kernel[None], 1.0, 100)[0]
    z = log_z.exp()
    torch.testing.assert_close(z[:, 0], torch.tensor([a1, a2], dtype=torch.float64), rtol=0, atol=1e-6)
    assert a2 > 0.5 > p[1, 0]  # the confident neighbour flips the second sample to class 0


def reference_official_loop(unary: torch.Tensor, kernel: torch.Tensor, lam: float, max_steps: int) -> torch.Tensor:
    """The official per-batch loop with its host-side stopping rule, written independently."""
    z = (-unary).softmax(-1)
    old = float("inf")
    for i in range(max_steps):
        pairwise = lam * kernel.matmul(z)
        z = (-unary + pairwise).softmax(-1)
        energy = (unary * z - lam * pairwise * z + z * torch.log(z.clip(1e-20))).sum().item()
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return z


@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_batched_solver_equals_the_official_loop_per_stream(affinity):
    g = torch.Generator().manual_seed(3)
    streams, n, k = 3, 12, 4
    logits = torch.randn(streams, n, k, generator=g) * 2
    feats = F.normalize(torch.randn(streams, n, 6, generator=g), dim=-1)
    unary = -torch.log(logits.softmax(-1) + 1e-10)
    kernel = {"knn": knn_affinity, "rbf": rbf_affinity, "linear": linear_affinity}[affinity](feats, 3)
    out = laplacian_optimization(unary, kernel, 1.0, 100).exp()
    for s in range(streams):
        torch.testing.assert_close(out[s], reference_official_loop(unary[s], kernel[s], 1.0, 100), rtol=1e-5, atol=1e-6)


# -- affinities --------------------------------------------------------------------------------
def test_affinities_match_their_definitions():
    x = F.normalize(torch.randn(1, 7, 5), dim=-1)
    dist = torch.cdist(x[0], x[0])
    w = knn_affinity(x, 2)[0]
    assert torch.equal(w.sum(1), torch.full((7,), 2.0)) and torch.equal(w.diagonal(), torch.zeros(7))
    for i in range(7):
        others = dist[i].clone()
        others[i] = float("inf")
        assert set(others.topk(2, largest=False).indices.tolist()) == set(w[i].nonzero().flatten().tolist())
    sigma = dist.sort(1).values[:, 2].mean()  # k = 3: 3rd nearest counting the point itself
    torch.testing.assert_close(rbf_affinity(x, 3)[0], torch.exp(-dist ** 2 / (2 * sigma ** 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear_affinity(x, 3)[0], x[0] @ x[0].T)
    assert knn_affinity(x, 50)[0].sum(1).eq(6).all()  # k >= N: every other point


def test_degenerate_affinities_are_guarded():
    same = F.normalize(torch.ones(1, 4, 3), dim=-1)
    w = rbf_affinity(same, 5)  # sigma = 0: official NaN
    assert torch.equal(w, torch.zeros_like(w))
    lame = tta.adapt(bn_cnn(), "lame").method
    logits = torch.randn(4, 5)
    out = lame.refine(logits, torch.ones(4, 8))
    torch.testing.assert_close(out.softmax(-1), logits.softmax(-1), rtol=1e-5, atol=1e-6)
    single = lame.refine(logits[:1], torch.randn(1, 8))
    torch.testing.assert_close(single, logits[:1].log_softmax(-1))
    nan_feats = torch.randn(4, 8)
    nan_feats[0] = float("nan")
    assert torch.isfinite(lame.refine(logits, nan_feats)[1:]).all()


# -- method ------------------------------------------------------------------------------------
def test_lame_leaves_the_model_intact_and_returns_log_z():
    model = bn_cnn()
    adapted = tta.adapt(model, "lame")
    state = copy.deepcopy(adapted.model.state_dict())
    flags = [p.requires_grad for p in adapted.model.parameters()]
    x = torch.randn(10, 3, 8, 8)
    out = adapted(x)
    for _ in range(3):
        adapted(torch.randn(10, 3, 8, 8) * 3)
    for key, value in adapted.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [p.requires_grad for p in adapted.model.parameters()] == flags
    assert not adapted.model.training
    torch.testing.assert_close(out.exp().sum(1), torch.ones(10))
    assert torch.equal(adapted(x), out)  # stateless
    with adapted.no_adapt():
        assert torch.equal(adapted(x), out)
    # the refinement is LAME's on the model's own probabilities and features
    with torch.no_grad():
        logits, feats = logits_and_features(model, x)
    expected = adapted.method.refine(logits, feats)
    assert torch.equal(out, expected)


def test_lame_streams_are_solved_separately():
    model = bn_cnn()
    x = torch.randn(12, 3, 8, 8)
    together = tta.adapt(model, "lame", num_streams=2)(x)
    single = tta.adapt(model, "lame")
    torch.testing.assert_close(together, torch.cat([single(x[:6]), single(x[6:])]), rtol=1e-5, atol=1e-6)


def test_lame_hparams_are_validated():
    with pytest.raises(ValueError, match="affinity"):
        tta.adapt(bn_cnn(), "lame", affinity="cosine")
    with pytest.raises(AttributeError):
        tta.adapt(bn_cnn(), "lame", feature_layer="no.such.layer")


def test_a_wrong_feature_layer_names_the_parameter_and_the_accepted_values():
    with pytest.raises(ValueError, match=r"feature_layer='no\.such\.layer' is not a module.*None.*e\.g\. '5', '7'"):
        tta.adapt(bn_cnn(), "lame", feature_layer="no.such.layer")


# -- features ----------------------------------------------------------------------------------
def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_features_of_timm_models_are_pre_logits():
    import timm
    for model in (
        timm.create_model("resnet18", num_classes=7),
        timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2),
    ):
        model.eval()
        x = torch.randn(3, 3, 32, 32)
        calls = _count_forwards(model)
        with torch.no_grad():
            logits, feats = logits_and_features(model, x)
            assert len(calls) == 1  # one forward
            expected = model.forward_head(model.forward_features(x), pre_logits=True)
            torch.testing.assert_close(feats, expected)
            torch.testing.assert_close(logits, model(x))


def test_features_of_torchvision_models():
    import torchvision
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = logits_and_features(resnet, x)
        trunk = nn.Sequential(*list(resnet.children())[:-1])
        torch.testing.assert_close(feats, trunk(x).flatten(1))
        torch.testing.assert_close(logits, resnet(x))
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    ).eval()
    assert find_classifier(vit)[0] == "heads.head"
    with torch.no_grad():
        logits, feats = logits_and_features(vit, x)
    assert feats.shape == (2, 16)
    torch.testing.assert_close(vit.heads.head(feats), logits)


def test_features_of_generic_models_and_explicit_layer():
    model = bn_cnn()
    assert find_classifier(model)[0] == "7"
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        logits, feats = logits_and_features(model, x)
        torch.testing.assert_close(feats, model[:7](x))
        _, hidden = logits_and_features(model, x, layer="5")
        torch.testing.assert_close(hidden, model[:5](x))
    with pytest.raises(ValueError, match="classifier"):
        logits_and_features(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()), x)


def test_lame_reads_the_host_only_for_its_stopping_rule(monkeypatch):
    adapted = tta.adapt(bn_cnn(), "lame", max_steps=100)
    x = torch.randn(16, 3, 8, 8)
    adapted(x)
    reads: list[torch.Tensor] = []
    for name in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            reads.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    adapted(x)
    assert 1 <= len(reads) <= 9  # one "all converged?" check every 10 iterations, at most
