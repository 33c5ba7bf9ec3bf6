"""The method protocol every adaptation method implements, and the contract the wrapper
(:class:`tta.Adapted`) relies on.

A method does two things:

* :meth:`Method.convert` once, at wrap time, on the model copy the wrapper owns: replace or
  configure layers, pick trainable parameters, build optimizers;
* :meth:`Method.step` once per incoming batch: adapt and return the prediction for the batch
  (for optimizing methods, the output of the forward before the parameter update).

Roles decide how methods compose (``"unmix_tns+sar"``): a ``statistics`` method replaces the
normalization layers; an ``objective`` or ``output`` method runs the step on whatever layers
it finds. A composite converts with the statistics method first, then the other one, and
steps with the other one. Statistics layers update at most once per step, from the step's
first forward (see :class:`tta.layers.base.AdaptiveNorm`): under SAR, which forwards twice
per batch, the perturbed second forward normalizes with the same statistics but does not move
them again (the official code would update twice).

Contract for method authors (what the wrapper does for you when you follow it)
------------------------------------------------------------------------------

1. **Hyperparameters** are a dataclass ``Hparams`` whose fields carry type annotations and,
   where a range or a set of values applies, :func:`hparam` metadata::

       @dataclasses.dataclass
       class MyHparams:
           lr: float = hparam(1e-3, low=0.0, low_open=True)       # a float > 0
           steps: int = hparam(1, low=1)                          # a positive integer
           optimizer: str = hparam("adam", choices=("adam", "sgd"))
           momentum: float | None = hparam(None, low=0.0, high=1.0)  # None or in [0, 1]
           exclude: tuple[str, ...] = ()                          # lists become tuples

   :meth:`Method.__init__` checks every value at ``tta.adapt`` time (and so for the Hydra
   configs, which build methods through :func:`tta.build_method`): a wrong type raises
   ``TypeError``, a value out of range ``ValueError``, both naming the method, the
   parameter and the accepted values. Ints are accepted for float fields (converted),
   integral floats for int fields; bools are never numbers. Override :meth:`validate` only for
   checks across fields.

2. **Method state** (anything outside the model that a step changes: tensors, EMAs, memory
   banks, counters, teacher ``nn.Module`` copies, optimizers) is declared once, in
   ``__init__``, with :meth:`Method.register_state` by attribute name::

       self.bank = torch.zeros(0)
       self.teacher: nn.Module | None = None      # set in convert()
       self.register_state("bank", "teacher")

   The attribute may be reassigned freely (``self.bank = torch.cat(...)``); the wrapper
   looks it up by name. Registered state is then covered by

   * ``state_dict()`` / ``load_state_dict()`` and ``reset()`` (the default
     :meth:`extra_state` / :meth:`load_extra_state` save and restore it; tensors detached
     and cloned, modules through their state dicts, optimizers through theirs, other values
     deep-copied);
   * the non-finite guard: a batch whose input, output or new state holds NaN/Inf leaves
     every registered floating tensor, every optimizer's parameters and state, and the
     model's trainable parameters exactly as they were (decided on the device, no host
     synchronisation; see :class:`tta.Adapted`);
   * ``adapted.to(device)`` / ``.half()`` / ``.to(dtype)``: registered tensors move to the
     new device and keep their dtype (fp32 statistics stay fp32); optimizers follow their
     parameters (fp32 masters and their state stay fp32); registered ``nn.Module`` state
     converts like the model (device and dtype).

   Methods with extra needs may still override :meth:`extra_state` /
   :meth:`load_extra_state` (call ``super()`` to keep the registered state) and
   :meth:`guarded_tensors`.

3. **Gradient methods** build their optimizer with :meth:`Method.make_optimizer` (or
   :func:`tta.methods.entropy.build_optimizer`, which builds the same for Adam/SGD) and
   register it::

       self.optimizer = self.make_optimizer(params, torch.optim.Adam, lr=hp.lr)
       self.register_state("optimizer")

   The result is a :class:`MasterOptimizer`: for fp16/bf16 parameters it keeps fp32 master
   copies and fp32 optimizer state (the model's half-precision parameters are written from
   the masters after every step); for fp32/fp64 parameters the masters *are* the
   parameters, so nothing changes numerically. Use it like a torch optimizer: after
   ``loss.backward()`` call ``optimizer.step()`` then ``optimizer.zero_grad()``;
   ``param_groups`` and ``state`` are the inner optimizer's. Adam/AdamW/SGD state is created
   up front (numerically identical to PyTorch's lazy creation) so the non-finite guard never
   needs a host synchronisation.

4. **Randomness**: draw any random initial state or per-step noise from ``self.generator``
   (a CPU ``torch.Generator`` seeded by ``tta.adapt(..., seed=...)``, fixed default
   :data:`DEFAULT_SEED`; shared by the parts of a composition, drawn in conversion order),
   never from the global RNG: two wraps of one model agree and the caller's RNG stream is
   untouched. Draw on the CPU and move (``torch.randn(shape, generator=self.generator)
   .to(device)``) or use ``self.generator_on(device)`` for device-side draws. The
   generators' states are part of the registered state (saved, restored by ``reset()``).

5. **Grad mode**: the wrapper calls :meth:`step` and :meth:`predict` with autograd enabled and
   outside ``torch.inference_mode`` (an inference-mode batch is cloned into a normal tensor
   first), whatever the caller's context. Wrap pure inference in ``torch.no_grad()``
   yourself, as the default :meth:`step` does. :meth:`predict` must return exactly what
   :meth:`step` returns for the batch (run the same forward in the same grad mode); the
   default does so for methods with and without optimizers.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
import types
import typing
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import nn

STATISTICS = "statistics"
OBJECTIVE = "objective"
OUTPUT = "output"
NONE = "none"

#: seed of the per-wrapper generator when ``tta.adapt`` gets no ``seed``
DEFAULT_SEED = 0

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- hyperparameters ------------------------------------------------------------------------
def hparam(
    default: Any = dataclasses.MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a range (``[low, high]``, ends open when ``*_open``) or a set of
    accepted values, checked by :func:`check_hparams`. ``None`` passes when the annotation
    allows it."""
    metadata = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fmt(value: float) -> str:
    return repr(value) if not isinstance(value, float) or not value.is_integer() else str(int(value))


def _range_text(kind: type, meta: dict[str, Any]) -> str | None:
    low, high = meta.get("low"), meta.get("high")
    low_open, high_open = meta.get("low_open", False), meta.get("high_open", False)
    if meta.get("choices") is not None:
        return f"be one of {list(meta['choices'])}"
    if low is None and high is None:
        return None
    if kind is int and high is None and not low_open and low == 1:
        return "be a positive integer"
    if high is None:
        return f"be {'>' if low_open else '>='} {_fmt(low)}"
    if low is None:
        return f"be {'<' if high_open else '<='} {_fmt(high)}"
    return f"lie in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"


def _in_range(value: Any, meta: dict[str, Any]) -> bool:
    if meta.get("choices") is not None:
        return value in meta["choices"]
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        return False
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        return False
    return value == value  # NaN is in no range


class _TypeMismatch(Exception):
    pass


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is tuple:
        args = typing.get_args(annotation)
        plural = {str: "strings", int: "integers", float: "floats", bool: "bools"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    if annotation is int:
        return "an integer"
    return {float: "a float", bool: "a bool", str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _convert(annotation: Any, value: Any) -> Any:
    """``value`` converted to ``annotation`` (numbers widen, lists become tuples);
    :class:`_TypeMismatch` when it does not fit. Unknown annotations accept anything."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except _TypeMismatch:
                continue
        raise _TypeMismatch
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is int:
        if isinstance(value, bool):
            raise _TypeMismatch
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise _TypeMismatch
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _TypeMismatch
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _TypeMismatch
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise _TypeMismatch
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        return tuple(_convert(item, element) for element in value)
    if annotation is type(None):
        if value is None:
            return None
        raise _TypeMismatch
    return value


def check_hparams(method: str, hparams_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the fields of ``hparams_cls``; returns them converted.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a value outside
            the field's range/choices.
        TypeError: a value of the wrong type.
    """
    fields = {field.name: field for field in dataclasses.fields(hparams_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {method!r}; valid: {sorted(fields) or 'none'}"
        )
    try:
        hints = typing.get_type_hints(hparams_cls)
    except Exception:  # noqa: BLE001 - annotations we cannot resolve are not type-checked
        hints = {}
    converted: dict[str, Any] = {}
    for name, value in values.items():
        field = fields[name]
        annotation = hints.get(name, Any)
        try:
            value = _convert(annotation, value)
        except _TypeMismatch:
            accepted = _type_name(annotation)
            rule = _range_text(_base_type(annotation), dict(field.metadata))
            # "be > 0" -> " (> 0)", "lie in [0, 1]" -> " (in [0, 1])", "be one of [...]" -> " (one of [...])"
            hint = ">= 1" if rule == "be a positive integer" else (rule or "").removeprefix("be ").removeprefix("lie ")
            detail = f" ({hint})" if hint else ""
            raise TypeError(
                f"method {method!r}: hyperparameter {name} must be {accepted}{detail}, "
                f"got {value!r} ({type(value).__name__})"
            ) from None
        if value is not None and field.metadata and not _in_range(value, dict(field.metadata)):
            rule = _range_text(_base_type(annotation), dict(field.metadata))
            raise ValueError(f"method {method!r}: {name} must {rule}, got {value!r}")
        converted[name] = value
    return converted


def _base_type(annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if args else type(None)
    return annotation if isinstance(annotation, type) else object


# -- optimizers with fp32 master parameters -------------------------------------------------
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
        if param.dtype in _LOW_PRECISION:
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
            target = _target(fn, param)
            device = target.device
            if master is param and target.dtype in _LOW_PRECISION and param.dtype not in _LOW_PRECISION:
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


def _target(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """What ``fn`` (a ``Module._apply`` conversion) makes of ``tensor``: a 0-d probe of the same
    dtype and device, so nothing of the tensor's size is copied."""
    return fn(torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(value, fn) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(value, fn) for value in obj)
    return obj


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, MasterOptimizer):
        yield from obj.tensors()
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _iter_tensors(value)


def _snapshot(value: Any) -> Any:
    if isinstance(value, (MasterOptimizer, torch.optim.Optimizer)):
        return {"__optimizer__": copy.deepcopy(value.state_dict())}
    if isinstance(value, nn.Module):
        return {"__module__": copy.deepcopy(value.state_dict())}
    if isinstance(value, torch.Generator):
        return {"__generator__": value.get_state()}
    return copy.deepcopy(_map_tensors(value, lambda t: t.detach()))


def _is_plain(value: Any) -> bool:
    return not isinstance(value, (MasterOptimizer, torch.optim.Optimizer, nn.Module, torch.Generator))


def _flat(obj: Any) -> list[torch.Tensor]:
    return list(_iter_tensors(obj)) if _is_plain(obj) else []


def _zip_tensors(new: Any, old: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(new, torch.Tensor):
        return fn(new, old)
    if isinstance(new, dict):
        return {key: _zip_tensors(value, old[key], fn) for key, value in new.items()}
    if isinstance(new, (list, tuple)):
        return type(new)(_zip_tensors(a, b, fn) for a, b in zip(new, old))
    return new


def _layout(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return {key: _layout(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_layout(value) for value in obj]
    return None


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class StateGuard:
    """What :class:`tta.Adapted` uses to undo a step on a non-finite batch without a host
    synchronisation.

    Before the step it clones the guarded state of every part of the method: the tensors that
    :meth:`Method.guarded_tensors` lists (updated in place) and every registered attribute that
    holds floating tensors (plain tensors, dicts, lists, tuples). After the step,
    :meth:`settle` tests the batch, the output and the new state for NaN/Inf and selects per
    element ``where(ok, new, saved)``: in place for the former (one flat copy per device and
    dtype, so a handful of kernels however many tensors), by reassigning the attribute for
    the latter. Only where an attribute's layout changed
    during the step (a memory bank that grew), a tensor lives on another device than the
    flag, or the step drew from the method's generators does the decision need the host (one
    synchronisation, on those steps only; none on the CPU). Other Python values (counters,
    custom objects) are not guarded: keep state in tensors to have it protected.
    """

    def __init__(self, methods: Sequence["Method"]) -> None:
        self.in_place: list[torch.Tensor] = []
        seen: set[int] = set()
        for method in methods:
            for tensor in method.guarded_tensors():
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.in_place.append(tensor)
        self.attributes: list[tuple[Method, str, Any, Any]] = []
        generators = {id(g): g for m in methods for g in m.generators()}
        self.generators = [(g, g.get_state()) for g in generators.values()]
        self._drawn = [bytes(state.numpy()) for _, state in self.generators]
        with torch.no_grad():
            # one flat copy per (device, dtype): a step's restore is then a handful of kernels
            # (cat, where, one foreach copy) instead of two per tensor
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for tensor in self.in_place:
                groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
            self.groups = [(tensors, _flatten(tensors)) for tensors in groups.values()]
            for method in methods:
                for name, value in method.registered_state().items():
                    if any(t.is_floating_point() for t in _flat(value)):
                        clone = _map_tensors(value, lambda t: t.detach().clone())
                        self.attributes.append((method, name, clone, _layout(value)))

    def _generators_drawn(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        # compared as bytes on the host: generator states are CPU tensors, and no operator
        # needs to run for methods that draw nothing during a step
        return [
            (generator, saved)
            for (generator, saved), before in zip(self.generators, self._drawn)
            if bytes(generator.get_state().numpy()) != before
        ]

    def __bool__(self) -> bool:
        """Whether anything is guarded (after the step: including generators that drew)."""
        return bool(self.in_place or self.attributes or self._generators_drawn())

    def settle(self, *checks: torch.Tensor) -> None:
        """After a step: keep its state when the ``checks`` (the batch, the output) and all
        the new guarded state are finite, else put the saved state back. One finiteness flag
        on the device of ``checks[0]``, no host synchronisation (see the class docstring)."""
        device = checks[0].device
        with torch.no_grad():
            flats = [_flatten(tensors) if tensors[0].device == device else None for tensors, _ in self.groups]
            tested = [c.detach() for c in checks if c.is_floating_point() and c.device == device]
            tested += [f for f in flats if f is not None and f.is_floating_point()]
            for method, name, _, _ in self.attributes:
                tested += [t.detach() for t in _flat(getattr(method, name, None)) if t.is_floating_point() and t.device == device]
            ok = torch.stack([torch.isfinite(t).all() for t in tested]).all() if tested else torch.ones((), dtype=torch.bool, device=device)
            self._restore(ok, flats)

    def restore(self, ok: torch.Tensor) -> None:
        """Keep the new state where ``ok`` (a 0-d bool tensor) holds, else the saved one."""
        with torch.no_grad():
            self._restore(ok, [None] * len(self.groups))

    def _restore(self, ok: torch.Tensor, flats: list[torch.Tensor | None]) -> None:
        for (tensors, saved), flat in zip(self.groups, flats):
            if tensors[0].device == ok.device:
                kept = torch.where(ok, flat if flat is not None else _flatten(tensors), saved)
            elif not bool(ok):  # tensors on another device (e.g. CPU step counts)
                kept = saved
            else:
                continue
            parts = kept.split([t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [part.view(t.shape) for part, t in zip(parts, tensors)])
        for method, name, saved, layout in self.attributes:
            new = getattr(method, name, None)
            if _layout(new) == layout and all(t.device == ok.device for t in _flat(new)):
                setattr(method, name, _zip_tensors(new, saved, lambda a, b: torch.where(ok, a, b) if a.is_floating_point() else a))
            elif not bool(ok):
                setattr(method, name, saved)
        drawn = self._generators_drawn()
        # a method that drew random numbers in this step: the stream rewinds on a bad batch
        # (a host decision, so only on steps that drew)
        if drawn and not bool(ok):
            for generator, saved_state in drawn:
                generator.set_state(saved_state)


# -- the method base class ------------------------------------------------------------------
@dataclasses.dataclass
class NoHparams:
    """A method without hyperparameters."""


class Method:
    """Base class of adaptation methods. Subclasses set ``name``, ``role`` and ``Hparams``;
    see the module docstring for the contract."""

    name: ClassVar[str]
    role: ClassVar[str] = NONE
    Hparams: ClassVar[type] = NoHparams
    #: statistics method an objective method runs on when used alone (TENT: "norm")
    default_statistics: ClassVar[str | None] = None
    #: whether S independent streams can share one batched forward
    supports_streams: ClassVar[bool] = False

    def __init__(self, num_streams: int = 1, **hparams: Any) -> None:
        hparams = check_hparams(self.name, self.Hparams, hparams)
        if num_streams != 1 and not self.supports_streams:
            raise ValueError(f"method {self.name!r} does not support num_streams > 1")
        self.num_streams = num_streams
        self.hparams = self.Hparams(**hparams)
        self._state_names: list[str] = []
        self._generator: torch.Generator | None = None
        self._device_generators: dict[str, torch.Generator] = {}
        self._seed = DEFAULT_SEED
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ``ValueError`` naming the bad hyperparameter."""

    # -- conversion and steps ---------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The prediction :meth:`step` would return, without changing any state.

        Methods with an optimizer forward with autograd enabled, as their step does, so the
        same kernels run and the result is bit-identical to the step's prediction."""
        with torch.set_grad_enabled(bool(self.optimizers())):
            return model(x).detach()

    @property
    def episodic(self) -> bool:
        """Whether the wrapper restores the initial state before every batch."""
        return bool(getattr(self.hparams, "episodic", False))

    # -- registered state -------------------------------------------------------------------
    def register_state(self, *names: str) -> None:
        """Declare attributes holding method state (see the module docstring)."""
        for name in names:
            if name not in self._state_names:
                self._state_names.append(name)

    def registered_state(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in getattr(self, "_state_names", [])}

    def guard(self) -> StateGuard:
        """Snapshot of the guarded state before a step (see :class:`StateGuard`)."""
        return StateGuard(self.parts())

    def make_optimizer(
        self, params: Iterable[nn.Parameter], optimizer: Callable[..., torch.optim.Optimizer], **kwargs: Any
    ) -> MasterOptimizer:
        """``optimizer(params, **kwargs)`` on fp32 masters of half-precision ``params``."""
        return MasterOptimizer(params, optimizer, **kwargs)

    def optimizers(self) -> list[MasterOptimizer | torch.optim.Optimizer]:
        return [v for v in self.registered_state().values() if isinstance(v, (MasterOptimizer, torch.optim.Optimizer))]

    def parts(self) -> list["Method"]:
        """The methods whose state this one holds (itself; both parts of a composition)."""
        return [self]

    def guarded_tensors(self) -> list[torch.Tensor]:
        """Floating tensors updated in place that the non-finite guard restores when a batch is
        bad: the registered optimizers' parameters, masters and state, and the registered
        modules' parameters and buffers. (Registered plain tensors and containers of tensors
        are guarded by attribute, see :class:`StateGuard`.)"""
        seen: set[int] = set()
        found: list[torch.Tensor] = []
        for value in self.registered_state().values():
            if isinstance(value, torch.optim.Optimizer):
                tensors = [p for g in value.param_groups for p in g["params"]]
                tensors += [t for s in value.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            elif isinstance(value, (MasterOptimizer, nn.Module)):
                tensors = list(_iter_tensors(value))
            else:
                continue
            for tensor in tensors:
                if id(tensor) not in seen and tensor.is_floating_point():
                    seen.add(id(tensor))
                    found.append(tensor)
        return found

    def extra_state(self) -> dict[str, Any]:
        """State that is not in the module state dict: the registered state and the
        generators' states (snapshots; later steps do not mutate them)."""
        state = {name: _snapshot(value) for name, value in self.registered_state().items()}
        if self._generator is not None:
            state["__generator__"] = self._generator.get_state()
        for device, generator in self._device_generators.items():
            state[f"__generator__{device}"] = generator.get_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        for name, saved in state.items():
            if name == "__generator__":
                self.generator.set_state(saved)
                continue
            if name.startswith("__generator__"):
                self.generator_on(torch.device(name[len("__generator__"):])).set_state(saved)
                continue
            if name not in self._state_names:
                continue
            current = getattr(self, name, None)
            if isinstance(current, (MasterOptimizer, torch.optim.Optimizer)):
                if saved is not None:  # a plain optimizer state dict: saved before this format
                    current.load_state_dict(copy.deepcopy(saved.get("__optimizer__", saved)))
            elif isinstance(current, nn.Module):
                current.load_state_dict(saved.get("__module__", saved))
            elif isinstance(current, torch.Generator):
                current.set_state(saved.get("__generator__", saved) if isinstance(saved, dict) else saved)
            else:
                restored = copy.deepcopy(saved)
                if isinstance(current, torch.Tensor) and restored is None:
                    continue  # saved before the state existed: keep the initial value
                if isinstance(current, torch.Tensor) and isinstance(restored, torch.Tensor):
                    restored = restored.to(current.device)
                setattr(self, name, restored)

    def follow_device(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called by the wrapper's ``.to()``/``.half()``/``.cuda()`` with the conversion ``fn``
        before the model converts: registered modules convert with ``fn`` like the model,
        optimizers follow their parameters (:meth:`MasterOptimizer.follow`), other registered
        tensors move to the new device and keep their dtype (fp32 state stays fp32)."""
        for name, value in self.registered_state().items():
            if isinstance(value, MasterOptimizer):
                value.follow(fn)
            elif isinstance(value, torch.optim.Optimizer):
                for state in value.state.values():
                    for key, item in state.items():
                        if isinstance(item, torch.Tensor) and not (key == "step" and item.device.type == "cpu"):
                            state[key] = item.to(_target(fn, item).device)
            elif isinstance(value, nn.Module):
                value._apply(fn)
            else:
                setattr(self, name, _map_tensors(value, lambda t: t.to(_target(fn, t).device)))

    # -- randomness -------------------------------------------------------------------------
    def set_seed(self, seed: int) -> None:
        self._seed = int(seed)
        self._generator = None
        self._device_generators = {}

    def share_generator(self, other: "Method") -> None:
        """Draw from ``other``'s generators (the parts of a composition share one stream)."""
        self._seed = other._seed
        self._generator = other.generator
        self._device_generators = other._device_generators

    @property
    def generator(self) -> torch.Generator:
        """A CPU generator seeded per wrapper (``tta.adapt(..., seed=...)``)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self._seed)
        return self._generator

    def generators(self) -> list[torch.Generator]:
        """The generators created so far (the CPU one and any device ones)."""
        found = [self._generator] if self._generator is not None else []
        return found + list(self._device_generators.values())

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        """A generator on ``device`` (the CPU one for the CPU), seeded per wrapper."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.generator
        key = str(device)
        if key not in self._device_generators:
            self._device_generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._device_generators[key]

    def describe(self) -> str:
        fields = dataclasses.asdict(self.hparams)
        inner = ", ".join(f"{key}={value!r}" for key, value in fields.items())
        return f"{self.name}({inner})"


def require_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
