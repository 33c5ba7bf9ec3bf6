"""The prediction entropy that TENT, SAR, EATA/ETA, ROID and TRIBE minimise or threshold."""

from __future__ import annotations

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``H(y) = -sum_c softmax(y)_c log_softmax(y)_c`` (docs/METHODS.md §1), in fp32.

    One ``log_softmax`` and one ``exp``; the result has shape ``(N,)`` for logits ``(N, C)``.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)
