"""``training.lab.cases``: stacks with a ground truth from dataset folders, and a container image run over them the
way the platform runs it, then scored."""

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

from contracts import ANSWER_FILENAME, INPUT_INTERFACE
from training.data import normalize_scanner
from training.lab.cases import build_stacks, docker_command, run_and_score, run_image
from training.synthetic import synthetic_figures, write_case


def test_stacks_from_the_real_breast_subset(tmp_path):
    data = shared_path("midog25-breast-subset")
    cases = tmp_path / "cases"
    run_cli(
        "-m",
        "training",
        "stacks",
        "--data-root",
        data,
        "--output",
        cases,
        "--stacks",
        "4",
        "--seed",
        "3",
        "--domain",
        "scanner",
    )
    truth = json.loads((cases / "ground_truth.json").read_text())
    domains = json.loads((cases / "domains.json").read_text())
    assert sorted(domains.values()) == ["Aperio CS2", "Hamamatsu S360", "Hamamatsu XR"]
    with (data / "MIDOG25_Atypical_Classification_Train_Set.csv").open(newline="") as f:
        csv_rows = {r["image_id"]: r for r in csv.DictReader(f)}
    with (cases / "figures.csv").open(newline="") as f:
        pages = list(csv.DictReader(f))
    assert [e["image"] for e in truth] == [f"stack_{k}.tiff" for k in (1, 2, 3, 4)]
    assert all(len(e["labels"]) == 16 for e in truth)
    used, resolutions = [], set()
    for entry in truth:
        stem = entry["image"].removesuffix(".tiff")
        rows = [p for p in pages if p["stack"] == stem]
        used += [r["image_id"] for r in rows]
        assert entry["labels"] == [
            {"AMF": "atypical", "NMF": "normal"}[csv_rows[r["image_id"]]["majority"]] for r in rows
        ]
        scanners = [normalize_scanner(csv_rows[r["image_id"]]["Scanner"]) for r in rows]  # the CSV's 'Hamammatsu XR'
        assert [domains[str(d)] for d in entry["tumordomains"]] == scanners
        inputs = json.loads((cases / stem / "inputs.json").read_text())
        assert inputs[0]["image"]["name"] == entry["image"]
        with Image.open(cases / stem / "images" / INPUT_INTERFACE / entry["image"]) as tiff:
            assert tiff.n_frames == len(rows)
            # one resolution per stack: the pixel size of its figures' scanners (0.25 Aperio, 0.23 Hamamatsu)
            um = 25_400 / float(tiff.tag_v2[282])
            assert um == pytest.approx(0.25 if scanners[0] == "Aperio CS2" else 0.23, abs=1e-6)
            resolutions.add(round(um, 2))
            assert {s == "Aperio CS2" for s in scanners} == {scanners[0] == "Aperio CS2"}
            for page, row in enumerate(rows):
                tiff.seek(page)
                png = np.asarray(Image.open(data / "images" / row["image_id"]).convert("RGB"))
                np.testing.assert_array_equal(np.asarray(tiff.convert("RGB")), png)
    assert len(set(used)) == 64
    assert resolutions == {0.23, 0.25}  # the first stacks come from every pixel-size group in turn
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
    assert cmd == [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--shm-size",
        "1024M",
        "--env",
        "MIDOG_DEVICE=cpu",
        "-v",
        "/c/stack_1:/input:ro",
        "-v",
        "/o/stack_1:/output",
        "img:1",
    ]
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
    result = run_cli(
        "-m",
        "training",
        "score",
        "--ground-truth",
        gt,
        "--answers",
        out,
        "--image",
        "midog:test",
        "--cases",
        cases,
        "--device",
        "cpu",
        "--json",
        tmp_path / "m.json",
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["aggregates"]["overall_balanced_accuracy"] == 1.0 and metrics["n_stacks"] == 2
    assert "overall" in result.stdout and (out / "times.csv").is_file()

    monkeypatch.setenv("FAIL_CASE", "stack_2")
    with pytest.raises(Exception, match="stack_2: the image exited 2: RuntimeError: out of memory"):
        run_and_score("midog:test", cases, gt, out, device="cpu")
    assert not (out / "stack_2").exists() and (out / "stack_1" / ANSWER_FILENAME).is_file()
