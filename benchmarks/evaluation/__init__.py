"""Online evaluation: predict-then-adapt error, calibration, throughput and memory (§9.4).

Typical use::

    from benchmarks.evaluation import evaluate, write_results
    from benchmarks.streams import StreamConfig, build_stream

    stream = build_stream(StreamConfig(dataset="digits", schedule="reset_each_shift"))
    result = evaluate(adapted_model, stream)
    write_results(result, "outputs/run")
"""

from benchmarks.evaluation.checkpoint import CheckpointMismatch, StreamCheckpoint
from benchmarks.evaluation.compute_budget import ComputeBudget
from benchmarks.evaluation.memory import PeakMemory, process_peak_rss_mb
from benchmarks.evaluation.metrics import (
    DEFAULT_ECE_BINS,
    calibration_bins,
    error_rate,
    expected_calibration_error,
    window_bounds,
    window_errors,
)
from benchmarks.evaluation.multi_stream import check_aligned, evaluate_multi_stream
from benchmarks.evaluation.online import evaluate
from benchmarks.evaluation.recorder import OnlineRecorder, SampleRecords
from benchmarks.evaluation.results import ROW_FIELDS, EvalResult
from benchmarks.evaluation.writers import rows_to_csv, write_results

__all__ = [
    "DEFAULT_ECE_BINS",
    "CheckpointMismatch",
    "ComputeBudget",
    "ROW_FIELDS",
    "EvalResult",
    "OnlineRecorder",
    "PeakMemory",
    "SampleRecords",
    "StreamCheckpoint",
    "calibration_bins",
    "check_aligned",
    "error_rate",
    "evaluate",
    "evaluate_multi_stream",
    "expected_calibration_error",
    "process_peak_rss_mb",
    "rows_to_csv",
    "window_bounds",
    "window_errors",
    "write_results",
]
