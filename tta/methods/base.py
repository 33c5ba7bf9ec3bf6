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

A new method is one file under ``tta/methods/`` (a ``Method`` subclass decorated with
:func:`tta.registry.register_method`), one import line in ``tta/methods/__init__.py`` and
one Hydra config ``conf/method/<name>.yaml``.

1. **Hyperparameters** are a dataclass ``Hparams`` (see :mod:`tta.hyperparams`): annotations
   give the types, :func:`tta.hyperparams.hparam` the ranges, accepted values and paper symbols,
   the ``#:`` comment above a field its description, ``__post_init__`` any check across
   fields. They are checked once, by :class:`tta.spec.MethodSpec` (``tta.adapt``, the Hydra
   app), and ``tta.hparams("<name>")`` lists them for users.

2. **Method state** (anything outside the model that a step changes: tensors, EMAs, memory
   banks, counters, flags, optimizers, teacher modules) is declared once, on the class, with
   :func:`tta.methods.state.state`::

       class MyMethod(Method):
           optimizer = state(None)                     # set in convert()
           bank = state(lambda m: torch.zeros(0))     # factories get the method
           seen = state(0)

   and is then, with nothing more to write,

   * saved and loaded by ``state_dict()`` / ``load_state_dict()`` as tensors and plain
     containers only (loads with ``torch.load(..., weights_only=True)``) and restored by
     ``reset()``;
   * guarded: a step that raises, or a batch whose input, output or new state holds
     NaN/Inf, leaves all of it (and the model's trained parameters) exactly as it was,
     decided on the device without a host synchronisation where the step changed only
     tensors (:class:`tta.methods.state.StateGuard`);
   * moved by ``adapted.to(device)`` / ``.half()``: tensors move and keep their dtype (fp32
     statistics stay fp32), optimizers follow their parameters, modules convert like the model.

   Attributes set in :meth:`convert` and never changed by a step (the trainable parameters,
   the model family, a class count) are configuration, not state. A method that changes
   model tensors outside its optimizer during a step lists them in :meth:`guarded_tensors`.

3. **Gradient methods** build their optimizer with
   :func:`tta.methods.optim.build_optimizer` (a :class:`~tta.methods.optim.MasterOptimizer`:
   fp32 master copies and fp32 state for fp16/bf16 parameters, state created up front so the
   guard never needs a host synchronisation), declare it as state, and update with
   :func:`tta.methods.optim.descend` (backward, zero non-finite gradients, step, clear).

4. **Randomness**: draw any random initial state or per-step noise from ``self.generator``
   (a CPU ``torch.Generator`` seeded by ``tta.adapt(..., seed=...)``, fixed default
   :data:`DEFAULT_SEED`; shared by the parts of a composition, drawn in conversion order),
   never from the global RNG: two wraps of one model agree and the caller's RNG stream is
   untouched. Draw on the CPU and move (``torch.randn(shape, generator=self.generator)
   .to(device)``) or use ``self.generator_on(device)`` for device-side draws. The
   generators' states are saved, restored by ``reset()`` and rewound on a bad batch.

5. **Grad mode**: the wrapper calls :meth:`step` and :meth:`predict` with autograd enabled and
   outside ``torch.inference_mode`` (an inference-mode batch is cloned into a normal tensor
   first), whatever the caller's context. Wrap pure inference in ``torch.no_grad()``
   yourself, as the default :meth:`step` does. :meth:`predict` must return exactly what
   :meth:`step` returns for the batch (run the same forward in the same grad mode); the
   default does so for methods with and without optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from tta.hyperparams import NoHparams, check_hparams
from tta.methods import state as method_state
from tta.methods.optim import MasterOptimizer

STATISTICS = "statistics"
OBJECTIVE = "objective"
OUTPUT = "output"
NONE = "none"

#: seed of the per-wrapper generator when ``tta.adapt`` gets no ``seed``
DEFAULT_SEED = 0


class Method:
    """Base class of adaptation methods. Subclasses set ``name``, ``role`` and ``Hparams`` and
    declare their state; see the module docstring for the contract."""

    name: ClassVar[str]
    role: ClassVar[str] = NONE
    Hparams: ClassVar[type] = NoHparams
    #: statistics method an objective method runs on when used alone (TENT: "norm")
    default_statistics: ClassVar[str | None] = None
    #: whether S independent streams can share one batched forward
    supports_streams: ClassVar[bool] = False
    #: what the method needs beyond an ordinary classifier, in words (None: nothing); methods
    #: that need something are left out where models are generic (``benchmarks.perf``)
    requires: ClassVar[str | None] = None
    #: the hyperparameter that takes labelled source data (an iterable of ``(inputs, labels)``
    #: batches), where the method reads some at wrap time; the Hydra app fills it from
    #: ``method.source_images``
    source_data_argument: ClassVar[str | None] = None
    #: attributes a step updates for monitoring only (nothing depends on them; not state)
    monitoring: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hparams: Any = None, *, num_streams: int = 1, **values: Any) -> None:
        """``hparams``: a checked ``Hparams`` instance (as :class:`tta.spec.MethodSpec`
        builds it), or None to check the keyword ``values`` here."""
        if hparams is None:
            hparams = self.Hparams(**check_hparams(self.name, self.Hparams, values))
        elif values:
            raise TypeError(f"method {self.name!r}: pass either an Hparams instance or keyword values")
        self.check_streams(num_streams)
        self.num_streams = num_streams
        self.hparams = hparams
        self._generator: torch.Generator | None = None
        self._device_generators: dict[str, torch.Generator] = {}
        self._seed = DEFAULT_SEED
        for field in method_state.declared_fields(type(self)):
            setattr(self, field.name, field.fresh(self))

    @classmethod
    def check_streams(cls, num_streams: int) -> None:
        if num_streams != 1 and not cls.supports_streams:
            raise ValueError(f"method {cls.name!r} does not support num_streams > 1")

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

    # -- declared state ---------------------------------------------------------------------
    def declared_state(self) -> dict[str, Any]:
        """``{name: current value}`` of the state declared on the class."""
        return dict(self.__dict__.get("_state", {}))

    def parts(self) -> list["Method"]:
        """The methods whose state this one holds (itself; both parts of a composition)."""
        return [self]

    def guard(self) -> method_state.StateGuard:
        """Snapshot of the guarded state before a step (see :class:`~tta.methods.state.StateGuard`)."""
        return method_state.StateGuard(self.parts())

    def optimizers(self) -> list[MasterOptimizer | torch.optim.Optimizer]:
        return [
            value for part in self.parts() for value in part.declared_state().values()
            if isinstance(value, (MasterOptimizer, torch.optim.Optimizer))
        ]

    def guarded_tensors(self) -> list[torch.Tensor]:
        """Tensors a step updates in place: the declared optimizers' parameters, masters and
        state, and the declared modules' parameters and buffers. Override (calling ``super()``)
        to add model tensors the method changes outside its optimizer."""
        return [t for value in self.declared_state().values() for t in method_state.in_place_tensors(value)]

    def extra_state(self) -> dict[str, Any]:
        """State that is not in the module state dict: the declared state and the generators'
        states, as tensors and plain containers (snapshots; later steps do not mutate them)."""
        saved = {name: method_state.snapshot(value) for name, value in self.declared_state().items()}
        if self._generator is not None:
            saved["__generator__"] = self._generator.get_state()
        for device, generator in self._device_generators.items():
            saved[f"__generator__{device}"] = generator.get_state()
        return saved

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        declared = self.declared_state()
        for name, value in saved.items():
            if name == "__generator__":
                self.generator.set_state(value)
            elif name.startswith("__generator__"):
                self.generator_on(torch.device(name[len("__generator__"):])).set_state(value)
            elif name in declared:
                method_state.load_into(self, name, value)

    def follow_device(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called by the wrapper's ``.to()``/``.half()``/``.cuda()`` with the conversion ``fn``
        before the model converts (see :func:`tta.methods.state.follow_conversion`)."""
        for name in self.declared_state():
            method_state.follow_conversion(self, name, fn)

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

    # -- description ------------------------------------------------------------------------
    def hparams_by_part(self) -> dict[str, dict[str, Any]]:
        """``{part name: {hyperparameter: value in use}}``, defaults included."""
        return {part.name: dataclasses.asdict(part.hparams) for part in self.parts()}

    def take_source_data(self) -> Any:
        """The source data of :attr:`source_data_argument`, taken out of the hyperparameters:
        read once at wrap time, never held; :meth:`describe` then names what it was."""
        argument = self.source_data_argument
        assert argument is not None, f"{self.name} reads no source data"
        loader = getattr(self.hparams, argument)
        setattr(self.hparams, argument, None)
        self._source_description = "none" if loader is None else type(loader).__name__
        return loader

    def describe(self) -> str:
        fields = {f.name: getattr(self.hparams, f.name) for f in dataclasses.fields(self.hparams)}
        argument = self.source_data_argument
        if argument is not None:  # a data loader is described by its type, not printed
            value = fields[argument]
            fields[argument] = getattr(self, "_source_description", None) or (
                None if value is None else type(value).__name__
            )
        inner = ", ".join(f"{key}={value!r}" for key, value in fields.items())
        return f"{self.name}({inner})"
