"""The pages to look at: an evaluation's report and a case's review, checked in a real browser (headless Chromium:
every image decoded, nothing on the console)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import PROCESS, REPO, red_mean_model, run_cli

BROWSER = shutil.which("chromium")


def in_browser(page, tmp_path) -> tuple[int, int]:
    """Open ``page`` in headless Chromium: (images, images that did not decode). Fails on any console line (the
    pages run no script: one would be the browser's report of an error) and saves a screenshot beside the copy."""
    if BROWSER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    probe = tmp_path / f"probe-{page.parent.name}.html"
    count = (
        "<script>addEventListener('load',()=>{const all=[...document.images];"
        "document.title='images '+all.length+' broken '+all.filter(i=>!i.complete||i.naturalWidth===0).length})"
        "</script></body>"
    )
    probe.write_text(page.read_text().replace("</body>", count))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    result = subprocess.run(
        [BROWSER, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    consoles = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    # only the probe's own script ran; the page itself must say nothing
    assert not consoles, consoles
    shot = tmp_path / f"{page.parent.name}.png"
    subprocess.run(
        [BROWSER, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
    found = re.search(r"<title>images (\d+) broken (\d+)</title>", result.stdout)
    assert found, result.stdout[:500]
    return int(found[1]), int(found[2])


@pytest.fixture(scope="module")
def predictions(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "p.csv"
    run_cli(
        "-m",
        "training",
        "predict",
        demo_run["model"],
        "--data-root",
        demo_run["data"],
        "--output",
        out,
        "--device",
        "cpu",
    )
    return out


def test_the_report_shows_the_figures_and_the_crops(predictions, tmp_path):
    run_cli("-m", "training", "evaluate", "--predictions", predictions, "--report", tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    for name in ("roc.png", "reliability.png", "threshold.png"):
        assert (tmp_path / "r" / name).stat().st_size > 5_000
    for title in ("Atypical called normal", "Normal called atypical", "Closest to the threshold", "Correct, a random"):
        assert title in page
    cards = re.findall(
        r'<div class="card"><img [^>]*src="data:image/png;base64,[^"]+"><b>P (0\.\d{3}|1\.000)</b>', page
    )
    assert 16 < len(cards) <= 64 and "crop not found" not in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere
    images, broken = in_browser(tmp_path / "r" / "report.html", tmp_path)
    assert images == 3 + len(cards) and broken == 0


def test_a_crop_that_cannot_be_found_is_said_so_on_its_card(predictions, tmp_path):
    rows = list(csv.DictReader(predictions.open()))
    rows = [{**r, "path": str(tmp_path / "gone.png")} if i % 2 else r for i, r in enumerate(rows)]
    moved = tmp_path / "moved.csv"
    with moved.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run_cli("-m", "training", "evaluate", "--predictions", moved, "--report", tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert "crop not found: " + str(tmp_path / "gone.png") in page
    assert f"{len(rows) // 2} crops not found" in page


def test_a_run_oof_finds_its_crops_by_image_id(demo_run, tmp_path):
    """oof.csv names each crop's file; without it, --data-root finds the crop by image_id."""
    oof = demo_run["run"] / "oof.csv"
    rows = [{k: v for k, v in r.items() if k != "path"} for r in csv.DictReader(oof.open())]
    bare = tmp_path / "oof.csv"
    with bare.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    threshold = json.loads((demo_run["run"] / "summary.json").read_text())["threshold"]
    args = ("--threshold", str(threshold), "--report", tmp_path / "r", "--data-root", demo_run["data"])
    run_cli("-m", "training", "evaluate", "--predictions", bare, *args)
    page = (tmp_path / "r" / "report.html").read_text()
    assert "crop not found" not in page and f"classes at threshold {threshold:.4f}" in page


def test_the_review_shows_the_case_as_process_answers_it(demo_run, tmp_path):
    case = REPO / "test" / "input"
    run_cli("-m", "training", "review", case, "--model", demo_run["model"], "--output", tmp_path / "v")
    run_cli(
        REPO / "process.py",
        "--input",
        case,
        "--output",
        tmp_path / "out",
        "--model",
        demo_run["model"],
        "--device",
        "cpu",
    )
    served = json.loads((tmp_path / "out" / "multiple-mitotic-figure-classification.json").read_text())
    assert json.loads((tmp_path / "v" / "answer.json").read_text()) == served
    page = (tmp_path / "v" / "review.html").read_text()
    assert len(re.findall(r'<div class="card">', page)) == len(served) == 16
    for i, entry in enumerate(served):
        assert f"<b>page {i + 1}</b>: {entry['class']}<br>P(atypical) {entry['confidence']:.4f}" in page
    assert (tmp_path / "v" / "review.png").stat().st_size > 20_000
    images, broken = in_browser(tmp_path / "v" / "review.html", tmp_path)
    assert images == 17 and broken == 0


def test_the_score_report_shows_each_case_page_with_its_answer(tmp_path):
    """score --report: the container's answers to cases, each page shown from its case's stack."""
    from training.synthetic import write_midog25

    write_midog25(tmp_path / "data", n=40, seed=2, n_slides=4)
    cases, answers = tmp_path / "cases", tmp_path / "answers"
    run_cli("-m", "training", "stacks", "--data-root", tmp_path / "data", "--output", cases, "--stack-size", "8")
    model = red_mean_model(tmp_path / "model")
    for case in sorted(cases.glob("stack_*")):
        run_cli(PROCESS, "--input", case, "--output", answers / case.name, "--model", model, "--device", "cpu")
    truth = cases / "ground_truth.json"
    run_cli("-m", "training", "score", "--ground-truth", truth, "--answers", answers, "--report", tmp_path / "r")
    rows = list(csv.DictReader((tmp_path / "r" / "predictions.csv").open()))
    assert len(rows) == 40 and rows[0]["image_id"] == "stack_1.tiff#0"
    page = (tmp_path / "r" / "report.html").read_text()
    assert "crop not found" not in page and "stack_1.tiff#0" in page
    images, broken = in_browser(tmp_path / "r" / "report.html", tmp_path)
    assert images > 3 + 16 and broken == 0
