"""Evaluation metrics as AudioMAE computes them: numpy arrays in, plain floats (and dicts of them) out.

    accuracy                 single-label, argmax of the scores, percent
    mean_average_precision   multi-label, mean over classes of sklearn's average_precision_score, percent
    mean_auc                 multi-label, mean over classes of sklearn's roc_auc_score, a fraction in [0, 1]
    d_prime                  sqrt(2) * Phi^-1(AUC), from the *mean* AUC as AudioMAE does (not a mean of d')

A per-class metric is undefined for some classes of a small evaluation set: AP needs a positive, AUC
needs a positive and a negative. AudioMAE would average in a NaN (and sklearn warn); we skip those
classes and count them (`multilabel_metrics`), so a number over 480 of 527 AudioSet classes says so.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from ajepa.errors import AjepaError

# multi-label metrics reported beside mAP (AudioMAE, AST) in every metrics JSON; never selected on
SECONDARY = ("mAUC", "d_prime")

__all__ = ["SECONDARY", "secondary", "accuracy", "mean_average_precision", "mean_auc", "d_prime", "multilabel_metrics",
           "singlelabel_metrics"]


def secondary(test: dict) -> dict:
    """The SECONDARY metrics of one scored split, rounded for a JSON file; d' is infinite at mAUC 1,
    which JSON cannot hold, so a non-finite value is written as null."""
    return {k: (round(float(test[k]), 4) if math.isfinite(float(test[k])) else None)
            for k in SECONDARY if k in test}


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise AjepaError(f"scores must be 2-D [samples, classes], got shape {s.shape}")
    if s.shape[0] == 0:
        raise AjepaError("scores are empty: no samples to evaluate")
    if not np.isfinite(s).all():
        raise AjepaError(f"scores contain {int((~np.isfinite(s)).sum())} NaN or infinite values")
    return s


def _multilabel(targets, scores) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores)
    t = np.asarray(targets)
    if t.shape != s.shape:
        raise AjepaError(f"targets shape {t.shape} does not match scores shape {s.shape}")
    if not np.isin(t, (0, 1)).all():
        raise AjepaError("multi-label targets must be 0 or 1")
    return t.astype(np.int64), s


def _singlelabel(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores)
    y = np.asarray(y_true)
    if y.shape != (s.shape[0],):
        raise AjepaError(f"labels shape {y.shape} does not match scores shape {s.shape} (need [{s.shape[0]}])")
    if not np.issubdtype(y.dtype, np.integer):
        raise AjepaError(f"labels must be integer class indices, got {y.dtype}")
    if y.min() < 0 or y.max() >= s.shape[1]:
        raise AjepaError(f"labels must lie in [0, {s.shape[1]}), got {y.min()}..{y.max()}")
    return y, s


def _per_class_ap(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AP per class, NaN for classes with no positive target."""
    return np.array([average_precision_score(t[:, k], s[:, k]) if t[:, k].any() else np.nan
                     for k in range(t.shape[1])])


def _per_class_auc(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC per class, NaN for classes whose targets are all 0 or all 1."""
    return np.array([roc_auc_score(t[:, k], s[:, k]) if 0 < t[:, k].sum() < len(t) else np.nan
                     for k in range(t.shape[1])])


def _mean_defined(values: np.ndarray, what: str) -> float:
    if np.isnan(values).all():
        raise AjepaError(f"{what} is undefined for every class of this evaluation set")
    return float(np.nanmean(values))


def accuracy(y_true, scores) -> float:
    """Percent of samples whose highest score is the true class; ties go to the lowest class index."""
    y, s = _singlelabel(y_true, scores)
    return 100.0 * float(np.mean(s.argmax(axis=1) == y))


def mean_average_precision(targets, scores) -> float:
    """mAP in percent over the classes with at least one positive target (the others are skipped)."""
    t, s = _multilabel(targets, scores)
    return 100.0 * _mean_defined(_per_class_ap(t, s), "average precision")


def mean_auc(targets, scores) -> float:
    """Mean ROC AUC in [0, 1] over the classes with both positive and negative targets."""
    t, s = _multilabel(targets, scores)
    return _mean_defined(_per_class_auc(t, s), "ROC AUC")


def d_prime(auc: float) -> float:
    """Sensitivity index of an AUC: 0 at chance (0.5), +inf at 1.0 (as AudioMAE reports it)."""
    if not 0.0 <= auc <= 1.0:
        raise AjepaError(f"AUC must lie in [0, 1], got {auc}")
    return float(math.sqrt(2.0) * norm.ppf(auc))


def multilabel_metrics(targets, scores) -> dict:
    """mAP (percent), mAUC (fraction), d_prime (of mAUC) and how many classes the mAP covers.

    `classes_skipped` counts classes without a positive target (no AP); `auc_classes_skipped` counts
    those without a positive or without a negative (no AUC), a superset of the former."""
    t, s = _multilabel(targets, scores)
    ap, auc = _per_class_ap(t, s), _per_class_auc(t, s)
    m_auc = _mean_defined(auc, "ROC AUC")
    skipped = int(np.isnan(ap).sum())
    return {"mAP": 100.0 * _mean_defined(ap, "average precision"), "mAUC": m_auc, "d_prime": d_prime(m_auc),
            "classes_scored": t.shape[1] - skipped, "classes_skipped": skipped,
            "auc_classes_skipped": int(np.isnan(auc).sum()),
            "per_class_ap": [None if np.isnan(a) else round(100.0 * float(a), 3) for a in ap]}


def singlelabel_metrics(y_true, scores, num_classes: int) -> dict:
    """Accuracy (percent) and the confusion matrix (rows: true class, columns: predicted) as lists."""
    y, s = _singlelabel(y_true, scores)
    if s.shape[1] != num_classes:
        raise AjepaError(f"scores have {s.shape[1]} classes, expected {num_classes}")
    confusion = confusion_matrix(y, s.argmax(axis=1), labels=np.arange(num_classes))
    return {"accuracy": accuracy(y, s), "confusion": confusion.tolist()}
