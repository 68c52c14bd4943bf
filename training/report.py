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
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import roc_curve

from training.evaluate import evaluate, figures
from training.experiment import BLUR_FILE, STACK, SUMMARY, Cell, GridConfig
from training.train import FINISHED_MARKER, provenance

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "cell", "method", "backbone", "mode", "split", "data", "seed", "n_train", "threshold", "balanced_accuracy",
    "ba_ci_lo", "ba_ci_hi", "sensitivity", "specificity", "accuracy", "roc_auc", "ba_at_0.5", "parameters_m",
    "gflops_per_image", "cpu_s_per_stack",
)  # fmt: skip


def read_oof(run_dir: Path) -> dict[str, np.ndarray]:
    with (run_dir / "oof.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "fold": np.array([int(r["fold"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
        "prob": np.array([float(r["prob_atypical"]) for r in rows]),
        "scanner": np.array([r["domain"] for r in rows]),
        "tumor": np.array([r["tumor"] for r in rows]),
    }


def cell_result(cell: Cell, run_dir: Path, costs: dict[str, dict[str, float]]) -> dict:
    summary = json.loads((run_dir / SUMMARY).read_text())
    oof = read_oof(run_dir)
    pred = (oof["prob"] >= summary["threshold"]).astype(int)
    scored = evaluate({"label": oof["label"], "pred": pred, "prob": oof["prob"], "domain": oof[cell.domain_key]})
    folds = [json.loads((run_dir / f"fold_{k}" / FINISHED_MARKER).read_text()) for k in range(cell.config.folds)]
    row = {
        "cell": cell.name, "method": cell.method, "backbone": cell.config.backbone, "mode": cell.config.mode,
        "split": cell.split, "data": cell.data, "seed": cell.seed,
        "n_train": round(float(np.mean([f["n_train"] for f in folds]))), "threshold": summary["threshold"],
        **{k: scored[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "roc_auc")},
        "ba_ci_lo": scored["balanced_accuracy_ci"][0], "ba_ci_hi": scored["balanced_accuracy_ci"][1],
        "ba_at_0.5": figures(oof["label"], (oof["prob"] >= 0.5).astype(int), oof["prob"])["balanced_accuracy"],
        **costs.get(cell.method, {}),
    }  # fmt: skip
    row["domains"] = scored["domains"]
    row["oof"] = oof
    blur = run_dir / BLUR_FILE
    row["blur"] = json.loads(blur.read_text()) if blur.is_file() else None
    return row


def collect(cells: list[Cell], cells_dir: Path, costs: dict[str, dict[str, float]]) -> list[dict]:
    return [cell_result(c, cells_dir / c.name, costs) for c in cells if (cells_dir / c.name / SUMMARY).is_file()]


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
        {"cell": r["cell"], "method": r["method"], "split": r["split"], "data": r["data"], "seed": r["seed"],
         "domain": name, **figs}
        for r in rows
        for name, figs in r["domains"].items()
    ]  # fmt: skip


def _mean_over_seeds(rows: list[dict], key: str) -> dict[tuple[str, str, str], float]:
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["split"], r["data"])].append(r[key])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _full_data_first_seed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["data"] == "100%" and r["seed"] == min(x["seed"] for x in rows)]


def plot_data_scaling(rows: list[dict], path: Path) -> bool:
    """Balanced accuracy vs training figures per fold, one line per method, one panel per split that varies data."""
    splits = sorted({r["split"] for r in rows if len({x["data"] for x in rows if x["split"] == r["split"]}) > 1})
    if not splits:
        return False
    ba, n_train = _mean_over_seeds(rows, "balanced_accuracy"), _mean_over_seeds(rows, "n_train")
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for method in sorted({m for m, s, _ in ba if s == split}):
            keys = sorted((k for k in ba if k[:2] == (method, split)), key=n_train.get)
            ax.plot([n_train[k] for k in keys], [ba[k] for k in keys], marker="o", label=method)
        ax.set(xscale="log", xlabel="training figures per fold", ylabel="balanced accuracy (out-of-fold)",
               title=f"data scaling, {split} split")  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc(rows: list[dict], path: Path) -> bool:
    """ROC curve of every fold, and of the pooled out-of-fold predictions, per full-data cell (first seed)."""
    chosen = _full_data_first_seed(rows)
    if not chosen:
        return False
    cols = min(4, len(chosen))
    lines = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.6 * cols, 3.4 * lines), squeeze=False)
    for ax, r in zip(axes.flat, chosen, strict=False):
        oof = r["oof"]
        for k in np.unique(oof["fold"]):
            m = oof["fold"] == k
            if len(np.unique(oof["label"][m])) == 2:
                fpr, tpr, _ = roc_curve(oof["label"][m], oof["prob"][m])
                ax.plot(fpr, tpr, lw=1, label=f"fold {k}")
        fpr, tpr, _ = roc_curve(oof["label"], oof["prob"])
        ax.plot(fpr, tpr, color="black", lw=1.8, label=f"pooled (AUC {r['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(title=f"{r['method']}, {r['split']}", xlabel="1 - specificity", ylabel="sensitivity")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    return _save(fig, path)


def plot_domains(rows: list[dict], path: Path) -> bool:
    """Per-domain balanced accuracy, one group of bars per domain, one bar per method (full-data cells)."""
    chosen = _full_data_first_seed(rows)
    if not chosen:
        return False
    panels = sorted({r["split"] for r in chosen})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, split in zip(axes[0], panels, strict=True):
        group = [r for r in chosen if r["split"] == split]
        domains = sorted({d for r in group for d in r["domains"]})
        width = 0.8 / len(group)
        for i, r in enumerate(group):
            values = [r["domains"].get(d, {}).get("balanced_accuracy", np.nan) for d in domains]
            ax.bar(np.arange(len(domains)) + i * width, values, width, label=r["method"])
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, fontsize=8)
        held_out = " (each domain held out)" if split.endswith("-out") else ""
        ax.set(ylim=(0, 1), ylabel="balanced accuracy", title=f"{split} split{held_out}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_blur(rows: list[dict], path: Path) -> bool:
    """Balanced accuracy and AUC vs blur sigma; solid: blurred before the resize, dashed: after it."""
    chosen = [r for r in rows if r["blur"] and r["seed"] == min(x["seed"] for x in rows)]
    if not chosen:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(chosen, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False):
        for where, style in (("pre", "-"), ("post", "--")):
            sigmas = sorted(r["blur"][where], key=float)
            for ax, key in zip(axes, ("balanced_accuracy", "roc_auc"), strict=True):
                ax.plot([float(s) for s in sigmas], [r["blur"][where][s][key] for s in sigmas], style, color=color,
                        marker="o", ms=3, label=f"{r['method']} ({where}-resize)")  # fmt: skip
    for ax, key in zip(axes, ("balanced accuracy", "ROC AUC"), strict=True):
        ax.set(xlabel="Gaussian blur sigma (pixels of the image blurred)", ylabel=key)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def plot_cost(rows: list[dict], path: Path) -> bool:
    """Balanced accuracy of each method's slide-split full-data cell vs its GFLOPs per figure."""
    chosen = [r for r in rows if r["split"] == "slide" and r["data"] == "100%" and "gflops_per_image" in r]
    if not chosen:
        return False
    ba = _mean_over_seeds(chosen, "balanced_accuracy")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (method, _, _), value in ba.items():
        gflops = next(r["gflops_per_image"] for r in chosen if r["method"] == method)
        ax.scatter(gflops, value)
        ax.annotate(method, (gflops, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="GFLOPs per figure", ylabel="balanced accuracy (slide split, all data)")
    return _save(fig, path)


PLOTS = {
    "ba_vs_data.png": (plot_data_scaling, "Balanced accuracy vs training data"),
    "roc.png": (plot_roc, "ROC curves per fold"),
    "domains.png": (plot_domains, "Balanced accuracy per domain"),
    "blur.png": (plot_blur, "Blur robustness, before vs after the resize"),
    "cost.png": (plot_cost, "Accuracy vs cost"),
}


def _table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows)]  # fmt: skip


def write_report(grid_path: Path, grid: GridConfig, rows: list[dict], output: Path, report_dir: Path,
                 data_roots: list[Path], unfinished: list[str], shard: str | None = None) -> None:  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(report_dir / "results.csv", RESULT_COLUMNS, rows)
    domain_columns = ("cell", "method", "split", "data", "seed", "domain", "balanced_accuracy", "sensitivity",
                      "specificity", "accuracy", "roc_auc", "n")  # fmt: skip
    _write_csv(report_dir / "domains.csv", domain_columns, _domain_rows(rows))
    command = f"python -m training experiment --config {grid_path} --data-root {' '.join(map(str, data_roots))} " \
              f"--output {output}" + (f" --report-dir {report_dir}" if report_dir != output else "") \
              + (f" --shard {shard}" if shard else "")  # fmt: skip
    git = provenance(data_roots)["git"]
    lines = [
        f"# Experiment grid `{grid.name}`", "",
        f"Written by `{command}` (commit {git}) from {len(rows)} finished cells"
        + (f"; {len(unfinished)} not yet run: {', '.join(unfinished)}." if unfinished else "."), "",
        "Each cell trains every fold of its split; its figures are those of its pooled out-of-fold predictions, "
        "scored as the challenge scores (`training.evaluate`): classes at the threshold chosen on them "
        "(BA-maximizing), `ba_at_0.5` at the fixed threshold 0.5, a 95% bootstrap interval over figures. "
        "`n_train`: training figures per fold. `results.csv` and `domains.csv` beside this file hold every figure.",
        "", "## Cells", "",
    ]  # fmt: skip
    cols = ["method", "split", "data", "seed", "n_train", "balanced_accuracy", "ba_ci_lo", "ba_ci_hi", "roc_auc",
            "sensitivity", "specificity", "ba_at_0.5"]  # fmt: skip
    lines += _table(cols, [[r[c] for c in cols] for r in rows])
    lines += ["", "## Per domain", "", "Per scanner (per tumor for tumor-out); in a `-out` split, each domain's "
              "figures were scored by the fold that never saw that domain.", ""]  # fmt: skip
    dcols = ["method", "split", "data", "seed", "domain", "balanced_accuracy", "roc_auc", "n"]
    lines += _table(dcols, [[d[c] for c in dcols] for d in _domain_rows(rows)])
    blurred = [r for r in rows if r["blur"]]
    if blurred:
        sigmas = sorted(blurred[0]["blur"]["pre"], key=float)
        lines += ["", "## Blur robustness", "", "Balanced accuracy (at the cell's threshold) with every held-out "
                  "figure blurred by a Gaussian of the given sigma, before the resize (on the 128 px crop-out) or "
                  "after it (on the model's input); for models that take 128 px as they are, the two coincide.",
                  ""]  # fmt: skip
        bcols = ["method", "where"] + [f"sigma {s}" for s in sigmas]
        lines += _table(bcols, [[r["method"], w, *(r["blur"][w][s]["balanced_accuracy"] for s in sigmas)]
                                for r in blurred for w in ("pre", "post")])  # fmt: skip
    costed = {r["method"]: r for r in rows if "gflops_per_image" in r}
    if costed:
        lines += ["", "## Cost", "", f"Parameters, GFLOPs per figure (resize included; PyTorch's FLOP counter), "
                  f"and the median CPU time of one {STACK}-figure stack in PyTorch fp32 on the machine that ran the "
                  "grid (noisy on shared machines: compare within one report only).", ""]  # fmt: skip
        ccols = ["method", "parameters_m", "gflops_per_image", "cpu_s_per_stack"]
        lines += _table(ccols, [[r[c] for c in ccols] for r in costed.values()])
    lines += ["", "## Plots", ""]
    for name, (plot, title) in PLOTS.items():
        if plot(rows, report_dir / name):
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    (report_dir / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    log.info("wrote %s (%d cells)", report_dir / "report.md", len(rows))
