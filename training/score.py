"""The leaderboard's scoring, locally: what the organizers' Track 2 evaluation computes, from the same inputs.

Source: DeepMicroscopy/MIDOG25_T2_evaluation_docker, ``evaluate.py`` at commit
2d1b108e3ed573012e185148f2547d8a18e7fa30 (27 Jul 2025, the newest to touch it; since then ``confidence`` is
P(atypical) whatever the class). Reimplemented here from reading it, not copied.

**Ground truth** (their format): ``[{"image": "stack_N.tiff", "labels": ["normal" | "atypical", ...],
"tumordomains": [int, ...]}, ...]``, one entry per stack, ``labels`` and ``tumordomains`` one per page. Their
domains 0-11 are the final test set's tumor types (:data:`OFFICIAL_DOMAINS`); stacks built here from the training
data number their own domains (``CASES/domains.json``).

**Answers**, one per stack, in either layout (:func:`collect_answers`):

- (a) ``DIR/<stem of the GT image name>/multiple-mitotic-figure-classification.json`` (what :func:`run_image`
  writes);
- (b) Grand Challenge's evaluation input: ``DIR/predictions.json`` (a list of jobs: ``pk``, ``inputs`` with the
  stack's image name, ``outputs`` with the answer's ``relative_path``) + ``DIR/<pk>/output/<relative_path>``.

**Per stack**, as theirs checks (:func:`check_answer`), any failure failing the whole evaluation, as in theirs: the
stack has a GT entry ("No GT for this image"); the answer has the GT's length ("Results length does not match GT
length"); every entry is a dict ("Needs list of dictionaries"), has ``class`` and ``confidence``, ``class`` is
``normal`` or ``atypical``, ``confidence`` is a JSON float (``1`` is an int and fails, ``true`` fails, ``1.0``
passes). Where theirs would crash instead of naming a reason (no answer file, invalid JSON, an answer that is not a
list), this module names one too. GT stacks without an answer are not scored, as in theirs (their GT may cover
more stacks than a phase's jobs); they are listed under ``stacks_without_answer``.

**Figures** (:func:`score`), atypical = positive class, classes from ``class``, AUC from ``confidence``:

- pooled over all stacks' pages: ``overall_sensitivity`` = TP / (TP + FN), ``overall_specificity`` =
  TN / (TN + FP), ``overall_balanced_accuracy`` = their mean, ``overall_accuracy``, from counts summed over
  stacks; ``overall_roc_auc`` from the pooled confidences;
- per tumor domain, ``domain_<id>`` (ids ascending): ``sensitivity``, ``specificity``, ``balanced_accuracy``,
  ``accuracy``, ``roc_auc``. A domain without atypical (normal) pages gets sensitivity (specificity) 0.0, as
  theirs does (sklearn's ``recall_score`` returns 0.0 there, with a warning).

Where theirs would crash on the figures themselves, the figure is ``null`` here and ``notes`` says why: a ROC AUC
over one class only, or over a non-finite confidence (JSON ``NaN`` passes their float check; sklearn then raises);
an overall sensitivity (specificity) without atypical (normal) pages (a division by zero in theirs).

Output (:func:`score` returns it, ``--json`` writes it): ``{"aggregates": <their metrics.json "aggregates", same
keys>, "n_stacks", "n_figures", "n_atypical", "domains": {"<id>": {"name", "n", "n_atypical"}},
"stacks_without_answer": [...], "notes": [...]}``.

:func:`run_image` runs a built container image over a folder of cases the way the platform runs an algorithm
(one ``docker run`` per case), into layout (a); ``python -m training score --image`` runs and then scores.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from contracts import ANSWER_FILENAME, INPUT_INTERFACE, MAX_PAGES
from training.metrics import balanced_accuracy

log = logging.getLogger(__name__)

# The final test set's tumor domains, by the ids the official ground truth uses (MIDOG 2025 challenge description).
OFFICIAL_DOMAINS = ("hMel", "hAC", "hBlC", "cMC", "ccMCT", "hMen", "hCoC", "cHAS", "fSTS", "fLym", "hGBM", "hLUAD")
OUTPUT_SLUG = Path(ANSWER_FILENAME).stem  # the algorithm's output socket
PREDICTIONS_FILE = "predictions.json"
CLASS_IDS = {"normal": 0, "atypical": 1}
GROUND_TRUTH_FILE = "ground_truth.json"
DOMAINS_FILE = "domains.json"
TIMES_FILE = "times.csv"


class ScoreError(ValueError):
    """An evaluation the official container would fail (or crash on), as one line naming the stack and reason."""


@dataclass(frozen=True)
class Truth:
    labels: np.ndarray  # int [n], 1 = atypical
    domains: np.ndarray  # int [n]


@dataclass(frozen=True)
class Answer:
    stack: str  # how messages name it: the answer folder, or "<image name> (job <pk>)"
    image: str | None  # the GT image name it answers (None: no GT entry matches)
    path: Path  # the answer JSON (it may be missing)


# ---------------------------------------------------------------------------------------------- reading


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScoreError(f"{what}: no {path.name} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScoreError(f"{what}: {path} is not valid JSON ({err})") from None


def read_ground_truth(path: Path) -> dict[str, Truth]:
    """Their ground_truth.json, checked (their code would crash on what fails here), keyed by image name."""
    data = _load_json(path, "ground truth")
    if not isinstance(data, list) or not data:
        raise ScoreError(f"ground truth {path}: want a non-empty list of {{image, labels, tumordomains}}")
    truth: dict[str, Truth] = {}
    for i, entry in enumerate(data):
        where = f"ground truth {path}, entry {i}"
        if not isinstance(entry, dict) or not all(k in entry for k in ("image", "labels", "tumordomains")):
            raise ScoreError(f"{where}: want a dict with image, labels and tumordomains")
        image, labels, domains = entry["image"], entry["labels"], entry["tumordomains"]
        if not isinstance(image, str) or image in truth:
            raise ScoreError(f"{where}: image must be a name not used before (got {image!r})")
        if not isinstance(labels, list) or any(x not in CLASS_IDS for x in labels):
            raise ScoreError(f"{where} ({image}): labels must be a list of 'normal' / 'atypical'")
        if not isinstance(domains, list) or any(type(d) is not int for d in domains) or len(domains) != len(labels):
            raise ScoreError(f"{where} ({image}): tumordomains must be one int per label")
        truth[image] = Truth(np.array([CLASS_IDS[x] for x in labels], int), np.array(domains, int))
    return truth


def read_domain_names(path: Path | None) -> dict[int, str]:
    """Domain id -> name: a ``domains.json`` (``{"0": "Aperio CS2", ...}``, as ``stacks`` writes) when given,
    else the official tumor domains."""
    if path is None:
        return dict(enumerate(OFFICIAL_DOMAINS))
    data = _load_json(path, "domain names")
    try:
        return {int(k): str(v) for k, v in data.items()}
    except (AttributeError, ValueError):
        raise ScoreError(f'domain names {path}: want {{"<id>": "<name>", ...}}') from None


def _stem(image: str) -> str:
    return image.split(".", 1)[0]  # "stack_1.tiff" -> "stack_1"; GC names may carry a double suffix


def collect_answers(answers_dir: Path, truth: dict[str, Truth]) -> list[Answer]:
    """The answers in ``answers_dir``: layout (b) when it holds ``predictions.json``, else layout (a) (every
    sub-folder is one stack; files beside them, such as ``times.csv``, are ignored)."""
    if not answers_dir.is_dir():
        raise ScoreError(f"answers: {answers_dir} is not a folder")
    if (answers_dir / PREDICTIONS_FILE).is_file():
        return _grand_challenge_answers(answers_dir)
    by_stem = {_stem(image): image for image in truth}
    folders = sorted((p for p in answers_dir.iterdir() if p.is_dir()), key=lambda p: _natural(p.name))
    if not folders:
        raise ScoreError(f"answers: {answers_dir} holds no answer folders (nor {PREDICTIONS_FILE})")
    return [Answer(p.name, by_stem.get(p.name), p / ANSWER_FILENAME) for p in folders]


def _grand_challenge_answers(answers_dir: Path) -> list[Answer]:
    """Layout (b): each job's input image name and where its answer lies, as theirs reads predictions.json."""
    jobs = _load_json(answers_dir / PREDICTIONS_FILE, PREDICTIONS_FILE)
    if not isinstance(jobs, list) or not jobs:
        raise ScoreError(f"{PREDICTIONS_FILE}: want a non-empty list of jobs")
    answers = []
    for i, job in enumerate(jobs):
        try:
            pk = str(job["pk"])
            inputs = {v["interface"]["slug"]: v for v in job["inputs"]}
            outputs = {v["interface"]["slug"]: v for v in job["outputs"]}
        except (KeyError, TypeError):
            raise ScoreError(f"{PREDICTIONS_FILE}, job {i}: want pk, inputs and outputs with interface slugs") from None
        # theirs dispatches on the set of input sockets: any other set has no handler
        if sorted(inputs) != [INPUT_INTERFACE]:
            raise ScoreError(f"job {pk}: inputs {sorted(inputs)} are not the interface ({INPUT_INTERFACE},)")
        if OUTPUT_SLUG not in outputs:
            raise ScoreError(f"job {pk}: Value with interface {OUTPUT_SLUG} not found!")
        try:
            image = inputs[INPUT_INTERFACE]["image"]["name"]
            relative = outputs[OUTPUT_SLUG]["interface"]["relative_path"]
        except (KeyError, TypeError):
            raise ScoreError(f"job {pk}: no input image name or output relative_path") from None
        answers.append(Answer(f"{image} (job {pk})", image, answers_dir / pk / "output" / relative))
    return answers


def _natural(name: str) -> list:
    """stack_2 before stack_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------- checking


def check_answer(stack: str, answer: object, n_expected: int) -> tuple[np.ndarray, np.ndarray]:
    """One stack's answer, checked as theirs checks it: (classes int [n], 1 = atypical; confidences float [n]).
    Raises :class:`ScoreError` naming ``stack`` and their reason."""
    if not isinstance(answer, list):  # theirs would take len() of it and crash, or iterate a dict's keys
        raise ScoreError(f"{stack}: Output format is wrong. Needs list of dictionaries (got {type(answer).__name__})")
    if len(answer) != n_expected:
        raise ScoreError(f"{stack}: Results length does not match GT length. "
                         f"(result lengths={len(answer)}, GT length={n_expected})")  # fmt: skip
    classes, confidences = [], []
    for i, entry in enumerate(answer):
        where = f"{stack}: entry {i}"
        if not isinstance(entry, dict):
            raise ScoreError(f"{where}: Output format is wrong. Needs list of dictionaries.")
        if "class" not in entry or "confidence" not in entry:
            raise ScoreError(f"{where}: Output format is wrong. Needs to be list of dictionaries with entries "
                             '"class" and "confidence"')  # fmt: skip
        if entry["class"] not in CLASS_IDS:
            raise ScoreError(f"{where}: Output format is wrong. Class needs to be either normal or atypical "
                             f"(got {entry['class']!r}).")  # fmt: skip
        # isinstance(x, float), as theirs: a JSON integer (1) and a bool are not floats, 1.0 is
        if not isinstance(entry["confidence"], float):
            raise ScoreError(f"{where}: Output format is wrong. Confidence needs to be of type float "
                             f"(got {json.dumps(entry['confidence'])}).")  # fmt: skip
        classes.append(CLASS_IDS[entry["class"]])
        confidences.append(entry["confidence"])
    return np.array(classes, int), np.array(confidences, float)


# ---------------------------------------------------------------------------------------------- figures


def _auc(labels: np.ndarray, scores: np.ndarray, where: str, notes: list[str]) -> float | None:
    if len(np.unique(labels)) < 2:
        notes.append(f"{where}: roc_auc null, one class only (the official evaluation raises here)")
        return None
    if not np.isfinite(scores).all():
        notes.append(f"{where}: roc_auc null, a confidence is not finite (the official evaluation raises here)")
        return None
    return float(roc_auc_score(labels, scores))


def _domain_figures(labels: np.ndarray, classes: np.ndarray, scores: np.ndarray, where: str,
                    notes: list[str]) -> dict[str, float | None]:  # fmt: skip
    with warnings.catch_warnings():
        # theirs: recall_score's default zero_division gives 0.0 for an absent class, with a warning we document
        warnings.simplefilter("ignore")
        sensitivity = float(recall_score(labels, classes))
        specificity = float(recall_score(labels, classes, pos_label=0))
    for name, absent in (("sensitivity", not labels.any()), ("specificity", labels.all())):
        if absent:
            notes.append(f"{where}: {name} 0.0, no {'atypical' if name == 'sensitivity' else 'normal'} pages "
                         "(as the official evaluation reports it)")  # fmt: skip
    ba = balanced_accuracy(labels, classes)  # the same 0.0-for-an-absent-class convention as recall_score
    assert math.isclose(ba, (sensitivity + specificity) / 2, abs_tol=1e-12)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": ba,
        "accuracy": float(accuracy_score(labels, classes)),
        "roc_auc": _auc(labels, scores, where, notes),
    }


def score(truth: dict[str, Truth], answers: Sequence[Answer], domain_names: dict[int, str] | None = None) -> dict:
    """Check every answer (the first failure raises :class:`ScoreError`) and compute the figures (module
    docstring). ``domain_names`` only labels ``domains`` in the result."""
    if not answers:
        raise ScoreError("no answers to score")
    labels, classes, scores, domains, scored = [], [], [], [], set()
    for answer in answers:
        if answer.image is None or answer.image not in truth:
            name = answer.image or f"{answer.stack}.*"
            raise ScoreError(f"{answer.stack}: No GT for this image: {name}")
        gt = truth[answer.image]
        got, conf = check_answer(answer.stack, _load_json(answer.path, answer.stack), len(gt.labels))
        labels.append(gt.labels)
        classes.append(got)
        scores.append(conf)
        domains.append(gt.domains)
        scored.add(answer.image)
    y, pred, prob, dom = (np.concatenate(x) for x in (labels, classes, scores, domains))
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    fn, tn = int(((pred == 0) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    notes: list[str] = []
    sensitivity = tp / (tp + fn) if tp + fn else None
    specificity = tn / (tn + fp) if tn + fp else None
    if sensitivity is None or specificity is None:
        notes.append("overall: no atypical or no normal pages, sensitivity or specificity null (the official "
                     "evaluation divides by zero here)")  # fmt: skip
    aggregates: dict = {
        "overall_sensitivity": sensitivity,
        "overall_specificity": specificity,
        "overall_balanced_accuracy": None if None in (sensitivity, specificity) else (sensitivity + specificity) / 2,
        "overall_roc_auc": _auc(y, prob, "overall", notes),
        "overall_accuracy": (tp + tn) / (tp + fn + fp + tn),
    }
    names = domain_names if domain_names is not None else dict(enumerate(OFFICIAL_DOMAINS))
    for d in np.unique(dom):
        m = dom == d
        aggregates[f"domain_{d}"] = _domain_figures(y[m], pred[m], prob[m], f"domain_{d}", notes)
    return {
        "aggregates": aggregates,
        "n_stacks": len(answers),
        "n_figures": len(y),
        "n_atypical": int(y.sum()),
        "domains": {
            str(d): {"name": names.get(int(d)), "n": int((dom == d).sum()), "n_atypical": int(y[dom == d].sum())}
            for d in np.unique(dom)
        },
        "stacks_without_answer": sorted(set(truth) - scored, key=_natural),
        "notes": notes,
    }


def table(result: dict) -> str:
    """The figures as a short table: overall, then each domain with its name."""
    keys = ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc")

    def cells(figs: dict, prefix: str = "") -> str:
        values = (figs[prefix + k] for k in keys)
        return "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in values)

    agg = result["aggregates"]
    lines = [f"{'':24}{'figures':>8}{'atypical':>9}{'BA':>10}{'sens':>10}{'spec':>10}{'acc':>10}{'AUC':>10}",
             f"{'overall':24}{result['n_figures']:>8d}{result['n_atypical']:>9d}" + cells(agg, "overall_")]  # fmt: skip
    for d, info in result["domains"].items():
        label = f"domain_{d} {info['name'] or ''}".strip()
        lines.append(f"{label[:24]:24}{info['n']:>8d}{info['n_atypical']:>9d}" + cells(agg[f"domain_{d}"]))
    lines.append(f"{result['n_stacks']} stacks scored" + (
        f"; {len(result['stacks_without_answer'])} ground-truth stacks without an answer, not scored"
        if result["stacks_without_answer"] else ""))  # fmt: skip
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def score_folder(ground_truth: Path, answers_dir: Path, json_out: Path | None = None,
                 domains_file: Path | None = None) -> dict:  # fmt: skip
    """``python -m training score``: read, check, score, print the table, write ``json_out``. Domain names come
    from ``domains_file``, else from a ``domains.json`` beside the ground truth, else the official ones."""
    if domains_file is None and (ground_truth.parent / DOMAINS_FILE).is_file():
        domains_file = ground_truth.parent / DOMAINS_FILE
    truth = read_ground_truth(ground_truth)
    result = score(truth, collect_answers(answers_dir, truth), read_domain_names(domains_file))
    print(table(result))  # the report is this command's output
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        log.info("wrote %s", json_out)
    return result


# ---------------------------------------------------------------------------------------------- running an image


@dataclass(frozen=True)
class CaseRun:
    stack: str
    seconds: float  # wall time of `docker run`: container creation, start, the algorithm, exit, removal
    returncode: int
    stderr_tail: str  # the last non-empty line of its stderr


def docker_command(image: str, case_dir: Path, output_dir: Path, device: str | None = None,
                   docker: str = "docker") -> list[str]:  # fmt: skip
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
    cases = sorted((p for p in cases_dir.iterdir() if (p / "inputs.json").is_file()), key=lambda p: _natural(p.name))
    if not cases:
        raise ScoreError(f"cases: no case folders (with inputs.json) in {cases_dir}")
    return cases


def run_image(image: str, cases_dir: Path, output_dir: Path, device: str | None = None,
              runner: Callable[[list[str]], subprocess.CompletedProcess] = _run,
              docker: str = "docker") -> list[CaseRun]:  # fmt: skip
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


def run_and_score(image: str, cases_dir: Path, ground_truth: Path, answers_dir: Path, json_out: Path | None = None,
                  device: str | None = None, domains_file: Path | None = None) -> dict:  # fmt: skip
    """``score --image``: run the image over the cases, then score. A failed case fails the command before
    scoring, as one failed job fails a submission on the platform."""
    runs = run_image(image, cases_dir, answers_dir, device)
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed case(s))" if len(failed) > 1 else ""
        raise ScoreError(f"{first.stack}: the image exited {first.returncode}: {first.stderr_tail or '(no stderr)'}"
                         f"{more}; times in {answers_dir / TIMES_FILE}")  # fmt: skip
    times = np.array([r.seconds for r in runs])
    log.info("%d cases, %.1f s each on average (max %.1f s)", len(runs), times.mean(), times.max())
    return score_folder(ground_truth, answers_dir, json_out, domains_file)


# ---------------------------------------------------------------------------------------------- building cases


def build_stacks(data_roots: list[Path], output: Path, stack_size: int = MAX_PAGES, n_stacks: int | None = None,
                 seed: int = 0, domain: str = "tumor") -> dict:  # fmt: skip
    """Grand Challenge cases from dataset folders, with a ground truth in the official format.

    Writes ``output/stack_<k>/`` (k = 1, 2, ...; ``inputs.json`` + ``images/<interface>/stack_<k>.tiff``, via
    ``training.synthetic.write_case``), ``output/ground_truth.json`` (official format), ``output/domains.json``
    (``{"<id>": "<name>"}``: ids number the figures' distinct tumors or scanners, sorted by name; the official ids
    0-11 are the final test set's tumor types, which the training data does not hold, so these are local ids)
    and ``output/figures.csv`` (stack, page, image_id, label, scanner, tumor, domain: where each page came from).

    Figures are shuffled with ``seed``, then grouped by their scanner's pixel size (``SCANNER_PIXEL_SIZE_UM``;
    unknown ones form a group of their own) so that each TIFF records one true resolution, as the organizers'
    sample stack does; each group is cut into stacks of ``stack_size`` in shuffled order, its last stack shorter.
    ``n_stacks`` keeps the first that many. Returns ``{"stacks", "figures"}``.
    """
    from training.data import decode_figures, read_datasets, scanner_pixel_sizes
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
    stacks = [g[k : k + stack_size] for g in groups.values() for k in range(0, len(g), stack_size)]
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
        write_case(output / name, np.stack([pixels[i] for i in members]), name=name, fmt="tiff",
                   pixel_size_um=sizes[members[0]])  # fmt: skip
        figs = [figures[i] for i in members]
        truth.append({"image": f"{name}.tiff", "labels": ["atypical" if f.label else "normal" for f in figs],
                      "tumordomains": [domain_id[attribute(f)] for f in figs]})  # fmt: skip
        rows.extend((name, page, f.image_id, f.label, f.scanner, f.tumor, domain_id[attribute(f)])
                    for page, f in enumerate(figs))  # fmt: skip
    (output / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1) + "\n")
    (output / DOMAINS_FILE).write_text(json.dumps({str(k): n for n, k in domain_id.items()}, indent=1) + "\n")
    with (output / "figures.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("stack", "page", "image_id", "label", "scanner", "tumor", "domain"))
        writer.writerows(rows)
    log.info("wrote %d stacks of %d figures to %s (domains by %s: %s)", len(stacks), len(chosen), output, domain,
             ", ".join(names))  # fmt: skip
    return {"stacks": len(stacks), "figures": len(chosen)}
