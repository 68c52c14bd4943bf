"""``python -m training evaluate`` against an independent computation of every metric."""

import json

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from training.evaluate import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, evaluate
from training.metrics import read_predictions


@pytest.fixture
def predictions_csv(tmp_path):
    rng = np.random.default_rng(7)
    n = 600
    label = (rng.random(n) < 0.25).astype(int)
    prob = np.clip(0.3 * label + rng.random(n) * 0.7, 0, 1)
    pred = (prob >= 0.45).astype(int)
    domain = rng.choice(["Aperio CS2", "Hamamatsu S360", "Hamamatsu XR"], n)
    label[domain == "Hamamatsu S360"] = 0  # a one-class domain: its AUC is undefined
    path = tmp_path / "preds.csv"
    rows = ["image_id,label,prob_atypical,pred,domain"]
    rows += [f"{i}.png,{label[i]},{float(prob[i])!r},{pred[i]},{domain[i]}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path, label, prob, pred, domain


def independent(label, prob, pred):
    both = len(set(label)) == 2
    # the oracle: the best balanced accuracy over every cut between sorted probabilities (and above them all)
    cuts = [*np.unique(prob), np.inf]
    oracle = max(balanced_accuracy_score(label, prob >= t) for t in cuts) if both else None
    # the official evaluation's convention: recall_score, 0.0 for a class with no figures
    sensitivity = recall_score(label, pred, pos_label=1, zero_division=0.0)
    specificity = recall_score(label, pred, pos_label=0, zero_division=0.0)
    return {
        "oracle_balanced_accuracy": oracle,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": accuracy_score(label, pred),
        "roc_auc": roc_auc_score(label, prob) if both else None,
        "mean_prob_normal": float(np.mean([p for p, y in zip(prob, label, strict=True) if y == 0]))
        if (label == 0).any()
        else None,
        "mean_prob_atypical": float(np.mean([p for p, y in zip(prob, label, strict=True) if y == 1]))
        if label.any()
        else None,
    }


def test_every_metric_matches_an_independent_computation(predictions_csv):
    path, label, prob, pred, domain = predictions_csv
    result = evaluate(read_predictions(path))
    for key, expected in independent(label, prob, pred).items():
        assert abs(result[key] - expected) < 1e-9, key
    for d in np.unique(domain):
        m = domain == d
        for key, expected in independent(label[m], prob[m], pred[m]).items():
            got = result["domains"][d][key]
            assert np.isnan(got) if expected is None else abs(got - expected) < 1e-9, (d, key)

    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(label), size=(BOOTSTRAP_RESAMPLES, len(label)))
    scores = [balanced_accuracy_score(label[i], pred[i]) for i in idx if 0 < label[i].sum() < len(i)]
    lo, hi = np.percentile(scores, [2.5, 97.5])
    assert abs(result["balanced_accuracy_ci"][0] - lo) < 1e-9 and abs(result["balanced_accuracy_ci"][1] - hi) < 1e-9
    assert lo < result["balanced_accuracy"] < hi
    for figs in (result, *(result["domains"][d] for d in ("Aperio CS2", "Hamamatsu XR"))):
        assert figs["oracle_balanced_accuracy"] >= figs["balanced_accuracy"]
    at_oracle = balanced_accuracy_score(label, prob >= result["oracle_threshold"])
    assert abs(at_oracle - result["oracle_balanced_accuracy"]) < 1e-9


def test_a_domain_with_one_class_has_no_mean_for_the_other():
    from training.evaluate import domain_scores

    only_atypical = domain_scores(np.array([1, 1]), np.array([1, 0]), np.array([0.9, 0.3]))
    assert np.isnan(only_atypical["mean_prob_normal"]) and only_atypical["mean_prob_atypical"] == pytest.approx(0.6)
    only_normal = domain_scores(np.array([0, 0, 0]), np.array([0, 0, 1]), np.array([0.1, 0.2, 0.6]))
    assert np.isnan(only_normal["mean_prob_atypical"]) and only_normal["mean_prob_normal"] == pytest.approx(0.3)


def test_cli_prints_a_table_and_writes_json(predictions_csv, tmp_path):
    path = predictions_csv[0]
    result = run_cli("-m", "training", "evaluate", "--predictions", path, "--json", tmp_path / "out.json")
    assert "balanced_accuracy" in result.stdout and "Hamamatsu XR" in result.stdout and "bootstrap" in result.stdout
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["domains"]["Hamamatsu S360"]["roc_auc"] is None  # NaN written as null
    assert set(saved) >= {
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "accuracy",
        "roc_auc",
        "balanced_accuracy_ci",
        "domains",
    }


def test_bad_predictions_files_are_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("image_id,label,prob_atypical,domain\n1.png,1,0.9,x\n")
    result = run_cli("-m", "training", "evaluate", "--predictions", path, check=False)
    assert result.returncode == 1 and "missing columns ['pred']" in result.stderr
    path.write_text("image_id,label,prob_atypical,pred,domain\n1.png,2,0.9,1,x\n")
    result = run_cli("-m", "training", "evaluate", "--predictions", path, check=False)
    assert result.returncode == 1 and "row 2" in result.stderr


def test_a_threshold_replaces_the_pred_column(predictions_csv):
    path = predictions_csv[0]

    def scored(threshold=None):  # as JSON text: the one-class domain's NaN AUC compares equal there
        return json.dumps(evaluate(read_predictions(path, threshold)), sort_keys=True)

    from_threshold = scored(0.45)  # the fixture's pred = prob >= 0.45
    assert from_threshold == scored()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(",".join(c for i, c in enumerate(r.split(",")) if i != 3) for r in lines) + "\n")
    assert scored(0.45) == from_threshold  # no pred column needed


def test_another_probability_column_is_scored_by_name(predictions_csv, tmp_path):
    path, label, prob, _, _ = predictions_csv
    lines = path.read_text().splitlines()
    other = 1 - prob  # a column that ranks the figures the other way round
    rows = [lines[0].replace("prob_atypical,", "prob_atypical_no_tta,")]
    for line, o in zip(lines[1:], other, strict=True):
        cells = line.split(",")
        rows.append(",".join([*cells[:2], repr(float(o)), *cells[3:]]))
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("\n".join(rows) + "\n")
    result = evaluate(read_predictions(renamed, 0.5, column="prob_atypical_no_tta"))
    assert abs(result["roc_auc"] - roc_auc_score(label, other)) < 1e-9
    assert abs(result["balanced_accuracy"] - balanced_accuracy_score(label, other >= 0.5)) < 1e-9
    with pytest.raises(ValueError, match="missing columns"):
        read_predictions(renamed, 0.5)  # the default column is not there


def test_several_predictions_files_are_averaged_figure_by_figure(tmp_path):
    """Runs to ensemble, scored before export: the mean probability per image_id, in any row order."""
    from training.metrics import read_mean_predictions

    header = "image_id,label,prob_atypical,domain\n"
    (tmp_path / "a.csv").write_text(header + "x,1,0.9,s\ny,0,0.2,s\nz,1,0.4,s\n")
    (tmp_path / "b.csv").write_text(header + "z,1,0.8,s\nx,1,0.5,s\ny,0,0.6,s\n")
    mean = read_mean_predictions([tmp_path / "a.csv", tmp_path / "b.csv"], threshold=0.5)
    np.testing.assert_allclose(mean["prob"], [0.7, 0.4, 0.6])
    assert mean["pred"].tolist() == [1, 0, 1] and mean["label"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="give --threshold"):
        read_mean_predictions([tmp_path / "a.csv", tmp_path / "b.csv"])
    (tmp_path / "c.csv").write_text(header + "x,1,0.9,s\ny,1,0.2,s\nz,1,0.4,s\n")
    with pytest.raises(ValueError, match=r"c\.csv: labels differ"):
        read_mean_predictions([tmp_path / "a.csv", tmp_path / "c.csv"], threshold=0.5)
    (tmp_path / "d.csv").write_text(header + "x,1,0.9,s\nw,0,0.2,s\n")
    with pytest.raises(ValueError, match=r"d\.csv: scores other figures"):
        read_mean_predictions([tmp_path / "a.csv", tmp_path / "d.csv"], threshold=0.5)
