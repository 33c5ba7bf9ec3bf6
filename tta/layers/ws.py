"""Weight-standardized convolution (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", arXiv 1903.10520, §3).

Spec: docs/METHODS.md §7.
"""

from __future__ import annotations

import torch
from torch import nn


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5, eps_inside_sqrt: bool = True) -> torch.Tensor:
    """``W^_o = (W_o - mean(W_o)) / s_o`` per output channel o (paper §3).

    The mean and the *unbiased* variance run over the ``I * kh * kw`` entries of each output
    filter. Two scale conventions exist in the official code (docs/METHODS.md §7):

    * ``eps_inside_sqrt=True``: ``s_o = sqrt(var_o + eps)`` (BCN repository, ImageNet models);
    * ``eps_inside_sqrt=False``: ``s_o = std_o + eps`` (WS README and DeepLabV3 code).

    A filter with a single entry has no unbiased variance; it is standardized with the biased
    one (0), i.e. mapped to 0, instead of producing NaN. The computation runs in at least fp32
    and the result is cast back to the weight's dtype.
    """
    flat = weight.flatten(1)
    compute = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    correction = 1 if compute.shape[1] > 1 else 0
    var, mean = torch.var_mean(compute, dim=1, keepdim=True, correction=correction)
    scale = torch.sqrt(var + eps) if eps_inside_sqrt else torch.sqrt(var) + eps
    return ((compute - mean) / scale).to(weight.dtype).view_as(weight)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward convolves with the standardized weight.

    The raw ``weight`` stays the optimized parameter; gradients flow through the
    standardization. Bias, stride, padding (and ``padding_mode``), dilation and groups behave
    as in ``nn.Conv2d``; the state dict is the same as ``nn.Conv2d``'s, so a WS convolution
    loads a plain convolution's weights and vice versa. The paper applies WS to convolutions
    followed by a normalization layer (see :func:`tta.layers.bcn.convert_to_bcn_ws`).

    Args (beyond ``nn.Conv2d``'s):
        ws_eps: epsilon of the standardization (official 1e-5).
        eps_inside_sqrt: ``sqrt(var + eps)`` (default, BCN code) or ``std + eps`` (WS README);
            see :func:`standardize_weight`.
    """

    def __init__(self, *args, ws_eps: float = 1e-5, eps_inside_sqrt: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = float(ws_eps)
        self.eps_inside_sqrt = bool(eps_inside_sqrt)

    def standardized_weight(self) -> torch.Tensor:
        return standardize_weight(self.weight, self.ws_eps, self.eps_inside_sqrt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, ws_eps: float = 1e-5, eps_inside_sqrt: bool = True) -> "WSConv2d":
        """A WS convolution with ``conv``'s configuration, parameters (copied) and device/dtype."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            ws_eps=ws_eps,
            eps_inside_sqrt=eps_inside_sqrt,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        where = "sqrt(var + eps)" if self.eps_inside_sqrt else "std + eps"
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}, ws_scale={where}"
