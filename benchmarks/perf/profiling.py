"""torch.profiler checks of the adaptation hot path.

* :func:`profile_step` (one profiled run per method):
  * operators that force a host-device synchronisation on CUDA (``aten::item`` /
    ``_local_scalar_dense``, ``is_nonzero``, data-dependent shapes such as ``nonzero`` /
    ``masked_select`` / ``unique``, ``equal``) and, on CUDA, the synchronising runtime
    calls. These operators are recorded on the CPU too, so the check runs without a GPU;
  * leaf ATen operators per step, a device-independent proxy for kernel launches (what
    dominates small batches on a GPU);
  * the profiler's operator table.
* :func:`memory_growth`: resident memory, live tensors and (on CUDA) allocated bytes over a
  long stream.
* :func:`compile_speedup`: ``torch.compile`` of the adapted model vs eager.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from collections import Counter
from typing import Any, Callable

import torch

from benchmarks.perf.timing import paired_ratio, synchronize, time_interleaved

#: operators whose CUDA implementation waits for the device (value read back to the host or
#: an output shape that depends on the data)
SYNC_OPS = frozenset(
    {
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::unique_dim",
        "aten::equal",
        "aten::allclose",
    }
)
#: operators that launch no kernel (views and allocation), not counted in ``ops``
METADATA_OPS = frozenset(
    "aten::" + name
    for name in (
        "view", "_unsafe_view", "as_strided", "reshape", "unflatten", "flatten", "transpose", "t",
        "permute", "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow",
        "detach", "alias", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg",
        "result_type", "chunk", "split", "unbind", "contiguous", "to", "lift_fresh", "view_as",
    )
)
#: CUDA runtime calls that block the host
SYNC_RUNTIME = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})


def _activities(device: torch.device) -> list[Any]:
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


def _profile(call: Callable[[], object], device: torch.device, steps: int, *, sync: bool = True) -> Any:
    from torch.profiler import profile

    with profile(activities=_activities(device)) as prof:
        for _ in range(steps):
            call()
        if sync:
            synchronize(device)
    return prof


def _inside_kernel_op(event: Any) -> bool:
    """Whether an enclosing ATen operator (other than a metadata one) already counts."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and parent.name not in METADATA_OPS:
            return True
        parent = parent.cpu_parent
    return False


def profile_step(call: Callable[[], object], device: torch.device, steps: int = 2, rows: int = 12) -> dict[str, Any]:
    """One profiled run of ``steps`` calls (after one unprofiled call), summarised as

    * ``syncs``: ``{operator or CUDA runtime call: count per call}`` of synchronising events
      (empty: none);
    * ``ops``: ATen operators called from Python per call, without metadata-only ones
      (views, ``empty``): about the kernels launched per step on a GPU;
    * ``table``: the profiler's operator table, by self time.
    """
    call()
    synchronize(device)
    prof = _profile(call, device, steps, sync=False)  # no synchronize of ours inside the window
    counts: Counter[str] = Counter()
    launches = 0
    for event in prof.events():
        name = event.name
        if name in SYNC_OPS or name in SYNC_RUNTIME:
            counts[name] += 1
        if name.startswith("aten::") and name not in METADATA_OPS and not _inside_kernel_op(event):
            launches += 1
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {
        "syncs": {name: count / steps for name, count in sorted(counts.items())},
        "ops": launches / steps,
        "table": prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40),
    }


def host_sync_ops(call: Callable[[], object], device: torch.device, steps: int = 2) -> dict[str, float]:
    """Synchronising events per call (see :func:`profile_step`); ``{}`` when there are none."""
    return profile_step(call, device, steps)["syncs"]


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            return float(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return float(psutil.Process().memory_info().rss)
        except ImportError:
            return float("nan")


def _live_tensors() -> tuple[int, int]:
    count = size = 0
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if isinstance(obj, torch.Tensor):
                count += 1
                size += obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
        except Exception:  # noqa: BLE001 - odd objects in gc lists
            continue
    return count, size


def memory_growth(call: Callable[[], object], device: torch.device, steps: int = 500, warmup: int = 20, samples: int = 5) -> dict[str, Any]:
    """Resident memory, live tensors and CUDA allocation over ``steps`` calls after a warm-up."""
    for _ in range(warmup):
        call()
    synchronize(device)
    gc.collect()
    tensors0, tensor_bytes0 = _live_tensors()
    rss = [_rss_bytes()]
    cuda0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else float("nan")
    every = max(1, steps // samples)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        call()
        if step % every == 0:
            synchronize(device)
            rss.append(_rss_bytes())
    synchronize(device)
    seconds = time.perf_counter() - start
    gc.collect()
    tensors1, tensor_bytes1 = _live_tensors()
    cuda1 = torch.cuda.memory_allocated(device) if device.type == "cuda" else float("nan")
    return {
        "steps": steps,
        "seconds": seconds,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "rss_growth_mib": (rss[-1] - rss[0]) / 2**20,
        "live_tensors": [tensors0, tensors1],
        "live_tensor_mib": [tensor_bytes0 / 2**20, tensor_bytes1 / 2**20],
        "cuda_allocated_growth_mib": (cuda1 - cuda0) / 2**20,
    }


def compile_speedup(
    build: Callable[[], torch.nn.Module],
    x: torch.Tensor,
    device: torch.device,
    *,
    repeats: int = 5,
    min_time: float = 0.2,
    check_steps: int = 3,
    plain: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Eager vs ``torch.compile`` of the adapted model's network (``adapted.model.compile()``,
    in place, so the wrapper, its state dict and the deferred commit are unchanged).

    ``build()`` must return identical fresh ``tta.Adapted`` models (seed inside it). The
    first ``check_steps`` steps of both are compared (outputs and state dicts); the first
    compiled step includes the compilation. With ``plain`` (the source network in eval
    mode), its compiled inference is timed too: the baseline of the compiled ratio.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = build(), build()
    compiled.model.compile()
    max_out = 0.0
    compile_seconds = float("nan")
    for step in range(check_steps):
        a = eager(x)
        start = time.perf_counter()
        b = compiled(x)
        synchronize(device)
        if step == 0:
            compile_seconds = time.perf_counter() - start
        max_out = max(max_out, float((a.float() - b.float()).abs().max()))
    max_state = 0.0
    compiled_state = compiled.state_dict()
    for key, value in eager.state_dict().items():
        other = compiled_state.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and isinstance(other, torch.Tensor):
            max_state = max(max_state, float((value.float() - other.float()).abs().max()))
    calls: dict[str, Callable[[], object]] = {"eager": lambda: eager(x), "compiled": lambda: compiled(x)}
    if plain is not None:  # the same network compiled for plain inference: the compiled baseline
        plain_compiled = torch.compile(plain)

        def run_plain() -> object:
            with torch.inference_mode():
                return plain_compiled(x)

        calls["plain_compiled"] = run_plain
    timings = time_interleaved(calls, device, repeats=repeats, warmup=2, min_time=min_time)
    breaks = torch._dynamo.utils.counters.get("graph_break", {})
    extra = {}
    if plain is not None:
        extra = {
            "plain_compiled_seconds": timings["plain_compiled"].median,
            "compiled_ratio_vs_compiled_plain": paired_ratio(timings["compiled"], timings["plain_compiled"]),
        }
    return {
        **extra,
        "compile_seconds": compile_seconds,
        "eager_seconds": timings["eager"].median,
        "compiled_seconds": timings["compiled"].median,
        "speedup": 1.0 / paired_ratio(timings["compiled"], timings["eager"]),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": sorted({str(reason)[:160] for reason in breaks})[:5],
        "max_output_diff": max_out,
        "max_state_diff": max_state,
    }
