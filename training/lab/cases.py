"""Cases for the leaderboard's scoring (``training.lab.score``): stacks with a ground truth built from dataset
folders (``python -m training stacks``), a container image run over them one ``docker run`` per case, as the
platform runs an algorithm (``score --image``), and the scored report of a folder of answers (``score``)."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts import INPUT_INTERFACE, MAX_PAGES
from training.lab.score import (
    DOMAINS_FILE,
    GROUND_TRUTH_FILE,
    TIMES_FILE,
    ScoreError,
    check_answer,
    collect_answers,
    natural_key,
    read_domain_names,
    read_ground_truth,
    score,
)

log = logging.getLogger(__name__)


def table(result: dict) -> str:
    """The figures as a short table: overall, then each domain with its name."""
    keys = ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc")

    def cells(figs: dict, prefix: str = "") -> str:
        values = (figs[prefix + k] for k in keys)
        return "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in values)

    agg = result["aggregates"]
    lines = [
        f"{'':24}{'figures':>8}{'atypical':>9}{'BA':>10}{'sens':>10}{'spec':>10}{'acc':>10}{'AUC':>10}",
        f"{'overall':24}{result['n_figures']:>8d}{result['n_atypical']:>9d}" + cells(agg, "overall_"),
    ]
    for d, info in result["domains"].items():
        label = f"domain_{d} {info['name'] or ''}".strip()
        lines.append(f"{label[:24]:24}{info['n']:>8d}{info['n_atypical']:>9d}" + cells(agg[f"domain_{d}"]))
    lines.append(
        f"{result['n_stacks']} stacks scored"
        + (
            f"; {len(result['stacks_without_answer'])} ground-truth stacks without an answer, not scored"
            if result["stacks_without_answer"]
            else ""
        )
    )
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def write_score_report(ground_truth: Path, truth: dict, answers: list, names: dict[int, str], report: Path) -> Path:
    """The answers as a predictions CSV (``report/predictions.csv``; each page's crop named ``<stack>#<page>``,
    the stacks looked up in their case folders beside the ground truth) and its page (``training.pages``)."""
    from training.pages import STACK_PAGE, write_report

    rows = []
    for answer in (a for a in answers if a.image in truth):
        gt = truth[answer.image]
        classes, probs = check_answer(answer.stack, json.loads(answer.path.read_text()), len(gt.labels))
        stack = ground_truth.parent / Path(answer.image).stem / "images" / INPUT_INTERFACE / answer.image
        for page, (label, domain, pred, prob) in enumerate(zip(gt.labels, gt.domains, classes, probs, strict=True)):
            figure = f"{STACK_PAGE}{page}"
            name = names.get(int(domain), str(domain))
            rows.append([f"{answer.image}{figure}", label, repr(float(prob)), pred, name, f"{stack}{figure}"])
    report.mkdir(parents=True, exist_ok=True)
    with (report / "predictions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_id", "label", "prob_atypical", "pred", "domain", "path"), *rows])
    return write_report(report / "predictions.csv", report)


def score_folder(
    ground_truth: Path,
    answers_dir: Path,
    json_out: Path | None = None,
    domains_file: Path | None = None,
    report: Path | None = None,
) -> dict:
    """``python -m training score``: read, check, score, print the table, write ``json_out``. Domain names come
    from ``domains_file``, else from a ``domains.json`` beside the ground truth, else the official ones. With
    ``report``, the answers' page too (``write_score_report``)."""
    if domains_file is None and (ground_truth.parent / DOMAINS_FILE).is_file():
        domains_file = ground_truth.parent / DOMAINS_FILE
    truth = read_ground_truth(ground_truth)
    answers = collect_answers(answers_dir, truth)
    names = read_domain_names(domains_file)
    result = score(truth, answers, names)
    print(table(result))  # the report is this command's output
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        log.info("wrote %s", json_out)
    if report is not None:
        write_score_report(ground_truth, truth, answers, names, report)
    return result


@dataclass(frozen=True)
class CaseRun:
    stack: str
    seconds: float  # wall time of `docker run`: container creation, start, the algorithm, exit, removal
    returncode: int
    stderr_tail: str  # the last non-empty line of its stderr


def docker_command(
    image: str, case_dir: Path, output_dir: Path, device: str | None = None, docker: str = "docker"
) -> list[str]:
    """One case as Grand Challenge runs an algorithm: no network, 1 GiB /dev/shm, the case read-only at /input,
    an empty /output. ``device="cpu"`` passes ``MIDOG_DEVICE=cpu`` (the image's entry point reads it; default
    cuda) for a host without a GPU; otherwise the GPUs are passed in (``--gpus all``), as the platform does."""
    cmd = [docker, "run", "--rm", "--network", "none", "--shm-size", "1024M"]
    cmd += ["--env", "MIDOG_DEVICE=cpu"] if device == "cpu" else ["--gpus", "all"]
    cmd += ["-v", f"{case_dir.resolve()}:/input:ro", "-v", f"{output_dir.resolve()}:/output", image]
    return cmd


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def list_cases(cases_dir: Path) -> list[Path]:
    """The Grand Challenge input folders (those holding ``inputs.json``) in ``cases_dir``, in natural order."""
    cases = sorted((p for p in cases_dir.iterdir() if (p / "inputs.json").is_file()), key=lambda p: natural_key(p.name))
    if not cases:
        raise ScoreError(f"cases: no case folders (with inputs.json) in {cases_dir}")
    return cases


def run_image(
    image: str,
    cases_dir: Path,
    output_dir: Path,
    device: str | None = None,
    runner: Callable[[list[str]], subprocess.CompletedProcess] = _run,
    docker: str = "docker",
) -> list[CaseRun]:
    """Run ``image`` on every case of ``cases_dir`` (one ``docker run`` each, :func:`docker_command`), its answer
    into ``output_dir/<case>/`` (layout (a)), and write ``output_dir/times.csv`` (stack, seconds, returncode).

    Each case's output folder is emptied first and opened to everyone (chmod 777: the image runs as a non-root
    user). A case that exits non-zero is logged with its last stderr line and its folder removed, so that no
    answer stands for it. ``runner`` runs a command and returns its CompletedProcess (tests inject a fake).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for case in list_cases(cases_dir):
        out = output_dir / case.name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        os.chmod(out, stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
        start = time.monotonic()
        done = runner(docker_command(image, case, out, device, docker))
        seconds = time.monotonic() - start
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        if not runs and (served := [line for line in lines if re.match(r"INFO model \S+ \(", line)]):
            log.info("%s serves %s", image, served[0].removeprefix("INFO "))  # which model the image holds
        run = CaseRun(case.name, seconds, done.returncode, lines[-1].strip() if lines else "")
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            log.error("%s: exit %d: %s", case.name, done.returncode, run.stderr_tail or "(no stderr)")
        else:
            log.info("%s: %.1f s", case.name, seconds)
        runs.append(run)
    with (output_dir / TIMES_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("stack", "seconds", "returncode"))
        writer.writerows((r.stack, f"{r.seconds:.3f}", r.returncode) for r in runs)
    return runs


def run_and_score(
    image: str,
    cases_dir: Path,
    ground_truth: Path,
    answers_dir: Path,
    json_out: Path | None = None,
    device: str | None = None,
    domains_file: Path | None = None,
    report: Path | None = None,
) -> dict:
    """``score --image``: run the image over the cases, then score (and ``report``, as ``score_folder``). A failed
    case fails the command before scoring, as one failed job fails a submission on the platform."""
    runs = run_image(image, cases_dir, answers_dir, device)
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed case(s))" if len(failed) > 1 else ""
        raise ScoreError(
            f"{first.stack}: the image exited {first.returncode}: {first.stderr_tail or '(no stderr)'}"
            f"{more}; times in {answers_dir / TIMES_FILE}"
        )
    times = np.array([r.seconds for r in runs])
    log.info("%d cases, %.1f s each on average (max %.1f s)", len(runs), times.mean(), times.max())
    return score_folder(ground_truth, answers_dir, json_out, domains_file, report)


# ---------------------------------------------------------------------------------------------- building cases


def build_stacks(
    data_roots: list[Path],
    output: Path,
    stack_size: int = MAX_PAGES,
    n_stacks: int | None = None,
    seed: int = 0,
    domain: str = "tumor",
) -> dict:
    """Grand Challenge cases from dataset folders, with a ground truth in the official format.

    Writes ``output/stack_<k>/`` (k = 1, 2, ...; ``inputs.json`` + ``images/<interface>/stack_<k>.tiff``, via
    ``training.synthetic.write_case``), ``output/ground_truth.json`` (official format), ``output/domains.json``
    (``{"<id>": "<name>"}``: ids number the figures' distinct tumors or scanners, sorted by name; the official ids
    0-11 are the final test set's tumor types, which the training data does not hold, so these are local ids)
    and ``output/figures.csv`` (stack, page, image_id, label, scanner, tumor, domain: where each page came from).

    Figures are shuffled with ``seed``, then grouped by their scanner's pixel size (``SCANNER_PIXEL_SIZE_UM``;
    unknown ones form a group of their own) so that each TIFF records one true resolution, as the organizers'
    sample stack does; each group is cut into stacks of ``stack_size`` in shuffled order, its last stack shorter,
    and the stacks are taken from the groups in turn. ``n_stacks`` keeps the first that many. Returns
    ``{"stacks", "figures"}``.
    """
    from training.data import read_datasets, scanner_pixel_sizes
    from training.pixels import decode_figures
    from training.synthetic import write_case

    if not 1 <= stack_size <= MAX_PAGES:
        raise ValueError(f"--stack-size must be 1..{MAX_PAGES} (the challenge's stacks), got {stack_size}")
    if domain not in ("tumor", "scanner"):
        raise ValueError(f"--domain must be tumor or scanner, got {domain!r}")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"{output} is not empty: write cases to a new folder")
    figures = read_datasets(data_roots)
    sizes = scanner_pixel_sizes(figures)
    order = np.random.default_rng(seed).permutation(len(figures))
    groups: dict[float | None, list[int]] = {}
    for i in order:
        groups.setdefault(sizes[i], []).append(int(i))
    per_group = [[g[k : k + stack_size] for k in range(0, len(g), stack_size)] for g in groups.values()]
    # taken in turn from each group, so that the first n_stacks hold every pixel size (every scanner kind)
    stacks = [s for turn in itertools.zip_longest(*per_group) for s in turn if s is not None]
    stacks = stacks[:n_stacks] if n_stacks is not None else stacks
    chosen = [i for s in stacks for i in s]
    pixels = dict(zip(chosen, decode_figures([figures[i] for i in chosen]), strict=True))

    attribute = (lambda f: f.tumor) if domain == "tumor" else (lambda f: f.scanner)
    names = sorted({attribute(f) for f in figures})
    domain_id = {name: k for k, name in enumerate(names)}
    output.mkdir(parents=True, exist_ok=True)
    truth, rows = [], []
    for k, members in enumerate(stacks, start=1):
        name = f"stack_{k}"
        pages = np.stack([pixels[i] for i in members])
        write_case(output / name, pages, name=name, fmt="tiff", pixel_size_um=sizes[members[0]])
        figs = [figures[i] for i in members]
        truth.append(
            {
                "image": f"{name}.tiff",
                "labels": ["atypical" if f.label else "normal" for f in figs],
                "tumordomains": [domain_id[attribute(f)] for f in figs],
            }
        )
        rows.extend(
            (name, page, f.image_id, f.label, f.scanner, f.tumor, domain_id[attribute(f)])
            for page, f in enumerate(figs)
        )
    (output / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1) + "\n")
    (output / DOMAINS_FILE).write_text(json.dumps({str(k): n for n, k in domain_id.items()}, indent=1) + "\n")
    with (output / "figures.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("stack", "page", "image_id", "label", "scanner", "tumor", "domain"))
        writer.writerows(rows)
    by = f"{domain}: {', '.join(names)}"
    shape = f"{len(chosen)} figures in {len(stacks)} stacks of up to {max(len(s) for s in stacks)}"
    log.info("wrote %s to %s (domains by %s)", shape, output, by)
    return {"stacks": len(stacks), "figures": len(chosen)}
