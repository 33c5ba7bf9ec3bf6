"""Test-time streams: domain schedules, label orders and Si-Blurry task splits (docs/METHODS.md §9).

Typical use::

    from benchmarks.streams import StreamConfig, build_stream

    stream = build_stream(StreamConfig(dataset="digits", schedule="continual", batch_size=64))
    for batch in stream:
        ...  # batch.images, batch.labels, batch.reset, batch.domain, batch.severity
"""

from benchmarks.streams.config import (
    CLEAN_DOMAINS,
    GRADUAL_SEVERITIES,
    LABEL_ORDERS,
    SCHEDULES,
    STANDARD_DOMAINS,
    StreamConfig,
    from_setting,
    split_by_domain,
)
from benchmarks.streams.label_order import (
    class_temporal_order,
    dirichlet_chunks,
    dirichlet_order,
    iid_order,
    label_runs,
    long_tailed_counts,
    long_tailed_subset,
    mean_run_length,
    official_order,
    order_labels,
    segment_order,
    sorted_order,
)
from benchmarks.streams.plan import StreamPlan, plan_stream
from benchmarks.streams.schedule import Segment, build_segments
from benchmarks.streams.si_blurry import BlurrySplit, si_blurry_split, si_blurry_tasks
from benchmarks.streams.sources import DomainSource, FileSource, GeneratedSource, resolve_source
from benchmarks.streams.stream import Batch, Stream, build_domain_streams, build_stream

__all__ = [
    "CLEAN_DOMAINS",
    "GRADUAL_SEVERITIES",
    "LABEL_ORDERS",
    "SCHEDULES",
    "STANDARD_DOMAINS",
    "Batch",
    "BlurrySplit",
    "DomainSource",
    "FileSource",
    "GeneratedSource",
    "Segment",
    "Stream",
    "StreamConfig",
    "StreamPlan",
    "build_domain_streams",
    "build_segments",
    "build_stream",
    "class_temporal_order",
    "dirichlet_chunks",
    "dirichlet_order",
    "from_setting",
    "iid_order",
    "label_runs",
    "long_tailed_counts",
    "long_tailed_subset",
    "mean_run_length",
    "official_order",
    "order_labels",
    "plan_stream",
    "resolve_source",
    "segment_order",
    "si_blurry_split",
    "si_blurry_tasks",
    "sorted_order",
    "split_by_domain",
]
