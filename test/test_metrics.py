import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from training.metrics import balanced_accuracy, choose_threshold, summarize


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.2
    preds = rng.random(500) < 0.3
    assert abs(balanced_accuracy(labels, preds) - balanced_accuracy_score(labels, preds)) < 1e-12


def test_summary_figures():
    labels = np.array([1, 1, 0, 0, 0])
    probs = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    s = summarize(labels, probs, threshold=0.5)
    assert s["sensitivity"] == 0.5 and s["specificity"] == 2 / 3
    assert abs(s["balanced_accuracy"] - (0.5 + 2 / 3) / 2) < 1e-12
    assert abs(s["roc_auc"] - roc_auc_score(labels, probs)) < 1e-12


def test_threshold_maximizes_balanced_accuracy_between_examples():
    labels = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.8])  # separable at any cut in (0.3, 0.35]
    t = choose_threshold(labels, probs)
    assert 0.3 < t <= 0.35
    assert summarize(labels, probs, t)["balanced_accuracy"] == 1.0


def test_threshold_beats_one_half_on_a_shifted_model():
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.25
    probs = np.clip(0.15 + 0.2 * labels + rng.normal(0, 0.05, 2000), 0, 1)  # all below 0.5
    t = choose_threshold(labels, probs)
    assert summarize(labels, probs, t)["balanced_accuracy"] > 0.95 > summarize(labels, probs, 0.5)["balanced_accuracy"]
