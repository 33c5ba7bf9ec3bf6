"""Training the adapted parameters: the fp32 master optimizer, its construction for the
Adam/SGD settings of the official code, and the one update sequence every gradient method
runs (:func:`descend`: backward, zero non-finite gradients on the device, step, clear).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from tta.hyperparams import hparam

LOW_PRECISION = (torch.float16, torch.bfloat16)


class MasterOptimizer:
    """A torch optimizer running on fp32 master copies of half-precision parameters.

    For every fp16/bf16 parameter ``p`` it keeps ``master = p.float()``; the inner optimizer
    (and so its state) sees only the masters. :meth:`step` copies the gradients to the
    masters (fp32), steps, and writes the masters back into the parameters. fp32/fp64
    parameters are their own masters (no copy, bit-identical to the inner optimizer alone).
    Adam, AdamW and SGD (dampening 0) state is created up front, exactly as PyTorch creates it
    on the first step, so that state tensors never appear during a step.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer: Callable[..., torch.optim.Optimizer], **kwargs: Any) -> None:
        self.params: list[nn.Parameter] = list(params)
        self.masters: list[torch.Tensor] = [self._master_of(p) for p in self.params]
        if self.params and self.params[0].device.type == "cuda" and "capturable" not in kwargs:
            try:
                accepts = "capturable" in inspect.signature(optimizer).parameters
            except (TypeError, ValueError):
                accepts = False
            if accepts:  # the step count stays on the device: no host sync in step or guard
                kwargs["capturable"] = True
        self.inner = optimizer(self.masters, **kwargs)
        self._prime()

    @staticmethod
    def _master_of(param: torch.Tensor) -> torch.Tensor:
        if param.dtype in LOW_PRECISION:
            return param.detach().float().clone().requires_grad_(True)
        return param

    # torch.optim.Optimizer look-alike
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def _prime(self) -> None:
        inner = self.inner
        for group in inner.param_groups:
            for master in group["params"]:
                state = inner.state[master]
                if state:
                    continue
                if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                    on_device = group.get("capturable") or group.get("fused")
                    step = torch.zeros((), dtype=torch.float32, device=master.device if on_device else "cpu")
                    state["step"] = step
                    state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                elif isinstance(inner, torch.optim.SGD) and group["momentum"] and not group["dampening"]:
                    # zeros give the same first step as PyTorch's buf = grad (0 * m + g == g)
                    state["momentum_buffer"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                else:
                    inner.state.pop(master, None)

    def step(self) -> None:
        copies = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        for param, master in copies:
            master.grad = None if param.grad is None else param.grad.detach().float()
        self.inner.step()
        if copies:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in copies], [m for _, m in copies])
            for _, master in copies:
                master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for tensor in (*self.params, *self.masters):
            if tensor.grad is None:
                continue
            if set_to_none:
                tensor.grad = None
            else:
                tensor.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.inner.state_dict(),
            "masters": [None if m is p else m.detach().clone() for p, m in zip(self.params, self.masters)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output (or a plain torch optimizer state dict, saved before
        master copies existed: the masters are then taken from the parameters)."""
        if "optimizer" in state and "masters" in state:
            inner_state, masters = state["optimizer"], state["masters"]
        else:
            inner_state, masters = state, [None] * len(self.masters)
        self.inner.load_state_dict(inner_state)
        with torch.no_grad():
            for param, master, saved in zip(self.params, self.masters, masters):
                if master is param:
                    continue
                master.copy_(saved if saved is not None else param.detach())
        self._prime()

    def tensors(self) -> list[torch.Tensor]:
        """Parameters, masters and state tensors (what the non-finite guard protects)."""
        found = [*self.params, *self.masters]
        for state in self.inner.state.values():
            found.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return found

    def follow(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called by ``Adapted.to()``/``.half()``/``.cuda()`` before the model converts its
        parameters with ``fn``. Separate fp32 masters and their state move to the new device;
        a parameter that is its own master and becomes fp16/bf16 gets a separate fp32 master,
        cloned now so it keeps the fp32 values; one that stays its own master (fp32 <-> fp64)
        has its state converted with it."""
        remap: dict[int, torch.Tensor] = {}
        state_dtype: dict[int, torch.dtype | None] = {}
        device = None
        for index, (param, master) in enumerate(zip(self.params, self.masters)):
            target = conversion_target(fn, param)
            device = target.device
            if master is param and target.dtype in LOW_PRECISION and param.dtype not in LOW_PRECISION:
                new = param.detach().to(device, torch.float32, copy=True).requires_grad_(True)
            elif master is not param and master.device != device:
                new = master.detach().to(device).requires_grad_(True)
            else:
                state_dtype[id(master)] = target.dtype if master is param else None
                continue
            remap[id(master)] = new
            self.masters[index] = new
        if device is None:
            return
        for group in self.inner.param_groups:
            group["params"] = [remap.get(id(m), m) for m in group["params"]]
            if "capturable" in group and device.type == "cuda":
                group["capturable"] = True  # a device-resident step count: no host sync
        old_state = dict(self.inner.state)
        self.inner.state.clear()
        for master, state in old_state.items():
            dtype = state_dtype.get(id(master))
            moved = {}
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    moved[key] = value
                elif key == "step":
                    on_cpu = value.device.type == "cpu" and device.type != "cpu" and not self._device_steps()
                    moved[key] = value if on_cpu else value.to(device)
                else:
                    moved[key] = value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
            self.inner.state[remap.get(id(master), master)] = moved

    def _device_steps(self) -> bool:
        return any(group.get("capturable") or group.get("fused") for group in self.inner.param_groups)

    def __repr__(self) -> str:
        return f"MasterOptimizer({self.inner!r})"


def conversion_target(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """What ``fn`` (a ``Module._apply`` conversion) makes of ``tensor``: a 0-d probe of the same
    dtype and device, so nothing of the tensor's size is copied."""
    return fn(torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def nonfinite_guard_(grads: Sequence[torch.Tensor], norms: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Zero all ``grads`` when any of them holds NaN/Inf; return their global L2 norm (0 then).

    Decided on the device (no host synchronisation): a batch with NaN/Inf somewhere in the
    forward (e.g. a NaN pixel under batch statistics) contributes no gradient instead of
    poisoning the adapted parameters for good (the wrapper's guard then also undoes the
    optimizer's momentum step, see :class:`tta.Adapted`). ``norms`` are the per-tensor norms
    when already computed.
    """
    if not grads:
        return torch.zeros(())
    if norms is None:
        # fp32 norms for half-precision gradients, whose squares overflow early
        low = grads[0].dtype in LOW_PRECISION
        norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32 if low else None)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    bad = ~torch.isfinite(total)
    for grad in grads:
        grad.masked_fill_(bad, 0.0)
    return total.masked_fill(bad, 0.0)


def present_grads(params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The parameters that received a gradient in the last backward, and those gradients."""
    with_grad = [p for p in params if p.grad is not None]
    return with_grad, [p.grad for p in with_grad]  # type: ignore[misc]


def descend(optimizer: MasterOptimizer, loss: torch.Tensor) -> None:
    """One gradient step on ``loss``, the update sequence of every gradient method: backward,
    zero all gradients when any is non-finite (:func:`nonfinite_guard_`, on the device), the
    optimizer's step, and the gradients cleared for the next step."""
    loss.backward()
    _, grads = present_grads(optimizer.params)
    nonfinite_guard_(grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass
class OptimizerHparams:
    """The optimizer of the methods that train normalization affine parameters (TENT, ROID,
    EATA/ETA); each method's docstring gives its official values."""

    #: optimizer: "adam" (the CIFAR configs of the official code) or "sgd" (their ImageNet ones)
    optimizer: str = hparam("adam", choices=("adam", "sgd"))
    #: learning rate (official CIFAR-10-C configs: Adam 1e-3; ImageNet-C: SGD 2.5e-4 at batch 64)
    lr: float = hparam(1e-3, low=0.0, low_open=True)
    #: Adam beta_1 (beta_2 is 0.999), official 0.9
    beta: float = hparam(0.9, low=0.0, high=1.0, high_open=True, symbol="β₁")
    #: SGD momentum (SGD only; official 0.9)
    sgd_momentum: float = hparam(0.9, low=0.0, high=1.0, high_open=True)
    #: Nesterov momentum for SGD (SGD only; TENT's and ROID's official default True)
    nesterov: bool = True
    #: weight decay (official 0)
    weight_decay: float = hparam(0.0, low=0.0)


def build_optimizer(
    params: Sequence[nn.Parameter],
    name: str,
    lr: float,
    *,
    beta: float = 0.9,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> MasterOptimizer:
    """Adam (``betas = (beta, 0.999)``) or SGD (``momentum``, dampening 0, ``nesterov``), on
    fp32 master copies of half-precision parameters (:class:`MasterOptimizer`).

    On CUDA, Adam keeps its step count on the device (``capturable``), so that neither the
    step nor the non-finite guard synchronises with the host."""
    params = list(params)
    if name == "adam":
        return MasterOptimizer(params, torch.optim.Adam, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return MasterOptimizer(
            params, torch.optim.SGD, lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def optimizer_state(optimizer: MasterOptimizer | torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """A detached deep copy of the optimizer state (later steps do not mutate it)."""
    return None if optimizer is None else copy.deepcopy(optimizer.state_dict())


def load_optimizer_state(optimizer: MasterOptimizer | torch.optim.Optimizer | None, state: dict[str, Any] | None) -> None:
    """Load a deep copy, so the caller's dict never aliases the live optimizer state."""
    if optimizer is not None and state is not None:
        optimizer.load_state_dict(copy.deepcopy(state))
