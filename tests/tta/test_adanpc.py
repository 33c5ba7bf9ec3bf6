"""AdaNPC (``adanpc``): the kNN vote and the memory's growth rule by hand, the source-data
requirement, the state, and a differential test against the official code."""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import types
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.official import checkout_root
from tta.methods.adanpc import SCORE_EPS, confident, knn_vote

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# -- the vote ------------------------------------------------------------------------------
def test_knn_vote_on_a_2d_memory_by_hand() -> None:
    memory = _unit([1.0, 0.0], [0.0, 1.0], [0.6, 0.8])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # normalized inside: cosine similarities 1, 0, 0.6
    # k = 2: entries 0 and 2 vote; temperature 1: weights softmax(1, 0.6)
    w0 = 1.0 / (1.0 + math.exp(-0.4))
    scores = knn_vote(query, memory, labels, num_classes=3, k=2, temperature=1.0)
    expected = torch.tensor([[w0 + SCORE_EPS, 1.0 - w0 + SCORE_EPS, SCORE_EPS]])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    # temperature 0.1: softmax(10, 6)
    w0 = 1.0 / (1.0 + math.exp(-4.0))
    scores = knn_vote(query, memory, labels, num_classes=3, k=2, temperature=0.1)
    torch.testing.assert_close(scores[0, :2], torch.tensor([w0, 1.0 - w0]) + SCORE_EPS, rtol=0, atol=1e-6)
    # k = 1: the nearest alone, 1 + eps clamped to 1
    scores = knn_vote(query, memory, labels, num_classes=3, k=1, temperature=1.0)
    torch.testing.assert_close(scores, torch.tensor([[1.0, SCORE_EPS, SCORE_EPS]]), rtol=0, atol=0)
    # k larger than the memory: all three vote, softmax(1, 0, 0.6)
    e = [math.exp(1.0), 1.0, math.exp(0.6)]
    scores = knn_vote(query, memory, labels, num_classes=3, k=10, temperature=1.0)
    expected = torch.tensor([[e[0] / sum(e), (e[1] + e[2]) / sum(e), 0.0]]) + SCORE_EPS
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    # the memory in chunks (source, then test entries) votes as one
    chunked = knn_vote(query, (memory[:1], memory[1:]), (labels[:1], labels[1:]), num_classes=3, k=10, temperature=1.0)
    torch.testing.assert_close(chunked, scores, rtol=0, atol=1e-7)


def test_confidence_is_the_softmax_of_the_scores() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    top = 1.0 / (1.0 + math.exp(-0.8))  # softmax(0.9, 0.1)[0] = 0.68997...
    assert confident(scores, top - 1e-4).tolist() == [True, False]
    assert confident(scores, 0.5).tolist() == [True, True]  # a tie: softmax 0.5 each
    assert confident(scores, top + 1e-4).tolist() == [False, False]
    assert confident(scores, 1.1).tolist() == [False, False]  # above 1: nothing joins


# -- the method on a toy model whose features are its 2-D inputs ---------------------------
def _toy(num_classes: int = 2) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, num_classes))  # features: the inputs
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:num_classes])
        model[1].bias.zero_()
    return model


SOURCE = [(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))]


def test_memory_grows_with_the_confident_samples_and_their_predicted_labels() -> None:
    adapted = tta.adapt(_toy(), "adanpc", source_loader=SOURCE, k=2, temperature=1.0, beta=0.6)
    method = adapted.method
    torch.testing.assert_close(method.source_features, _unit([1.0, 0.0], [0.0, 1.0]))
    assert method.source_labels.tolist() == [0, 1] and method.memory.shape == (0, 2)
    # sample a: similarities (1, 0) -> weights softmax(1, 0); b: (0.6, 0.8) -> softmax(0.6, 0.8)
    x = torch.tensor([[5.0, 0.0], [0.6, 0.8]])
    out = adapted(x)
    wa = 1.0 / (1.0 + math.exp(-1.0))
    wb = 1.0 / (1.0 + math.exp(-0.2))
    expected = torch.tensor([[wa, 1.0 - wa], [1.0 - wb, wb]]) + SCORE_EPS
    torch.testing.assert_close(out.exp(), expected, rtol=0, atol=1e-6)
    # joins when max softmax(scores) >= 0.6: a (softmax gap 2 wa - 1 = 0.46 -> 0.613), not b (0.55)
    conf = torch.softmax(expected, dim=1).amax(1)
    assert conf[0] >= 0.6 > conf[1]
    torch.testing.assert_close(method.memory, _unit([1.0, 0.0]))
    assert method.memory_labels.tolist() == [0]
    # the next batch votes with the new entry (k = 2: the two entries at similarity 1)
    out = adapted(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out.exp(), torch.tensor([[1.0, SCORE_EPS]]), rtol=0, atol=1e-9)
    assert method.memory.shape == (2, 2) and method.memory_labels.tolist() == [0, 0]
    adapted.reset()  # the test entries go, the source entries stay
    assert method.memory.shape == (0, 2) and method.source_features.shape == (2, 2)


def test_prediction_uses_the_memory_before_the_batch_and_predict_changes_nothing() -> None:
    adapted = tta.adapt(_toy(), "adanpc", source_loader=SOURCE, k=1, beta=0.0)
    x = torch.tensor([[1.0, 0.1], [1.0, 0.2]])
    with adapted.no_adapt():
        predicted = adapted(x)
    assert adapted.method.memory.shape == (0, 2)
    assert torch.equal(adapted(x), predicted)  # both samples join only after voting
    assert adapted.method.memory.shape == (2, 2)


def test_max_test_memory_keeps_the_newest_entries() -> None:
    adapted = tta.adapt(_toy(), "adanpc", source_loader=SOURCE, k=1, beta=0.0, max_test_memory=3)
    for i in range(3):
        adapted(torch.tensor([[1.0, 0.1 * i], [0.1 * i, 1.0]]))
    method = adapted.method
    assert method.memory.shape == (3, 2)
    torch.testing.assert_close(method.memory, _unit([0.1, 1.0], [1.0, 0.2], [0.2, 1.0]))
    assert method.memory_labels.tolist() == [1, 0, 1]


def test_state_dict_carries_both_memories() -> None:
    adapted = tta.adapt(_toy(), "adanpc", source_loader=SOURCE, k=1, beta=0.0)
    adapted(torch.tensor([[1.0, 0.5]]))
    saved = adapted.state_dict()
    other_source = [(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))]
    twin = tta.adapt(_toy(), "adanpc", source_loader=other_source, k=1, beta=0.0)
    twin.load_state_dict(saved)
    for name in ("source_features", "source_labels", "memory", "memory_labels"):
        assert torch.equal(getattr(twin.method, name), getattr(adapted.method, name)), name
    x = torch.tensor([[0.3, 1.0], [1.0, 0.0]])
    assert torch.equal(twin(x), adapted(x))


def test_source_data_is_required_and_checked() -> None:
    with pytest.raises(ValueError, match="needs labelled source data"):
        tta.adapt(_toy(), "adanpc")
    with pytest.raises(TypeError, match="labelled batches"):
        tta.adapt(_toy(), "adanpc", source_loader=[torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="source labels must lie"):
        tta.adapt(_toy(), "adanpc", source_loader=[(torch.zeros(2, 2), torch.tensor([0, 2]))])
    with pytest.raises(ValueError, match="yielded no batch"):
        tta.adapt(_toy(), "adanpc", source_loader=[])
    with pytest.raises(ValueError, match="feature_layer"):
        tta.adapt(_toy(), "adanpc", source_loader=SOURCE, feature_layer="nope")
    dicts = [{"x": SOURCE[0][0], "y": SOURCE[0][1]}]
    adapted = tta.adapt(_toy(), "adanpc", source_loader=dicts)
    assert "source_loader='list'" in adapted.method.describe()
    assert tta.registry.method_class("adanpc").requires  # left out where models are generic


def test_a_composed_statistics_method_does_not_move_on_source_data() -> None:
    from tests.conftest import batches, small_bn_cnn

    source = [(x, torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(0))) for x in batches(2, seed=7)]
    torch.manual_seed(0)  # the convolutions' initial weights
    adapted = tta.adapt(small_bn_cnn(width=8), "rbn+adanpc", source_loader=source, k=3)
    torch.manual_seed(0)
    fresh = tta.adapt(small_bn_cnn(width=8), "rbn")
    wrapped = {k: v for k, v in adapted.model.state_dict().items()}
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(wrapped[key], value), key
    assert adapted.method.method.source_features.shape == (16, 8)


# -- the official code ---------------------------------------------------------------------
@contextlib.contextmanager
def _official_modules() -> Iterator[types.ModuleType]:
    """``domainbed.adapt_algorithms`` of the checkout; ``domainbed.networks`` (torchvision
    backbones, unused here) and ``domainbed.lib.misc`` are stubbed for the import."""
    root = checkout_root("ADANPC_OFFICIAL_SRC")
    saved = {name: mod for name, mod in sys.modules.items() if name == "domainbed" or name.startswith("domainbed.")}
    for name in saved:
        del sys.modules[name]
    networks = types.ModuleType("domainbed.networks")
    misc = types.ModuleType("domainbed.lib.misc")
    misc.random_pairs_of_minibatches = None  # type: ignore[attr-defined]
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("domainbed")
        sys.modules["domainbed.networks"] = networks
        package.networks = networks  # type: ignore[attr-defined]
        lib = types.ModuleType("domainbed.lib")
        lib.misc = misc  # type: ignore[attr-defined]
        sys.modules["domainbed.lib"], sys.modules["domainbed.lib.misc"] = lib, misc
        yield importlib.import_module("domainbed.adapt_algorithms")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "domainbed" or n.startswith("domainbed.")]:
            del sys.modules[name]
        sys.modules.update(saved)


class _Features(nn.Module):
    def __init__(self, dim: int, classes: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, dim), nn.Tanh())
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.official
@pytest.mark.parametrize("k, temperature, beta", [(5, 0.1, 0.4), (20, 0.05, 0.38), (1, 0.5, 0.0), (10, 0.1, 1.1)])
def test_matches_official_adanpc(k: int, temperature: float, beta: float) -> None:
    classes, dim = 3, 6
    model = _Features(dim, classes, seed=1)
    generator = torch.Generator().manual_seed(2)
    source = [(torch.randn(16, 12, generator=generator), torch.randint(0, classes, (16,), generator=generator)) for _ in range(3)]
    stream = [torch.randn(10, 12, generator=generator) for _ in range(8)]
    ours = tta.adapt(model, "adanpc", source_loader=source, k=k, temperature=temperature, beta=beta)

    with _official_modules() as official_module, torch.no_grad():
        hparams = {"beta": beta, "k": k, "temperature": temperature}
        algorithm = types.SimpleNamespace(featurizer=types.SimpleNamespace(n_outputs=dim))
        official = official_module.AdaNPC((12,), classes, 1, hparams, algorithm)
        # the source memory as unsupervised_adaptation.py builds it (featurizer outputs, true labels)
        for x, y in source:
            official.classifier.extend_test(model.body(x), y)
        # deviation: drop the placeholder row MomentumQueue(queue_size=1) starts with
        official.classifier.memory = official.classifier.memory[1:]
        official.classifier.memory_label = official.classifier.memory_label[1:]
        official.classifier.queue_size = official.classifier.memory.shape[0]
        worst, grown = 0.0, 0
        for x in stream:
            theirs = official(model.body(x), adapt=True)
            mine = ours(x).exp()
            worst = max(worst, (mine - theirs).abs().max().item())
            assert torch.equal(mine.argmax(1), theirs.argmax(1))
            memory = torch.cat([ours.method.source_features, ours.method.memory])
            labels = torch.cat([ours.method.source_labels, ours.method.memory_labels])
            assert memory.shape == official.classifier.memory.shape
            assert torch.equal(labels, official.classifier.memory_label)
            worst = max(worst, (memory - official.classifier.memory).abs().max().item())
            grown = ours.method.memory.shape[0]
    print(f"adanpc vs official (k={k}, T={temperature}, beta={beta}): worst gap {worst:.3g}, {grown} test entries")
    assert worst < 1e-5, worst
    # the rule both selects and rejects (beta 0: every sample joins; above 1: none)
    assert grown == 80 if beta == 0.0 else grown == 0 if beta > 1.0 else 0 < grown < 80
