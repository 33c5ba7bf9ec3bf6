"""Online error and calibration metrics on per-sample records (docs/METHODS.md §9.4).

Every function takes plain per-sample arrays, so metrics are computed once, after the
stream, from exactly the predictions made online.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ECE_BINS = 15


def error_rate(correct: np.ndarray) -> float:
    """1 - (correct predictions)/(samples), every sample counted once (§9.4); NaN if empty."""
    correct = np.asarray(correct, dtype=bool)
    return float(1.0 - correct.mean()) if correct.size else float("nan")


def calibration_bins(confidences: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> np.ndarray:
    """Bin index of each confidence for the equal-width bins (k/M, (k+1)/M], k = 0..M-1."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    # side="left" counts edges strictly below the value: a confidence equal to an edge falls
    # into the bin it closes, matching the right-closed bins of Guo et al. (2017).
    return np.searchsorted(inner_edges, np.asarray(confidences, dtype=np.float64), side="left")


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins.

    ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|, where conf is the top-class softmax
    probability (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks").
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = confidences.size
    if n == 0:
        return float("nan")
    bins = calibration_bins(confidences, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidences, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    # |sum(acc) - sum(conf)| / n per bin equals |B|/n * |acc(B) - conf(B)|.
    return float(np.abs(acc_sum - conf_sum).sum() / n) if count.sum() else float("nan")


def window_bounds(num_samples: int, window: int) -> np.ndarray:
    """Start offsets of consecutive windows of ``window`` samples, plus ``num_samples``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return np.append(np.arange(0, num_samples, window, dtype=np.int64), num_samples)


def window_errors(correct: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Online error of each window of ``window`` consecutive samples (the last may be shorter).

    Returns ``(bounds, errors)``: window ``k`` covers ``bounds[k]:bounds[k+1]``.
    """
    correct = np.asarray(correct, dtype=bool)
    bounds = window_bounds(correct.size, window)
    if correct.size == 0:
        return bounds, np.zeros(0)
    hits = np.add.reduceat(correct.astype(np.int64), bounds[:-1])
    return bounds, 1.0 - hits / np.diff(bounds)
