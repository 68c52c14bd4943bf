"""An experiment grid's plots (PNG), one function per plot: rows of ``training.lab.report.collect`` in, True if a
file was written (False where the rows hold nothing to plot)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import roc_curve

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


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
        ax.set(
            xscale="log",
            xlabel="training figures per fold",
            ylabel="balanced accuracy (out-of-fold)",
            title=f"data scaling, {split} split",
        )
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
                ax.plot(
                    [float(s) for s in sigmas],
                    [r["blur"][where][s][key] for s in sigmas],
                    style,
                    color=color,
                    marker="o",
                    ms=3,
                    label=f"{r['method']} ({where}-resize)",
                )
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
