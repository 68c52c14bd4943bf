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

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from contracts import ANSWER_FILENAME, INPUT_INTERFACE
from training.metrics import scores

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
    folders = sorted((p for p in answers_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
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


def natural_key(name: str) -> list:
    """stack_2 before stack_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------- checking


def check_answer(stack: str, answer: object, n_expected: int) -> tuple[np.ndarray, np.ndarray]:
    """One stack's answer, checked as theirs checks it: (classes int [n], 1 = atypical; confidences float [n]).
    Raises :class:`ScoreError` naming ``stack`` and their reason."""
    if not isinstance(answer, list):  # theirs would take len() of it and crash, or iterate a dict's keys
        raise ScoreError(f"{stack}: Output format is wrong. Needs list of dictionaries (got {type(answer).__name__})")
    if len(answer) != n_expected:
        raise ScoreError(
            f"{stack}: Results length does not match GT length. (result lengths={len(answer)}, GT length={n_expected})"
        )
    classes, confidences = [], []
    for i, entry in enumerate(answer):
        where = f"{stack}: entry {i}"
        if not isinstance(entry, dict):
            raise ScoreError(f"{where}: Output format is wrong. Needs list of dictionaries.")
        if "class" not in entry or "confidence" not in entry:
            raise ScoreError(
                f"{where}: Output format is wrong. Needs to be list of dictionaries with entries "
                '"class" and "confidence"'
            )
        if entry["class"] not in CLASS_IDS:
            raise ScoreError(
                f"{where}: Output format is wrong. Class needs to be either normal or atypical "
                f"(got {entry['class']!r})."
            )
        # isinstance(x, float), as theirs: a JSON integer (1) and a bool are not floats, 1.0 is
        if not isinstance(entry["confidence"], float):
            raise ScoreError(
                f"{where}: Output format is wrong. Confidence needs to be of type float "
                f"(got {json.dumps(entry['confidence'])})."
            )
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


def _domain_metrics(
    labels: np.ndarray, classes: np.ndarray, confidences: np.ndarray, where: str, notes: list[str]
) -> dict[str, float | None]:
    """``training.metrics.scores`` (the official conventions), with a note where a class is absent and the AUC as
    null where the official evaluation would raise."""
    for name, absent in (("sensitivity", not labels.any()), ("specificity", labels.all())):
        if absent:
            notes.append(
                f"{where}: {name} 0.0, no {'atypical' if name == 'sensitivity' else 'normal'} pages "
                "(as the official evaluation reports it)"
            )
    result = scores(labels, classes, confidences)
    names = ("sensitivity", "specificity", "balanced_accuracy", "accuracy")
    return {**{k: result[k] for k in names}, "roc_auc": _auc(labels, confidences, where, notes)}


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
        notes.append(
            "overall: no atypical or no normal pages, sensitivity or specificity null (the official "
            "evaluation divides by zero here)"
        )
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
        aggregates[f"domain_{d}"] = _domain_metrics(y[m], pred[m], prob[m], f"domain_{d}", notes)
    return {
        "aggregates": aggregates,
        "n_stacks": len(answers),
        "n_figures": len(y),
        "n_atypical": int(y.sum()),
        "domains": {
            str(d): {"name": names.get(int(d)), "n": int((dom == d).sum()), "n_atypical": int(y[dom == d].sum())}
            for d in np.unique(dom)
        },
        "stacks_without_answer": sorted(set(truth) - scored, key=natural_key),
        "notes": notes,
    }
