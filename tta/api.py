"""The user-facing entry point: ``model = tta.adapt(model)``."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from tta.input_check import InputCheck, make_input_check
from tta.layers.base import AdaptiveNorm, commit_layers
from tta.layers.bcn import BatchChannelNorm2d
from tta.methods.balanced_bn import infer_num_classes
from tta.methods.base import DEFAULT_SEED, Method
from tta.registry import available_methods
from tta.spec import MethodSpec
from tta.surgery import find_norm_layers, is_group_or_layer_norm
from tta.validation import check_batch, infer_input_ndim, model_dtype

logger = logging.getLogger("tta")

_INFER = "infer"


def choose_method(model: nn.Module) -> tuple[str, str]:
    """The ``method="auto"`` choice for a model, with the reason.

    The rule was chosen by measurement: every candidate ran on development streams, the rule
    was picked from those alone, then scored on evaluation streams that took no part in the
    choice (``scripts/run_stream_selection.sh``, issue 25; before it
    ``scripts/run_selection.sh``; regret tables in docs/RESULTS.md and the README).

    * Batch-channel normalization layers (:class:`tta.layers.BatchChannelNorm2d`, a BCN+WS
      model): ``bcn``, best on both development streams of the BCN+WS ResNet-26 (i.i.d. and
      class-sorted CIFAR-10-C).
    * BatchNorm layers: ``follow`` (test-time BN where the stream's labels arrive in random
      order, class-balanced statistics and a prior correction of the output where they do
      not): of the candidates within 0.5 points of the source model on every development
      stream, the one with the smallest largest regret to the best method.
    * Only GroupNorm/LayerNorm: ``follow`` as well (on such models its detector and output
      correction act on the model's own output), chosen the same way on the GroupNorm
      ResNet-26's development streams.
    * ``follow`` needs the class count, read from the model's last ``nn.Linear``: without
      one, ``source``. No normalization layer, or only kinds that no selection measured:
      ``source``.

    Every choice is deterministic for a given model: none of them draws random numbers.
    """
    registered = set(available_methods())
    if "bcn" in registered and any(isinstance(module, BatchChannelNorm2d) for module in model.modules()):
        return "bcn", "the model has batch-channel normalization layers"
    has_batch_norm = bool(find_norm_layers(model))
    if has_batch_norm or any(is_group_or_layer_norm(module) for module in model.modules()):
        kind = "BatchNorm" if has_batch_norm else "GroupNorm/LayerNorm"
        try:
            infer_num_classes(model, "follow")
        except ValueError:
            return "source", f"the model has {kind} layers but no Linear classifier to read the class count from"
        return "follow", f"the model has {kind} layers"
    return "source", "the model has no normalization layer that a selection measured"


@contextlib.contextmanager
def _step_mode() -> Iterator[None]:
    """Autograd on and inference mode off for a step, whatever the caller's context (a
    method that needs no gradient disables it itself)."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        yield


class Adapted(nn.Module):
    """A model that adapts online: each ``forward(x)`` adapts on the batch and returns the
    wrapped model's output for it.

    * :meth:`reset` restores the exact state at wrap time.
    * ``state_dict()`` / ``load_state_dict()`` hold all adaptation state (statistics buffers,
      parameters and the method's optimizer state), so a restarted service continues with
      bit-identical outputs.
    * :meth:`no_adapt` predicts exactly as a step would, without changing any state.
    * Calls from several threads are serialized.
    * A failing step (bad input, an exception inside the model) leaves the state unchanged.
    * A batch whose input, output or new method state holds NaN/Inf changes nothing: the
      statistics of its streams are not committed, and the method's guarded state
      (parameters, optimizer state, declared method state; see
      :class:`tta.methods.state.StateGuard`) is put back. The step's output is returned as
      computed, so it is non-finite too. Decided on the device, without a host
      synchronisation.
    * Steps and predictions run with autograd enabled and outside ``torch.inference_mode``
      whatever the caller's context (an inference-mode batch is cloned into a normal tensor).
    * ``.to()``, ``.half()``, ``.cuda()`` move the method's state along; statistics buffers
      and fp32 master parameters keep float32.
    * ``reset_every=N`` (RDumb, Press et al., NeurIPS 2023): the whole adaptation state is put
      back to its wrap-time value before every N-th adapting step, for any method. The steps
      are counted on the device (a batch that raises or holds NaN/Inf does not count, as it
      changes no state); deciding whether to reset reads that count on the host, one
      synchronisation per step that only ``reset_every`` costs. The count is part of
      ``state_dict()``; :meth:`reset` sets it back to 0.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        *,
        num_streams: int = 1,
        input_ndim: int | None = None,
        reset_every: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_streams = num_streams
        self.input_ndim = input_ndim
        self.method_name: str = method.name
        self.auto_reason: str | None = None
        #: optional warn-once check of the input scaling (``tta.adapt(..., input_check=...)``)
        self.input_check: InputCheck | None = None
        self._lock = threading.RLock()
        self._adapting = True
        self._initial_model_state = copy.deepcopy(self.model.state_dict())
        self._initial_extra_state = copy.deepcopy(self.method.extra_state())
        if reset_every is not None and (isinstance(reset_every, bool) or not isinstance(reset_every, int) or reset_every < 1):
            raise ValueError(f"reset_every must be a positive number of steps or None, got {reset_every!r}")
        self.reset_every = reset_every
        #: adapting steps taken (finite batches only), on the device; the step of the last reset
        self._steps: torch.Tensor | None = None
        self._last_reset = 0

    # -- adaptation ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(
            x, input_ndim=self.input_ndim, dtype=model_dtype(self.model), num_streams=self.num_streams
        )
        if self.input_check is not None:
            self.input_check(x)
        with self._lock, _step_mode():
            if x.is_inference():  # served under torch.inference_mode(): a normal copy to adapt on
                x = x.clone()
            layers = self.adaptive_layers()
            if not self._adapting:
                for layer in layers:
                    layer.adapting = False
                try:
                    return self.method.predict(self.model, x)
                finally:
                    for layer in layers:
                        layer.adapting = True
            if self.method.episodic:
                self._restore_initial_state()
            elif self.reset_every is not None:
                self._reset_on_schedule()
            guard = self.method.guard()
            try:
                out = self.method.step(self.model, x)
            except BaseException:
                for layer in layers:
                    layer.discard()
                guard.rollback()
                raise
            if any(layer._pending for layer in layers):
                # a stream whose input holds NaN/Inf keeps its statistics, even where the
                # layer's statistics came out finite (robust or per-class statistics)
                commit_layers(layers, torch.isfinite(x).reshape(self.num_streams, -1).all(1))
            if guard:
                guard.settle(x, out)
            if self.reset_every is not None:
                finite = torch.isfinite(x).all() & torch.isfinite(out).all()
                count = torch.zeros((), dtype=torch.int64, device=out.device) if self._steps is None else self._steps
                self._steps = count.to(out.device) + finite.to(torch.int64)
            return out

    def _reset_on_schedule(self) -> None:
        """RDumb's periodic reset: before every ``reset_every``-th step."""
        steps = 0 if self._steps is None else int(self._steps)  # the one host read of the option
        if steps and steps % self.reset_every == 0 and steps != self._last_reset:  # type: ignore[operator]
            self._restore_initial_state()
            self._last_reset = steps

    @contextlib.contextmanager
    def no_adapt(self) -> Iterator["Adapted"]:
        """Within this context, calls predict as a step would but change no state."""
        with self._lock:
            previous, self._adapting = self._adapting, False
            try:
                yield self
            finally:
                self._adapting = previous

    def adaptive_layers(self) -> list[AdaptiveNorm]:
        return [module for module in self.model.modules() if isinstance(module, AdaptiveNorm)]

    # -- state ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Restore the exact state at wrap time (statistics, parameters, optimizer state, and
        the step count of ``reset_every``)."""
        with self._lock:
            self._restore_initial_state()
            self._steps, self._last_reset = None, 0

    def _restore_initial_state(self) -> None:
        self.model.load_state_dict(self._initial_model_state)
        self.method.load_extra_state(copy.deepcopy(self._initial_extra_state))
        for layer in self.adaptive_layers():
            layer.discard()

    def get_extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"method": self.method_name, "state": self.method.extra_state()}
        if self.reset_every is not None:
            extra["schedule"] = {"steps": 0 if self._steps is None else self._steps.detach().cpu().clone(),
                                 "last_reset": self._last_reset}
        return extra

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method_name:
            raise ValueError(
                f"state was saved from method {state.get('method')!r}, this model runs {self.method_name!r}"
            )
        self.method.load_extra_state(state["state"])
        schedule = state.get("schedule")
        if self.reset_every is not None:
            steps = schedule["steps"] if schedule else 0
            self._steps = torch.as_tensor(steps, dtype=torch.int64)
            self._last_reset = int(schedule["last_reset"]) if schedule else 0

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        with self._lock:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _apply(self, fn: Any, recurse: bool = True) -> "Adapted":
        """``.to()``, ``.half()``, ``.cuda()``...: the method's state follows the model (see
        :meth:`tta.methods.base.Method.follow_device`); statistics stay float32."""
        with self._lock:
            self.method.follow_device(fn)
            return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        every = f", reset_every={self.reset_every}" if self.reset_every is not None else ""
        return f"method={self.method.describe()}{every}"


class AutoChoice(UserWarning):
    """What ``method="auto"`` chose for a model, and why (shown once per call site)."""


def _announce_auto_choice(method: str, reason: str) -> None:
    """Tell the user what ``auto`` chose even when no logging is configured: a warning, which
    Python shows once per call site (filter :class:`AutoChoice` to silence it), and the log."""
    logger.info("tta.adapt: method='auto' chose %r (%s)", method, reason)
    warnings.warn(
        f"tta.adapt: method='auto' chose {method!r} ({reason}); model.method_name and model.auto_reason "
        f"keep the choice, pass method={method!r} to make it explicit",
        AutoChoice,
        stacklevel=3,
    )


def adapt(
    model: nn.Module,
    method: str | MethodSpec = "auto",
    *,
    inplace: bool = False,
    num_streams: int = 1,
    input_ndim: int | None | str = _INFER,
    seed: int = DEFAULT_SEED,
    input_check: str | None = None,
    reset_every: int | None = None,
    **hparams: Any,
) -> Adapted:
    """Wrap ``model`` so that every call adapts it online.

    Args:
        model: any classifier (timm, torchvision or a user's ``nn.Module``).
        method: a name from :func:`tta.available_methods`, a composition
            ``"<statistics>+<method>"`` such as ``"unmix_tns+tent"``, ``"auto"`` (chosen
            from the model's normalization layers and announced with an :class:`AutoChoice`
            warning; see :func:`choose_method`), or a parsed :class:`tta.MethodSpec` (its
            hyperparameters and stream count; then pass no ``hparams``).
        inplace: adapt ``model`` itself; by default a deep copy is adapted and the caller's
            object stays untouched.
        num_streams: S independent streams in one batched forward; each batch holds S
            equal-size sub-batches, stream-major. Statistics methods only.
        input_ndim: expected input rank, checked on every call; inferred from the first
            convolution by default, ``None`` disables the check.
        seed: seeds the wrapper's own random generator, from which methods draw any random
            state (UnMix-TNS's initial components): two wraps of one model with the same
            seed agree, and the global torch RNG is neither used nor advanced.
        input_check: ``"unit"`` (the model takes images in [0, 1] and normalizes them itself)
            or ``"normalized"`` (it takes mean/std-normalized inputs): warn once when the first
            batches look scaled otherwise, e.g. 0-255 pixels (:mod:`tta.input_check`). Off by
            default.
        reset_every: put the whole adaptation state back to its wrap-time value before every
            ``reset_every``-th adapting step (RDumb's periodic reset, for any method; RDumb
            resets every 1,000 batches); ``None`` never resets.
        **hparams: the method's hyperparameters (``<method>__<name>`` where a composition has
            the same name twice).

    Raises:
        ValueError: unknown method or hyperparameter (the message lists the valid ones), a
            hyperparameter out of range, a statistics method on a model without supported
            normalization layers.
        TypeError: ``model`` is not an ``nn.Module`` or is already an :class:`Adapted`; a
            hyperparameter of the wrong type (the message names it and the accepted values).
    """
    if isinstance(model, Adapted):
        raise TypeError(
            f"model is already adapted (method {model.method_name!r}); wrapping it again would adapt "
            "an adapting model. Re-wrap the underlying network with tta.adapt(adapted.model, ...) "
            "(it holds the adapted layers) or start over from the original model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(f"num_streams must be a positive integer, got {num_streams!r}")
    check = make_input_check(input_check)
    reason = None
    if method == "auto":
        method, reason = choose_method(model)
        _announce_auto_choice(method, reason)
    if isinstance(method, MethodSpec) and method.num_streams != num_streams:
        raise ValueError(f"the MethodSpec was parsed for num_streams={method.num_streams}, adapt got {num_streams}")
    built = MethodSpec.parse(method, hparams, num_streams=num_streams).build(seed)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    if input_ndim == _INFER:
        input_ndim = infer_input_ndim(target)
    target = built.convert(target)
    adapted = Adapted(target, built, num_streams=num_streams, input_ndim=input_ndim, reset_every=reset_every)  # type: ignore[arg-type]
    adapted.auto_reason = reason
    adapted.input_check = check
    return adapted.eval()
