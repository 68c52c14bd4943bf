"""The challenge's figures (balanced accuracy from classes, AUC from P(atypical)) and the threshold choice."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """(sensitivity + specificity) / 2, with atypical = 1 as the positive class."""
    labels = np.asarray(labels).astype(bool)
    preds = np.asarray(preds).astype(bool)
    sensitivity = preds[labels].mean() if labels.any() else 0.0
    specificity = (~preds[~labels]).mean() if (~labels).any() else 0.0
    return float((sensitivity + specificity) / 2)


def summarize(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels).astype(int)
    preds = np.asarray(probs) >= threshold
    both_classes = len(np.unique(labels)) == 2
    return {
        "balanced_accuracy": balanced_accuracy(labels, preds),
        "sensitivity": float(preds[labels == 1].mean()) if (labels == 1).any() else float("nan"),
        "specificity": float((~preds[labels == 0]).mean()) if (labels == 0).any() else float("nan"),
        "roc_auc": float(roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "threshold": float(threshold),
        "n": len(labels),
    }


def choose_threshold(labels: np.ndarray, probs: np.ndarray, domains: np.ndarray | None = None) -> float:
    """The threshold that maximizes balanced accuracy under the rule ``atypical iff p >= t``.

    With ``domains``, it maximizes the mean of the per-domain balanced accuracies instead, so that no scanner's
    figures dominate the choice. Candidates are midpoints between consecutive distinct probabilities, so the cut
    sits in a gap rather than on an example. Ties go to the candidate closest to 0.5.
    """
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    values = np.unique(probs)
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], 2.0)]])
    candidates = np.clip(candidates, 0.0, 1.0)
    groups = [np.ones(len(labels), bool)] if domains is None else [domains == d for d in np.unique(domains)]
    scores = np.array([np.mean([balanced_accuracy(labels[g], probs[g] >= t) for g in groups]) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
