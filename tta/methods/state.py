"""Method state: declared once on the method class, then saved, moved and guarded from there.

Everything outside the model that a step can change (tensors, counters, flags, memory
banks, optimizers, teacher modules) is declared as a class attribute with :func:`state`::

    class MyMethod(Method):
        optimizer = state(None)                       # set in convert()
        bank = state(lambda m: torch.zeros(0))       # a factory gets the method (its hparams)
        seen = state(0)                               # plain values are state too

Each instance gets its own values (``Method.__init__`` calls the factories; plain defaults
are immutable), read and written as ordinary attributes (``self.seen += 1``). A declared value
is one of:

* a tensor, a plain value (int, float, bool, str, None) or a list/tuple/dict of them;
* a :class:`~tta.methods.optim.MasterOptimizer` or ``torch.optim.Optimizer``, an
  ``nn.Module`` or a ``torch.Generator``;
* a host-side object with ``state_dict()`` (fresh tensors and plain values) and
  ``load_state_dict()``, such as RoTTA's memory bank.

From the declaration alone the method's state is

* saved and restored: :func:`snapshot` gives tensors and plain containers only, so a saved
  ``state_dict()`` loads with ``torch.load(..., weights_only=True)`` (:func:`load_into`);
* moved by ``.to()``/``.half()`` (:func:`follow_conversion`);
* guarded (:class:`StateGuard`): a step that raises, or a batch whose input, output or new
  state holds NaN/Inf, leaves all of it as it was.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from tta.methods.optim import MasterOptimizer, conversion_target

_MUTABLE = (list, dict, set, torch.Tensor)


class StateField:
    """A declared piece of method state (see the module docstring); a data descriptor whose
    values live in the instance's ``_state`` dict."""

    def __init__(self, initial: Any) -> None:
        if isinstance(initial, _MUTABLE):
            raise TypeError("a mutable initial state value would be shared by all instances; pass a factory (lambda m: ...)")
        self.initial = initial
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, method: Any, owner: type | None = None) -> Any:
        if method is None:
            return self
        try:
            return method.__dict__["_state"][self.name]
        except KeyError:
            raise AttributeError(f"state {self.name!r} of {type(method).__name__} is not initialised") from None

    def __set__(self, method: Any, value: Any) -> None:
        method.__dict__.setdefault("_state", {})[self.name] = value

    def fresh(self, method: Any) -> Any:
        """The initial value for ``method``."""
        return self.initial(method) if callable(self.initial) else self.initial


def state(initial: Any = None) -> Any:
    """Declare method state: ``initial`` is an immutable value or a factory ``method -> value``
    (called in ``Method.__init__``, after the hyperparameters are set)."""
    return StateField(initial)


@functools.lru_cache(maxsize=None)
def declared_fields(cls: type) -> tuple[StateField, ...]:
    """The state declared on ``cls`` and its bases, base classes first."""
    fields: dict[str, StateField] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, StateField):
                fields.pop(name, None)
                fields[name] = value
    return tuple(fields.values())


# -- kinds of values ------------------------------------------------------------------------
def _is_optimizer(value: Any) -> bool:
    return isinstance(value, (MasterOptimizer, torch.optim.Optimizer))


def _is_object(value: Any) -> bool:
    """A host-side object that saves itself (``state_dict``/``load_state_dict``)."""
    return (
        not isinstance(value, (nn.Module, torch.Generator, torch.Tensor))
        and not _is_optimizer(value)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def _is_tree(value: Any) -> bool:
    """Tensors, plain values and containers of them (compared and combined leaf by leaf)."""
    return not (_is_optimizer(value) or _is_object(value) or isinstance(value, (nn.Module, torch.Generator)))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(value, fn) for value in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(value, fn) for value in obj)
    return obj


def tree_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tree_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tree_tensors(value)


def in_place_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors of an optimizer (parameters, masters, state) or a module (parameters and
    buffers), which steps update in place."""
    if isinstance(value, MasterOptimizer):
        return value.tensors()
    if isinstance(value, torch.optim.Optimizer):
        tensors = [p for g in value.param_groups for p in g["params"]]
        return tensors + [t for s in value.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if isinstance(value, nn.Module):
        return [*value.parameters(), *value.buffers()]
    return []


def _layout(obj: Any) -> Any:
    """The structure of a tree: tensor shapes, dtypes and devices, and the plain values."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return {key: _layout(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_layout(value) for value in obj])
    return ("value", type(obj).__name__, obj)


def _same(a: Any, b: Any) -> bool:
    """Whether two snapshots of plain values and (host) tensors are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _zip_where(ok: torch.Tensor, new: Any, saved: Any) -> Any:
    if isinstance(new, torch.Tensor):
        return torch.where(ok, new, saved)
    if isinstance(new, dict):
        return {key: _zip_where(ok, value, saved[key]) for key, value in new.items()}
    if isinstance(new, (list, tuple)):
        return type(new)(_zip_where(ok, a, b) for a, b in zip(new, saved))
    return new


def _optimizer_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The plain part of an optimizer (its groups' settings, e.g. the learning rate)."""
    # the settings are numbers, flags and tuples: a shallow copy is a snapshot
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _load_optimizer_settings(optimizer: Any, settings: list[dict[str, Any]]) -> None:
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)


# -- saving, loading, moving ----------------------------------------------------------------
def snapshot(value: Any) -> Any:
    """``value`` as tensors and plain containers (copies; later steps do not change them)."""
    if _is_optimizer(value) or isinstance(value, nn.Module):
        return copy.deepcopy(value.state_dict())
    if isinstance(value, torch.Generator):
        return value.get_state()
    if _is_object(value):
        return value.state_dict()
    return copy.deepcopy(map_tensors(value, lambda t: t.detach()))


def load_into(method: Any, name: str, saved: Any) -> None:
    """Restore the declared value ``name`` of ``method`` from its :func:`snapshot`."""
    current = getattr(method, name, None)
    if _is_optimizer(current):
        if saved is not None:
            current.load_state_dict(copy.deepcopy(saved))
    elif isinstance(current, nn.Module):
        current.load_state_dict(saved)
    elif isinstance(current, torch.Generator):
        current.set_state(saved)
    elif _is_object(current):
        current.load_state_dict(saved)
    else:
        restored = copy.deepcopy(saved)
        if isinstance(current, torch.Tensor) and isinstance(restored, torch.Tensor):
            restored = restored.to(current.device)
        setattr(method, name, restored)


def follow_conversion(method: Any, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Move the declared value ``name`` along a ``Module._apply`` conversion ``fn``: modules
    convert like the model, optimizers follow their parameters, other tensors move to the new
    device and keep their dtype (fp32 state stays fp32)."""
    value = getattr(method, name, None)
    if isinstance(value, MasterOptimizer):
        value.follow(fn)
    elif isinstance(value, torch.optim.Optimizer):
        for entry in value.state.values():
            for key, item in entry.items():
                if isinstance(item, torch.Tensor) and not (key == "step" and item.device.type == "cpu"):
                    entry[key] = item.to(conversion_target(fn, item).device)
    elif isinstance(value, nn.Module):
        value._apply(fn)
    elif _is_tree(value):
        setattr(method, name, map_tensors(value, lambda t: t.to(conversion_target(fn, t).device)))


# -- the guard ------------------------------------------------------------------------------
def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class StateGuard:
    """What :class:`tta.Adapted` uses to undo a step: all declared state of every part of a
    method, snapshotted before the step.

    * Tensors updated in place (optimizer parameters, masters and state; declared modules;
      :meth:`Method.guarded_tensors`) are copied into one flat tensor per device and dtype.
    * Declared trees (tensors of any dtype, plain values, containers) are kept as detached
      copies; plain parts of optimizers (their groups' settings) and host-side objects
      (``state_dict()``) as snapshots; the generators' states as bytes.

    :meth:`rollback` (the step raised) puts everything back. :meth:`settle` (the step
    succeeded) tests the batch, the output and the new floating state for NaN/Inf in one flag
    on the device and keeps, element by element, ``where(ok, new, saved)``: a handful of
    kernels for the in-place tensors, one ``where`` per tensor of a tree. No host
    synchronisation, except where the step changed something that lives on the host or
    cannot be combined by ``where``: a plain value (a counter, a flag, a memory bank's
    metadata, an optimizer setting), a tree whose layout changed (a bank that grew), a
    tensor on another device than the flag, or a generator that drew. Only then does the
    decision read the flag (one synchronisation on that step; none on the CPU).
    """

    def __init__(self, methods: Sequence[Any]) -> None:
        in_place: list[torch.Tensor] = []
        seen: set[int] = set()
        for method in methods:
            for tensor in method.guarded_tensors():
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    in_place.append(tensor)
        self.trees: list[tuple[Any, str, Any, Any]] = []
        self.objects: list[tuple[Any, Any, Callable[[Any], Any], Callable[[Any, Any], None]]] = []
        generators = {id(g): g for m in methods for g in m.generators()}
        generators.update({id(v): v for m in methods for v in m.declared_state().values() if isinstance(v, torch.Generator)})
        self.generators = [(g, g.get_state()) for g in generators.values()]
        self._drawn = [bytes(saved.numpy()) for _, saved in self.generators]
        self._failed: bool | None = None
        with torch.no_grad():
            # one flat copy per (device, dtype): a step's restore is then a handful of kernels
            # (cat, where, one foreach copy) instead of two per tensor
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for tensor in in_place:
                groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
            self.groups = [(tensors, _flatten(tensors)) for tensors in groups.values()]
            for method in methods:
                for name, value in method.declared_state().items():
                    if _is_optimizer(value):
                        self.objects.append((value, _optimizer_settings(value), _optimizer_settings, _load_optimizer_settings))
                    elif _is_object(value):
                        self.objects.append((value, value.state_dict(), type(value).state_dict, type(value).load_state_dict))
                    elif _is_tree(value):
                        saved = map_tensors(value, lambda t: t.detach().clone())
                        self.trees.append((method, name, saved, _layout(value)))

    def __bool__(self) -> bool:
        """Whether anything is guarded (after the step: including generators that drew)."""
        return bool(self.groups or self.trees or self.objects or self._generators_drawn())

    def _generators_drawn(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        # compared as bytes on the host: generator states are CPU tensors, and no operator
        # needs to run for methods that draw nothing during a step
        return [
            (generator, saved)
            for (generator, saved), before in zip(self.generators, self._drawn)
            if bytes(generator.get_state().numpy()) != before
        ]

    def rollback(self) -> None:
        """After a step that raised: put every guarded value back."""
        with torch.no_grad():
            for tensors, saved in self.groups:
                parts = saved.split([t.numel() for t in tensors])
                torch._foreach_copy_(tensors, [part.view(t.shape) for part, t in zip(parts, tensors)])
        for method, name, saved, _ in self.trees:
            setattr(method, name, saved)
        for value, saved, _, load in self.objects:
            load(value, saved)
        for generator, saved in self._generators_drawn():
            generator.set_state(saved)

    def settle(self, *checks: torch.Tensor) -> None:
        """After a successful step: keep its state when the ``checks`` (the batch, the output)
        and all the new guarded state are finite, else put the saved state back. One
        finiteness flag on the device of ``checks[0]`` (see the class docstring)."""
        device = checks[0].device
        with torch.no_grad():
            flats = [_flatten(tensors) if tensors[0].device == device else None for tensors, _ in self.groups]
            tested = [c.detach() for c in checks if c.is_floating_point() and c.device == device]
            tested += [f for f in flats if f is not None and f.is_floating_point()]
            for method, name, _, _ in self.trees:
                tested += [t.detach() for t in tree_tensors(getattr(method, name, None)) if t.is_floating_point() and t.device == device]
            ok = torch.stack([torch.isfinite(t).all() for t in tested]).all() if tested else torch.ones((), dtype=torch.bool, device=device)
            self._keep_where(ok, flats)

    def _failed_on_host(self, ok: torch.Tensor) -> bool:
        """``not ok``, read on the host once (the synchronisation of the class docstring)."""
        if self._failed is None:
            self._failed = not bool(ok)
        return self._failed

    def _keep_where(self, ok: torch.Tensor, flats: list[torch.Tensor | None]) -> None:
        for (tensors, saved), flat in zip(self.groups, flats):
            if flat is not None:
                kept = torch.where(ok, flat, saved)
            elif self._failed_on_host(ok):  # tensors on another device (e.g. CPU step counts)
                kept = saved
            else:
                continue
            parts = kept.split([t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [part.view(t.shape) for part, t in zip(parts, tensors)])
        for method, name, saved, layout in self.trees:
            new = getattr(method, name, None)
            leaves = list(tree_tensors(new))
            if _layout(new) == layout and all(t.device == ok.device for t in leaves):
                if leaves:  # plain values are part of the layout: only tensors can differ
                    setattr(method, name, _zip_where(ok, new, saved))
            elif self._failed_on_host(ok):
                setattr(method, name, saved)
        for value, saved, save, load in self.objects:
            if not _same(save(value), saved) and self._failed_on_host(ok):
                load(value, saved)
        drawn = self._generators_drawn()
        # a method that drew random numbers in this step: the stream rewinds on a bad batch
        if drawn and self._failed_on_host(ok):
            for generator, saved in drawn:
                generator.set_state(saved)
