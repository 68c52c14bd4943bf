"""An experiment grid's figures: ``results.csv`` (one row per cell), ``domains.csv``, ``report.md`` and PNG plots.

Every figure of a cell comes from its pooled out-of-fold predictions (``oof.csv``), scored by
``training.evaluate`` exactly as the challenge scores: classes at the cell's threshold (chosen on those
predictions, BA-maximizing) and, threshold-free, at 0.5.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from contracts import classify
from training.evaluate import evaluate
from training.lab.grid import BLUR_FILE, STACK, Cell, GridConfig
from training.lab.plots import PLOTS
from training.metrics import balanced_accuracy, read_predictions
from training.run import RunFolder, provenance

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    *("cell", "method", "backbone", "mode", "split", "data", "seed", "n_train", "threshold", "balanced_accuracy"),
    *("ba_ci_lo", "ba_ci_hi", "sensitivity", "specificity", "accuracy", "roc_auc", "ba_at_0.5", "parameters_m"),
    *("gflops_per_image", "cpu_s_per_stack"),
)
DOMAIN_COLUMNS = ("cell", "method", "split", "data", "seed", "domain", "balanced_accuracy", "sensitivity")
DOMAIN_COLUMNS += ("specificity", "accuracy", "roc_auc", "n")


def cell_result(cell: Cell, run_dir: Path, costs: dict[str, dict[str, float]]) -> dict:
    run = RunFolder(run_dir)
    summary = run.read_summary()
    oof = read_predictions(run.oof, threshold=summary["threshold"])
    oof["scanner"] = oof["domain"]
    scored = evaluate({**oof, "domain": oof[cell.domain_key]})
    folds = [run.fold(k).read_best() for k in range(cell.config.folds)]
    row = {
        "cell": cell.name,
        "method": cell.method,
        "backbone": cell.config.backbone,
        "mode": cell.config.mode,
        "split": cell.split,
        "data": cell.data,
        "seed": cell.seed,
        "n_train": round(float(np.mean([f["n_train"] for f in folds]))),
        "threshold": summary["threshold"],
        **{k: scored[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc")},
        "ba_ci_lo": scored["balanced_accuracy_ci"][0],
        "ba_ci_hi": scored["balanced_accuracy_ci"][1],
        "ba_at_0.5": balanced_accuracy(oof["label"], classify(oof["prob"], 0.5)),
        **costs.get(cell.method, {}),
    }
    row["domains"] = scored["domains"]
    row["oof"] = oof
    blur = run_dir / BLUR_FILE
    row["blur"] = json.loads(blur.read_text()) if blur.is_file() else None
    return row


def collect(cells: list[Cell], cells_dir: Path, costs: dict[str, dict[str, float]]) -> list[dict]:
    return [cell_result(c, cells_dir / c.name, costs) for c in cells if RunFolder(cells_dir / c.name).finished]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: r.get(k, "") for k in columns} for r in rows])


def _domain_rows(rows: list[dict]) -> list[dict]:
    return [
        {
            "cell": r["cell"],
            "method": r["method"],
            "split": r["split"],
            "data": r["data"],
            "seed": r["seed"],
            "domain": name,
            **figs,
        }
        for r in rows
        for name, figs in r["domains"].items()
    ]


def _table(columns: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
        *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows),
    ]


def write_report(
    grid_path: Path,
    grid: GridConfig,
    rows: list[dict],
    output: Path,
    report_dir: Path,
    data_roots: list[Path],
    unfinished: list[str],
    shard: str | None = None,
) -> None:
    """``results.csv``, ``domains.csv``, the plots and ``report.md`` (naming the command that wrote it) into
    ``report_dir``, from the finished cells' ``rows`` (``collect``)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(report_dir / "results.csv", RESULT_COLUMNS, rows)
    _write_csv(report_dir / "domains.csv", DOMAIN_COLUMNS, _domain_rows(rows))
    command = (
        f"python -m training experiment --config {grid_path} --data-root {' '.join(map(str, data_roots))} "
        f"--output {output}"
        + (f" --report-dir {report_dir}" if report_dir != output else "")
        + (f" --shard {shard}" if shard else "")
    )
    not_run = f"; {len(unfinished)} not yet run: {', '.join(unfinished)}." if unfinished else "."
    lines = [
        f"# Experiment grid `{grid.name}`",
        "",
        f"Written by `{command}` (commit {provenance(data_roots)['git']}) from {len(rows)} finished cells{not_run}",
        "",
        "Each cell trains every fold of its split; its figures are those of its pooled out-of-fold predictions, "
        "scored as the challenge scores (`training.evaluate`): classes at the threshold chosen on them "
        "(BA-maximizing), `ba_at_0.5` at the fixed threshold 0.5, a 95% bootstrap interval over figures. "
        "`n_train`: training figures per fold. `results.csv` and `domains.csv` beside this file hold every figure.",
        *_cell_sections(rows),
        *_blur_section(rows),
        *_cost_section(rows),
        "",
        "## Plots",
        "",
    ]
    for name, (plot, title) in PLOTS.items():
        if plot(rows, report_dir / name):
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    (report_dir / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    log.info("wrote %s (%d cells)", report_dir / "report.md", len(rows))


def _cell_sections(rows: list[dict]) -> list[str]:
    cols = ["method", "split", "data", "seed", "n_train", "balanced_accuracy", "ba_ci_lo", "ba_ci_hi", "roc_auc"]
    cols += ["sensitivity", "specificity", "ba_at_0.5"]
    dcols = ["method", "split", "data", "seed", "domain", "balanced_accuracy", "roc_auc", "n"]
    return [
        "",
        "## Cells",
        "",
        *_table(cols, [[r[c] for c in cols] for r in rows]),
        "",
        "## Per domain",
        "",
        "Per scanner (per tumor for tumor-out); in a `-out` split, each domain's figures were scored by the fold "
        "that never saw that domain.",
        "",
        *_table(dcols, [[d[c] for c in dcols] for d in _domain_rows(rows)]),
    ]


def _blur_section(rows: list[dict]) -> list[str]:
    blurred = [r for r in rows if r["blur"]]
    if not blurred:
        return []
    sigmas = sorted(blurred[0]["blur"]["pre"], key=float)
    table = [
        [r["method"], where, *(r["blur"][where][s]["balanced_accuracy"] for s in sigmas)]
        for r in blurred
        for where in ("pre", "post")
    ]
    return [
        "",
        "## Blur robustness",
        "",
        "Balanced accuracy (at the cell's threshold) with every held-out figure blurred by a Gaussian of the given "
        "sigma, before the resize (on the 128 px crop-out) or after it (on the model's input); for models that "
        "take 128 px as they are, the two coincide.",
        "",
        *_table(["method", "where"] + [f"sigma {s}" for s in sigmas], table),
    ]


def _cost_section(rows: list[dict]) -> list[str]:
    costed = {r["method"]: r for r in rows if "gflops_per_image" in r}
    if not costed:
        return []
    ccols = ["method", "parameters_m", "gflops_per_image", "cpu_s_per_stack"]
    return [
        "",
        "## Cost",
        "",
        f"Parameters, GFLOPs per figure (resize included; PyTorch's FLOP counter), and the median CPU time of one "
        f"{STACK}-figure stack in PyTorch fp32 on the machine that ran the grid (noisy on shared machines: compare "
        "within one report only).",
        "",
        *_table(ccols, [[r[c] for c in ccols] for r in costed.values()]),
    ]
