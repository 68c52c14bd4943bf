"""Labs the training never saw: a finished run's ensemble scored on external dataset folders, exactly as it will be
served (exported, then answered through ``process.py``'s own session on the CPU, each figure resampled from its
pixel size to the model's).

It runs only after every fold has finished and the threshold is in ``summary.json``: nothing of an external set
reaches a fold, a kept epoch or the threshold. The figures go to ``summary.json`` -> ``external`` (``evaluate``'s:
balanced accuracy at the run's threshold with its bootstrap interval, AUROC, sensitivity, specificity, the oracle
threshold's balanced accuracy for reference, the duplicates found) and the predictions to
``RUN/external/<name>.csv``, a page to look at them in ``RUN/external/<name>/report.html``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from training.evaluate import nan_as_null
from training.export import export_run
from training.pages import write_report
from training.predict import predict_folder
from training.run import RunFolder

log = logging.getLogger(__name__)


def external_names(roots: list[Path]) -> list[str]:
    """One name per external folder, its own (``atnorm-br``), numbered where two folders share a name."""
    names = []
    for root in roots:
        name = root.resolve().name
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def log_external(name: str, result: dict) -> None:
    lo, hi = result["balanced_accuracy_ci"]
    log.info(
        "external %s (%d figures): BA %.4f [%.4f, %.4f] at threshold %.4f, AUROC %.4f, sensitivity %.4f, "
        "specificity %.4f; oracle BA %.4f at %.4f; %d copies counted once, %d crop(s) under both classes left out",
        name,
        result["n"],
        result["balanced_accuracy"],
        lo,
        hi,
        result["threshold"],
        result["roc_auc"],
        result["sensitivity"],
        result["specificity"],
        result["oracle_balanced_accuracy"],
        result["oracle_threshold"],
        result["duplicates"]["copies"],
        len(result["duplicates"]["left_out"]),
    )


def score_run_externally(run_dir: Path, roots: list[Path]) -> dict[str, dict]:
    """The finished run exported to a temporary folder and scored on each of ``roots``; the figures are added to
    ``summary.json`` (replacing an earlier scoring's) and returned by name. ValueError for an unfinished run."""
    run = RunFolder(run_dir)
    if not run.finished:
        raise ValueError(f"{run_dir}: the run has not finished (no summary.json); external sets score a finished run")
    results = {}
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".external-") as tmp:
        model = Path(tmp) / "model"
        export_run([run_dir], model)
        for name, root in zip(external_names(roots), roots, strict=True):
            results[name] = result = predict_folder(model, root, run.external(name), device="cpu")
            log_external(name, result)
            write_report(run.external(name), run.external_report(name), threshold=result["threshold"])
    summary = run.read_summary()
    summary["external"] = nan_as_null(results)
    run.summary.write_text(json.dumps(summary, indent=1))
    return results
