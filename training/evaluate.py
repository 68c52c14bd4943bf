"""The challenge's figures for a predictions file, pooled over all figures and per domain.

Input: the predictions CSV of ``training.metrics`` (``python -m training predict`` writes it, with ``pred``, the
class the container answered; or a run's ``oof.csv`` with a threshold). As the challenge scores: balanced accuracy,
sensitivity (atypical recall), specificity and accuracy from ``pred``; ROC AUC from ``prob_atypical``. Plus a 95%
bootstrap interval of the balanced accuracy, resampling figures with a seeded generator:
``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``, percentiles 2.5 and 97.5.

And, pooled and per domain, an oracle: the threshold that would maximize balanced accuracy on those very figures
and the balanced accuracy it reaches. Set against the figures at the threshold fixed in advance, it shows how much
a domain loses to calibration shift (an unseen scanner moving every probability up or down) rather than to
ranking (its AUC); each class's mean probability shows the shift itself.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from contracts import classify
from training.metrics import balanced_accuracy, choose_threshold, read_mean_predictions, scores

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _mean_where(values: np.ndarray, mask: np.ndarray) -> float:
    """The mean of ``values`` where ``mask`` holds (NaN where it never does)."""
    return float(values[mask].mean()) if mask.any() else math.nan


def domain_scores(label: np.ndarray, pred: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """``metrics.scores``, the oracle threshold's (for reference: no submission can choose it) and each class's
    mean probability."""
    positive = label == 1
    both_classes = 0 < positive.sum() < len(label)
    oracle = choose_threshold(label, prob) if both_classes else math.nan
    return {
        **scores(label, pred, prob),
        "oracle_threshold": oracle,
        "oracle_balanced_accuracy": balanced_accuracy(label, classify(prob, oracle)) if both_classes else math.nan,
        # each class's mean probability: a domain whose figures of both classes score higher than elsewhere is
        # miscalibrated, not misranked
        "mean_prob_normal": _mean_where(prob, ~positive),
        "mean_prob_atypical": _mean_where(prob, positive),
    }


def bootstrap_ci(label: np.ndarray, pred: np.ndarray, resamples: int, seed: int) -> list[float]:
    """95% percentile interval of the balanced accuracy over figure resamples (those lacking a class are skipped)."""
    idx = np.random.default_rng(seed).integers(0, len(label), size=(resamples, len(label)))
    lab, hit = label[idx] == 1, pred[idx] == label[idx]
    n_pos, n_neg = lab.sum(axis=1), (~lab).sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    sens = (hit & lab).sum(axis=1)[ok] / n_pos[ok]
    spec = (hit & ~lab).sum(axis=1)[ok] / n_neg[ok]
    lo, hi = np.percentile((sens + spec) / 2, [2.5, 97.5])
    return [float(lo), float(hi)]


def evaluate(preds: dict[str, np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    result = domain_scores(preds["label"], preds["pred"], preds["prob"])
    result["balanced_accuracy_ci"] = bootstrap_ci(preds["label"], preds["pred"], resamples, seed)
    result["domains"] = {
        str(d): domain_scores(preds["label"][m], preds["pred"][m], preds["prob"][m])
        for d in np.unique(preds["domain"])
        for m in [preds["domain"] == d]
    }
    return result


def table(result: dict) -> str:
    keys = (
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "accuracy",
        "roc_auc",
        "oracle_threshold",
        "oracle_balanced_accuracy",
        "mean_prob_normal",
        "mean_prob_atypical",
        "n",
    )
    header = {
        "oracle_balanced_accuracy": "oracle_BA",
        "mean_prob_normal": "meanP_normal",
        "mean_prob_atypical": "meanP_atypical",
    }
    lines = [f"{'':24}" + "".join(f"{header.get(k, k)[:17]:>18}" for k in keys)]
    for name, figs in [("all", result), *result["domains"].items()]:
        lines.append(f"{name[:24]:24}" + "".join(f"{figs[k]:>18.4f}" if k != "n" else f"{figs[k]:>18d}" for k in keys))
    lo, hi = result["balanced_accuracy_ci"]
    lines.append(f"balanced accuracy 95% bootstrap interval: [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines)


def evaluate_file(
    paths: list[Path], json_out: Path | None = None, threshold: float | None = None, column: str = "prob_atypical"
) -> dict:
    """The figures of one predictions file, or of the mean of several (``metrics.read_mean_predictions``)."""
    result = evaluate(read_mean_predictions(paths, threshold, column))
    print(table(result))  # the report is this command's output
    if json_out is not None:
        json_out.write_text(json.dumps(nan_as_null(result), indent=1, allow_nan=False) + "\n")
        log.info("wrote %s", json_out)
    return result


def nan_as_null(value):
    """NaN (the AUC of a domain with one class) is not JSON: null instead."""
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
