"""``training.score``: the official Track 2 evaluation's figures and checks, both answer layouts, cases built from
real data, and running an image over cases (a fake ``docker``; no engine needed)."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, shared_path
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from contracts import ANSWER_FILENAME, INPUT_INTERFACE
from training import cli
from training.score import build_stacks, docker_command, run_and_score, run_image, score_folder
from training.synthetic import synthetic_figures, write_case

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
        truth.append({"image": f"{name}.tiff", "labels": ["atypical" if v else "normal" for v in y],
                      "tumordomains": domains})  # fmt: skip
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
        interface_out = {"slug": "multiple-mitotic-figure-classification", "kind": "Anything",
                         "relative_path": ANSWER_FILENAME}  # fmt: skip
        jobs.append({"pk": pk, "status": "Succeeded",
                     "inputs": [{"file": None, "image": {"name": f"{folder.name}.tiff"}, "interface": interface_in}],
                     "outputs": [{"file": None, "image": None, "interface": interface_out}]})  # fmt: skip
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
    assert list(agg) == ["overall_sensitivity", "overall_specificity", "overall_balanced_accuracy",
                         "overall_roc_auc", "overall_accuracy", "domain_0", "domain_3", "domain_7"]  # fmt: skip
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
    truth = [{"image": "stack_1.tiff", "labels": ["normal", "atypical", "normal"], "tumordomains": [0, 0, 5]},
             {"image": "stack_2.tiff", "labels": ["normal"], "tumordomains": [1]}]  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    (tmp_path / "a" / "stack_1").mkdir(parents=True)
    answer = [{"class": "normal", "confidence": 0.2}, {"class": "atypical", "confidence": 0.9},
              {"class": "atypical", "confidence": 0.7}]  # fmt: skip
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


def test_stacks_from_the_real_breast_subset(tmp_path):
    data = shared_path("midog25-breast-subset")
    cases = tmp_path / "cases"
    run_cli("-m", "training", "stacks", "--data-root", data, "--output", cases, "--stacks", "4", "--seed", "3",
            "--domain", "scanner")  # fmt: skip
    truth = json.loads((cases / "ground_truth.json").read_text())
    domains = json.loads((cases / "domains.json").read_text())
    assert sorted(domains.values()) == ["Aperio CS2", "Hamamatsu S360", "Hamamatsu XR"]
    with (data / "MIDOG25_Atypical_Classification_Train_Set.csv").open(newline="") as f:
        csv_rows = {r["image_id"]: r for r in csv.DictReader(f)}
    with (cases / "figures.csv").open(newline="") as f:
        pages = list(csv.DictReader(f))
    assert [e["image"] for e in truth] == [f"stack_{k}.tiff" for k in (1, 2, 3, 4)]
    assert all(len(e["labels"]) == 16 for e in truth)
    used = []
    for entry in truth:
        stem = entry["image"].removesuffix(".tiff")
        rows = [p for p in pages if p["stack"] == stem]
        used += [r["image_id"] for r in rows]
        assert entry["labels"] == [{"AMF": "atypical", "NMF": "normal"}[csv_rows[r["image_id"]]["majority"]]
                                   for r in rows]  # fmt: skip
        scanners = [csv_rows[r["image_id"]]["Scanner"].replace("Hammamatsu", "Hamamatsu") for r in rows]
        assert [domains[str(d)] for d in entry["tumordomains"]] == scanners
        inputs = json.loads((cases / stem / "inputs.json").read_text())
        assert inputs[0]["image"]["name"] == entry["image"]
        with Image.open(cases / stem / "images" / INPUT_INTERFACE / entry["image"]) as tiff:
            assert tiff.n_frames == len(rows)
            # one resolution per stack: the pixel size of its figures' scanners (0.25 Aperio, 0.23 Hamamatsu)
            um = 25_400 / float(tiff.tag_v2[282])
            assert um == pytest.approx(0.25 if scanners[0] == "Aperio CS2" else 0.23, abs=1e-6)
            assert {s == "Aperio CS2" for s in scanners} == {scanners[0] == "Aperio CS2"}
            for page, row in enumerate(rows):
                tiff.seek(page)
                png = np.asarray(Image.open(data / "images" / row["image_id"]).convert("RGB"))
                np.testing.assert_array_equal(np.asarray(tiff.convert("RGB")), png)
    assert len(set(used)) == 64
    assert used != sorted(used, key=lambda s: int(s.split(".")[0]))  # shuffled, not in CSV order


def test_stacks_groups_by_pixel_size_and_numbers_tumors(tmp_path):
    """Synthetic data (two 0.23 um scanners, one 0.25 um): every stack one pixel size, the last of each group
    shorter, all figures once; --domain tumor numbers the tumor names."""
    from training.synthetic import write_midog25

    write_midog25(tmp_path / "data", n=70, seed=1, n_slides=6)
    result = build_stacks([tmp_path / "data"], tmp_path / "cases", stack_size=16, seed=0, domain="tumor")
    truth = json.loads((tmp_path / "cases" / "ground_truth.json").read_text())
    assert sum(len(e["labels"]) for e in truth) == result["figures"] == 70
    assert sorted(len(e["labels"]) for e in truth)[:2] != [16, 16]  # two groups, each with its short remainder
    assert json.loads((tmp_path / "cases" / "domains.json").read_text()) == {"0": "synthetic breast-like"}
    with pytest.raises(ValueError, match="not empty"):
        build_stacks([tmp_path / "data"], tmp_path / "cases")


# ---------------------------------------------------------------------------------------------- running an image


def _cases(root: Path, sizes: dict[str, int]) -> Path:
    pixels, _ = synthetic_figures(max(sizes.values()), seed=0, n_slides=1)
    truth = []
    for name, n in sizes.items():
        write_case(root / name, pixels[:n], name=name)
        truth.append({"image": f"{name}.tiff", "labels": ["normal"] * (n - 1) + ["atypical"], "tumordomains": [0] * n})
    (root / "ground_truth.json").write_text(json.dumps(truth))
    return root


def test_docker_command_is_the_platforms():
    cmd = docker_command("img:1", Path("/c/stack_1"), Path("/o/stack_1"), device="cpu")
    assert cmd == ["docker", "run", "--rm", "--network", "none", "--shm-size", "1024M", "--env", "MIDOG_DEVICE=cpu",
                   "-v", "/c/stack_1:/input:ro", "-v", "/o/stack_1:/output", "img:1"]  # fmt: skip
    assert docker_command("img:1", Path("/c/s"), Path("/o/s"))[7:9] == ["--gpus", "all"]


def test_run_image_with_an_injected_runner(tmp_path):
    cases = _cases(tmp_path / "cases", {"stack_1": 3, "stack_2": 2, "stack_10": 1})
    calls = []

    def runner(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("-v", 10) + 1].split(":")[0])
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 and not any(out.iterdir())
        if "stack_2" in str(out):
            return subprocess.CompletedProcess(cmd, 3, "", "loading model\nError: no CUDA provider\n\n")
        (out / ANSWER_FILENAME).write_text("[]")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    runs = run_image("img", cases, tmp_path / "out", device="cpu", runner=runner)
    assert [r.stack for r in runs] == ["stack_1", "stack_2", "stack_10"]  # natural order
    assert [c[-1] for c in calls] == ["img"] * 3 and all("MIDOG_DEVICE=cpu" in c for c in calls)
    assert runs[1].returncode == 3 and runs[1].stderr_tail == "Error: no CUDA provider"
    assert not (tmp_path / "out" / "stack_2").exists()  # a failed case leaves no answer folder
    assert (tmp_path / "out" / "stack_1" / ANSWER_FILENAME).is_file()
    with (tmp_path / "out" / "times.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stack"], r["returncode"]) for r in rows] == [("stack_1", "0"), ("stack_2", "3"), ("stack_10", "0")]
    assert all(float(r["seconds"]) >= 0 for r in rows)


FAKE_DOCKER = """#!{python}
# a stand-in for `docker run ... IMAGE`: answers every page of the /input stack with P(atypical) = 0.7 for the last
# page, 0.2 for the others; exits 2 with a message for a case named in $FAIL_CASE
import json, os, sys
from pathlib import Path
from PIL import Image
args = sys.argv[1:]
mounts = dict(reversed(args[i + 1].split(":")[:2]) for i, a in enumerate(args) if a == "-v")
case, out = Path(mounts["/input"]), Path(mounts["/output"])
if case.name == os.environ.get("FAIL_CASE"):
    print("Traceback ...\\nRuntimeError: out of memory", file=sys.stderr)
    sys.exit(2)
(stack,) = (case / "images" / "{interface}").iterdir()
n = Image.open(stack).n_frames
answer = [{{"class": "atypical" if i == n - 1 else "normal", "confidence": 0.7 if i == n - 1 else 0.2}}
          for i in range(n)]
(out / "{answer}").write_text(json.dumps(answer))
"""


def test_score_with_image_runs_then_scores(tmp_path, monkeypatch):
    """The one command, against a fake ``docker`` on PATH: run every case, then score; a failing case fails it."""
    cases = _cases(tmp_path / "cases", {"stack_1": 3, "stack_2": 4})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(FAKE_DOCKER.format(python=sys.executable, interface=INPUT_INTERFACE, answer=ANSWER_FILENAME))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    gt, out = cases / "ground_truth.json", tmp_path / "out"
    result = run_cli("-m", "training", "score", "--ground-truth", gt, "--answers", out, "--image", "midog:test",
                     "--cases", cases, "--device", "cpu", "--json", tmp_path / "m.json")  # fmt: skip
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["aggregates"]["overall_balanced_accuracy"] == 1.0 and metrics["n_stacks"] == 2
    assert "overall" in result.stdout and (out / "times.csv").is_file()

    monkeypatch.setenv("FAIL_CASE", "stack_2")
    with pytest.raises(Exception, match="stack_2: the image exited 2: RuntimeError: out of memory"):
        run_and_score("midog:test", cases, gt, out, device="cpu")
    assert not (out / "stack_2").exists() and (out / "stack_1" / ANSWER_FILENAME).is_file()
