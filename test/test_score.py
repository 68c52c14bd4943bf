"""``training.lab.score``: the official Track 2 evaluation's figures and checks, both answer layouts, cases built from
real data, and running an image over cases (a fake ``docker``; no engine needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from contracts import ANSWER_FILENAME, INPUT_INTERFACE
from training import cli
from training.lab.cases import score_folder

# (stack, its pages' tumor domains): several stacks, domains spread across them, a one-page stack
STACKS = {
    "stack_1": [0] * 10 + [3] * 6,
    "stack_2": [3] * 16,
    "stack_3": [7] * 9 + [0] * 4,
    "stack_4": [0],
    "stack_5": [7] * 12 + [3] * 4,
}


def _write_fixture(root: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """A ground truth and layout-(a) answers of a noisy classifier; returns (gt path, answers dir, arrays)."""
    rng = np.random.default_rng(seed)
    truth, arrays = [], {"y": [], "pred": [], "prob": [], "domain": []}
    answers = root / "answers"
    for name, domains in STACKS.items():
        y = (rng.random(len(domains)) < 0.35).astype(int)
        prob = np.clip(0.35 * y + 0.65 * rng.random(len(y)), 0, 1)
        pred = (prob >= 0.45).astype(int)
        truth.append(
            {"image": f"{name}.tiff", "labels": ["atypical" if v else "normal" for v in y], "tumordomains": domains}
        )
        (answers / name).mkdir(parents=True)
        answer = [
            {"class": "atypical" if c else "normal", "confidence": float(p)} for c, p in zip(pred, prob, strict=True)
        ]
        (answers / name / ANSWER_FILENAME).write_text(json.dumps(answer))
        for key, value in zip(("y", "pred", "prob", "domain"), (y, pred, prob, domains), strict=True):
            arrays[key].extend(value)
    gt = root / "ground_truth.json"
    gt.write_text(json.dumps(truth))
    return gt, answers, {k: np.array(v) for k, v in arrays.items()}


def _to_grand_challenge_layout(answers: Path, out: Path) -> None:
    """Layout (b), in the shape of Grand Challenge's evaluation input: predictions.json + <pk>/output/<path>."""
    jobs = []
    for k, folder in enumerate(sorted(answers.iterdir())):
        pk = f"00000000-0000-0000-0000-{k:012d}"
        (out / pk / "output").mkdir(parents=True)
        (out / pk / "output" / ANSWER_FILENAME).write_bytes((folder / ANSWER_FILENAME).read_bytes())
        interface_in = {"slug": INPUT_INTERFACE, "kind": "Image", "relative_path": f"images/{INPUT_INTERFACE}"}
        interface_out = {
            "slug": "multiple-mitotic-figure-classification",
            "kind": "Anything",
            "relative_path": ANSWER_FILENAME,
        }
        jobs.append(
            {
                "pk": pk,
                "status": "Succeeded",
                "inputs": [{"file": None, "image": {"name": f"{folder.name}.tiff"}, "interface": interface_in}],
                "outputs": [{"file": None, "image": None, "interface": interface_out}],
            }
        )
    (out / "predictions.json").write_text(json.dumps(jobs))


def test_figures_agree_with_sklearn(tmp_path, capsys):
    gt, answers, a = _write_fixture(tmp_path)
    result = score_folder(gt, answers, tmp_path / "metrics.json")
    agg = result["aggregates"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    assert agg["overall_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(a["y"], a["pred"]), abs=1e-12)
    assert agg["overall_sensitivity"] == pytest.approx(recall_score(a["y"], a["pred"]), abs=1e-12)
    assert agg["overall_specificity"] == pytest.approx(recall_score(a["y"], a["pred"], pos_label=0), abs=1e-12)
    assert agg["overall_accuracy"] == pytest.approx(accuracy_score(a["y"], a["pred"]), abs=1e-12)
    assert agg["overall_roc_auc"] == pytest.approx(roc_auc_score(a["y"], a["prob"]), abs=1e-12)
    # the official keys, domains ascending; our extras beside "aggregates"
    assert list(agg) == [
        "overall_sensitivity",
        "overall_specificity",
        "overall_balanced_accuracy",
        "overall_roc_auc",
        "overall_accuracy",
        "domain_0",
        "domain_3",
        "domain_7",
    ]
    for d in (0, 3, 7):
        m = a["domain"] == d
        figs = agg[f"domain_{d}"]
        assert figs["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(a["y"][m], a["pred"][m]))
        assert figs["sensitivity"] == pytest.approx(recall_score(a["y"][m], a["pred"][m]))
        assert figs["specificity"] == pytest.approx(recall_score(a["y"][m], a["pred"][m], pos_label=0))
        assert figs["accuracy"] == pytest.approx(accuracy_score(a["y"][m], a["pred"][m]))
        assert figs["roc_auc"] == pytest.approx(roc_auc_score(a["y"][m], a["prob"][m]))
        assert result["domains"][str(d)]["n"] == m.sum()
    assert result["domains"]["3"]["name"] == "cMC"  # official names without a domains.json
    assert (result["n_stacks"], result["n_figures"], result["n_atypical"]) == (5, len(a["y"]), a["y"].sum())
    out = capsys.readouterr().out
    assert "domain_7 cHAS" in out and f"{agg['overall_balanced_accuracy']:.4f}" in out


def test_grand_challenge_layout_scores_the_same(tmp_path):
    gt, answers, _ = _write_fixture(tmp_path)
    _to_grand_challenge_layout(answers, tmp_path / "gc")
    assert score_folder(gt, tmp_path / "gc") == score_folder(gt, answers)


def test_one_class_domain_and_stacks_without_answer(tmp_path):
    """Where the official evaluation would crash (AUC over one class) the figure is null, with a note; an absent
    class's recall is 0.0, as theirs reports it; ground-truth stacks without an answer are listed, not scored."""
    truth = [
        {"image": "stack_1.tiff", "labels": ["normal", "atypical", "normal"], "tumordomains": [0, 0, 5]},
        {"image": "stack_2.tiff", "labels": ["normal"], "tumordomains": [1]},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    (tmp_path / "a" / "stack_1").mkdir(parents=True)
    answer = [
        {"class": "normal", "confidence": 0.2},
        {"class": "atypical", "confidence": 0.9},
        {"class": "atypical", "confidence": 0.7},
    ]
    (tmp_path / "a" / "stack_1" / ANSWER_FILENAME).write_text(json.dumps(answer))
    result = score_folder(tmp_path / "gt.json", tmp_path / "a", tmp_path / "m.json")
    d5 = result["aggregates"]["domain_5"]
    assert d5 == {"sensitivity": 0.0, "specificity": 0.0, "balanced_accuracy": 0.0, "accuracy": 0.0, "roc_auc": None}
    assert result["aggregates"]["overall_roc_auc"] == 1.0
    assert any("domain_5: roc_auc null" in n for n in result["notes"])
    assert result["stacks_without_answer"] == ["stack_2.tiff"]
    assert json.loads((tmp_path / "m.json").read_text())["aggregates"]["domain_5"]["roc_auc"] is None


def _break(answer: list, how: str):
    if how == "wrong length":
        return answer[:-1]
    if how == "not a list":
        return {"class": "normal", "confidence": 0.5}
    first = {
        "missing key": {"class": answer[0]["class"]},
        "unknown class": {**answer[0], "class": "Atypical"},
        "integer confidence": {**answer[0], "confidence": 1},
        "bool confidence": {**answer[0], "confidence": True},
        "non-dict entry": ["normal", 0.5],
    }[how]
    return [first, *answer[1:]]


REASONS = {
    "wrong length": "Results length does not match GT length",
    "missing key": 'entries "class" and "confidence"',
    "unknown class": "Class needs to be either normal or atypical",
    "integer confidence": "Confidence needs to be of type float (got 1)",
    "bool confidence": "Confidence needs to be of type float (got true)",
    "non-dict entry": "Needs list of dictionaries",
    "not a list": "Needs list of dictionaries",
}


@pytest.mark.parametrize("how", list(REASONS))
def test_malformed_answer_fails_naming_the_stack(tmp_path, capsys, how):
    gt, answers, _ = _write_fixture(tmp_path)
    path = answers / "stack_3" / ANSWER_FILENAME
    path.write_text(json.dumps(_break(json.loads(path.read_text()), how)))
    rc = cli.main(["score", "--ground-truth", str(gt), "--answers", str(answers), "--json", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert "stack_3" in err[0] and REASONS[how] in err[0]
    assert not (tmp_path / "m.json").exists()


def test_malformed_answers_in_grand_challenge_layout_name_the_job(tmp_path, capsys):
    gt, answers, _ = _write_fixture(tmp_path)
    _to_grand_challenge_layout(answers, tmp_path / "gc")
    job = json.loads((tmp_path / "gc" / "predictions.json").read_text())[1]
    path = tmp_path / "gc" / job["pk"] / "output" / ANSWER_FILENAME
    path.write_text(json.dumps(_break(json.loads(path.read_text()), "integer confidence")))
    assert cli.main(["score", "--ground-truth", str(gt), "--answers", str(tmp_path / "gc")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stack_2.tiff" in line and job["pk"] in line and "type float" in line


def test_stack_without_ground_truth_fails_from_the_command_line(tmp_path):
    """Through a real process: one line on stderr, no traceback."""
    gt, answers, _ = _write_fixture(tmp_path)
    (answers / "stack_99").mkdir()
    (answers / "stack_99" / ANSWER_FILENAME).write_text(json.dumps([{"class": "normal", "confidence": 0.1}]))
    result = run_cli("-m", "training", "score", "--ground-truth", gt, "--answers", answers, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "python -m training score: stack_99: No GT for this image: stack_99.*"
    ]


def test_missing_answer_file_and_invalid_json_fail_cleanly(tmp_path, capsys):
    gt, answers, _ = _write_fixture(tmp_path)
    (answers / "stack_2" / ANSWER_FILENAME).write_text("[{")
    assert cli.main(["score", "--ground-truth", str(gt), "--answers", str(answers)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stack_2" in line and "not valid JSON" in line
    (answers / "stack_2" / ANSWER_FILENAME).unlink()
    assert cli.main(["score", "--ground-truth", str(gt), "--answers", str(answers)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stack_2: no " + ANSWER_FILENAME in line


def test_cli_smoke_writes_metrics(tmp_path):
    gt, answers, _ = _write_fixture(tmp_path)
    result = run_cli(
        "-m", "training", "score", "--ground-truth", gt, "--answers", answers, "--json", tmp_path / "m.json"
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert f"{metrics['aggregates']['overall_balanced_accuracy']:.4f}" in result.stdout
    assert "5 stacks scored" in result.stdout
