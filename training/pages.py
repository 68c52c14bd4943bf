"""Pages to look at, not read: one self-contained HTML file each (every image embedded, no network, no script),
with its plots beside it as PNG.

- ``write_report``: an evaluation (a predictions CSV: a run's ``oof.csv``, ``RUN/external/<name>.csv``, or what
  ``predict`` wrote) as ``DIR/report.html``: the challenge's figures pooled and per domain with bootstrap
  intervals, ROC curves, a reliability diagram, balanced accuracy / sensitivity / specificity against the
  threshold, a confusion table per domain, and galleries of the crops themselves: the most confident errors each
  way, the figures closest to the threshold, a random sample of correct ones. Pixel-identical copies are shown
  once, flagged. A crop is found by the CSV's ``path`` column, else by its ``image_id`` in ``data_roots``; one
  that cannot be found is said so on its card.
- ``write_review``: one Grand Challenge case (the folder mounted at /input) as ``DIR/review.html`` and
  ``DIR/review.png``: each page as the model saw it (at the model's pixel size), its class and P(atypical), the
  threshold, the graph and device that served it; ``DIR/answer.json`` is the answer ``process.py`` writes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.metrics import roc_curve

from contracts import build_answer, classify
from training.data import read_dataset
from training.evaluate import bootstrap_ci, evaluate
from training.metrics import read_predictions, read_rows

log = logging.getLogger(__name__)

GALLERY_SIZE = 16
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}.cards{display:flex;
flex-wrap:wrap;gap:8px}.card{width:150px;font-size:11px;border:1px solid #ddd;padding:4px}.card img{width:128px;
height:128px;image-rendering:pixelated;display:block}.missing{width:128px;height:128px;background:#eee;
font-size:10px;overflow:hidden}.flag{color:#a40}.plots img{max-width:32%;margin-right:1%}h2{margin-top:28px}"""


def png_of(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def pixels_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _threshold_of(preds: dict, threshold: float | None) -> float:
    """The threshold given, else the one the file's classes imply (between the highest P called normal and the
    lowest called atypical)."""
    if threshold is not None:
        return threshold
    called = preds["prob"][preds["pred"] == 1]
    below = preds["prob"][preds["pred"] == 0]
    if len(called) and len(below):
        return float((called.min() + below.max()) / 2)
    return 0.5


def roc_plot(preds: dict) -> bytes:
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    groups = [("all", np.ones(len(preds["label"]), bool))]
    groups += (
        [(str(d), preds["domain"] == d) for d in np.unique(preds["domain"])] if len(set(preds["domain"])) > 1 else []
    )
    for name, m in groups:
        if 0 < preds["label"][m].sum() < m.sum():
            fpr, tpr, _ = roc_curve(preds["label"][m], preds["prob"][m])
            ax.plot(fpr, tpr, lw=2 if name == "all" else 1, label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(fontsize=7)
    return png_of(figure)


def reliability_plot(preds: dict, bins: int = 10) -> bytes:
    """P(atypical) in ``bins`` equal bins against the observed atypical share, each bin's count written on it."""
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(preds["prob"], edges) - 1, 0, bins - 1)
    for b in range(bins):
        m = which == b
        if m.any():
            x, y = preds["prob"][m].mean(), preds["label"][m].mean()
            ax.plot(x, y, "o", color="C0")
            ax.annotate(str(int(m.sum())), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean P(atypical) in the bin", ylabel="atypical share observed")
    ax.set_title("Reliability (n per bin)")
    return png_of(figure)


def threshold_plot(preds: dict, served: float, oracle: float) -> bytes:
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    cuts = np.linspace(0, 1, 201)
    positive = preds["label"] == 1
    sens = np.array([classify(preds["prob"][positive], t).mean() if positive.any() else np.nan for t in cuts])
    spec = np.array([(~classify(preds["prob"][~positive], t)).mean() if (~positive).any() else np.nan for t in cuts])
    ax.plot(cuts, (sens + spec) / 2, lw=2, label="balanced accuracy")
    ax.plot(cuts, sens, lw=1, label="sensitivity")
    ax.plot(cuts, spec, lw=1, label="specificity")
    ax.axvline(served, color="k", ls="--", lw=1, label=f"served {served:.3f}")
    if np.isfinite(oracle):
        ax.axvline(oracle, color="C3", ls=":", lw=1, label=f"best here {oracle:.3f}")
    ax.set(xlabel="threshold on P(atypical)", ylim=(0, 1), title="Against the threshold")
    ax.legend(fontsize=7)
    return png_of(figure)


def figures_table(result: dict, preds: dict) -> str:
    keys = ("n", "balanced_accuracy", "sensitivity", "specificity", "roc_auc", "oracle_balanced_accuracy")
    head = "".join(f"<th>{k}</th>" for k in ("", *keys, "BA 95% interval", "atypical"))
    rows = []
    for name, figs in [("all", result), *result["domains"].items()]:
        m = np.ones(len(preds["label"]), bool) if name == "all" else preds["domain"] == name
        lo, hi = (
            bootstrap_ci(preds["label"][m], preds["pred"][m], 1000, 0)
            if 0 < preds["label"][m].sum() < m.sum()
            else (np.nan, np.nan)
        )
        cells = "".join(f"<td>{figs[k]}</td>" if k == "n" else f"<td>{figs[k]:.3f}</td>" for k in keys)
        rows.append(
            f"<tr><th>{html.escape(name)}</th>{cells}<td>{lo:.3f}-{hi:.3f}</td><td>{int(preds['label'][m].sum())}</td></tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def confusion_tables(preds: dict) -> str:
    out = []
    for name in ["all", *[str(d) for d in np.unique(preds["domain"])]]:
        m = np.ones(len(preds["label"]), bool) if name == "all" else preds["domain"] == name
        lab, pred = preds["label"][m], preds["pred"][m]
        cell = {(a, b): int(((lab == a) & (pred == b)).sum()) for a in (0, 1) for b in (0, 1)}
        out.append(
            f"<table><tr><th>{html.escape(name)}</th><th>called normal</th><th>called atypical</th></tr>"
            f"<tr><th>normal</th><td>{cell[0, 0]}</td><td>{cell[0, 1]}</td></tr>"
            f"<tr><th>atypical</th><td>{cell[1, 0]}</td><td>{cell[1, 1]}</td></tr></table>"
        )
    return '<div class="cards">' + "".join(out) + "</div>"


STACK_PAGE = "#"  # "stack.tiff#3": page 3 (from 0) of a case's stack, as score --report names its crops


def crop_paths(rows: list[dict], data_roots: list[Path]) -> list[Path | None]:
    """Each row's crop: its ``path`` column (a PNG, or ``stack.tiff#k``, a page of a case's stack), else its
    ``image_id`` in one of ``data_roots``; None if neither is a file."""
    known = {f.image_id: f.path for root in data_roots for f in read_dataset(root)}
    paths = []
    for row in rows:
        path = Path(row["path"]) if row.get("path") else known.get(row["image_id"])
        file = path if path is None else path.with_name(path.name.split(STACK_PAGE)[0])
        paths.append(path if file is not None and file.is_file() else None)
    return paths


@functools.lru_cache(maxsize=8)
def _stack_pages(path: Path) -> list[np.ndarray]:
    from reader import read_stack

    return read_stack(path).pages


def crop_pixels(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a crop file, or of one page of a stack (``stack.tiff#k``)."""
    if STACK_PAGE in path.name:
        name, page = path.name.rsplit(STACK_PAGE, 1)
        return _stack_pages(path.with_name(name))[int(page)]
    return np.asarray(Image.open(path).convert("RGB"))


def card(row: dict, prob: float, path: Path | None, copies: int) -> str:
    label = "atypical" if row["label"] == "1" else "normal"
    votes = row.get("votes", "")
    votes = f" · votes {votes.count('1')}/{len(votes)} atypical" if votes else ""
    if path is None:
        image = f'<div class="missing">crop not found: {html.escape(row.get("path") or row["image_id"])}</div>'
    else:
        png = path.read_bytes() if path.suffix.lower() == ".png" else pixels_png(crop_pixels(path))
        image = img_tag(png, row["image_id"])
    flag = f'<div class="flag">1 crop, {copies} ids</div>' if copies > 1 else ""
    name = html.escape(path.name if path else row["image_id"])
    return (
        f'<div class="card">{image}<b>P {prob:.3f}</b> {label}{votes}<br>{html.escape(row["domain"])}<br>'
        f'<span title="{html.escape(str(path or row["image_id"]))}">{name}</span>{flag}</div>'
    )


def galleries(rows: list[dict], preds: dict, paths: list[Path | None], threshold: float, seed: int) -> str:
    """The crops, each distinct one once (copies found by their pixels, flagged with their count)."""
    first: dict[bytes, int] = {}
    copies = np.ones(len(rows), int)
    shown = np.ones(len(rows), bool)
    for i, path in enumerate(paths):
        if path is not None:
            key = hashlib.sha256(crop_pixels(path).tobytes()).digest()
            if key in first:
                shown[i], copies[first[key]] = False, copies[first[key]] + 1
            else:
                first[key] = i
    label, pred, prob = preds["label"], preds["pred"], preds["prob"]
    index = np.arange(len(rows))
    correct = index[shown & (label == pred)]
    chosen = {
        "Atypical called normal, the most confident first": index[shown & (label == 1) & (pred == 0)][
            np.argsort(prob[shown & (label == 1) & (pred == 0)], kind="stable")
        ],
        "Normal called atypical, the most confident first": index[shown & (label == 0) & (pred == 1)][
            np.argsort(-prob[shown & (label == 0) & (pred == 1)], kind="stable")
        ],
        f"Closest to the threshold ({threshold:.3f})": index[shown][
            np.argsort(np.abs(prob[shown] - threshold), kind="stable")
        ],
        "Correct, a random sample": np.random.default_rng(seed).permutation(correct),
    }
    out = []
    for title, order in chosen.items():
        cards = "".join(card(rows[i], prob[i], paths[i], copies[i]) for i in order[:GALLERY_SIZE])
        out.append(f"<h2>{html.escape(title)} ({len(order)})</h2><div class='cards'>{cards or 'none'}</div>")
    return "".join(out)


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def write_report(
    predictions: Path,
    out_dir: Path,
    threshold: float | None = None,
    column: str = "prob_atypical",
    data_roots: list[Path] | None = None,
    seed: int = 0,
) -> Path:
    """``out_dir/report.html`` and its plots (``roc.png``, ``reliability.png``, ``threshold.png``) for a
    predictions CSV; ``threshold`` as ``evaluate --threshold`` (else the file's ``pred``). Returns the page."""
    preds = read_predictions(predictions, threshold, column)
    rows = read_rows(predictions)
    result = evaluate(preds)
    served = _threshold_of(preds, threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "roc.png": roc_plot(preds),
        "reliability.png": reliability_plot(preds),
        "threshold.png": threshold_plot(preds, served, result["oracle_threshold"]),
    }
    for name, png in plots.items():
        (out_dir / name).write_bytes(png)
    paths = crop_paths(rows, data_roots or [])
    missing = sum(p is None for p in paths)
    body = (
        f"<p>{html.escape(str(predictions))}: {len(rows)} figures, P(atypical) from <code>{html.escape(column)}</code>,"
        f" classes at threshold {served:.4f}{f'; {missing} crops not found' if missing else ''}.</p>"
        f"<h2>Figures</h2>{figures_table(result, preds)}<div class='plots'>"
        + "".join(img_tag(png, name) for name, png in plots.items())
        + f"</div><h2>Confusion</h2>{confusion_tables(preds)}"
        + galleries(rows, preds, paths, served, seed)
    )
    report = out_dir / "report.html"
    report.write_text(page(f"Evaluation: {predictions.name}", body))
    log.info("wrote %s (%d figures, %d crops not found)", report, len(rows), missing)
    return report


def write_review(input_dir: Path, model_dir: Path, out_dir: Path, device: str = "cpu") -> Path:
    """One case, answered by ``process.py``'s own reader and session: ``out_dir/review.html``, ``review.png`` (a
    contact sheet) and ``answer.json`` (the answer ``process.py`` writes for the case). Returns the page."""
    from process import OnnxEnsemble, find_stack
    from reader import read_stack

    stack = find_stack(input_dir)
    case = read_stack(stack)
    ensemble = OnnxEnsemble(model_dir, device)
    seen = ensemble.at_model_pixel_size(case.pages, case.pixel_sizes_um)
    probs = ensemble.predict(case.pages, pixel_sizes_um=case.pixel_sizes_um)
    threshold = ensemble.manifest.threshold
    answer = build_answer(probs, threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answer.json").write_text(json.dumps(answer, indent=1) + "\n")

    cols = min(4, len(seen))
    rows_n = -(-len(seen) // cols)
    figure, axes = plt.subplots(rows_n, cols, figsize=(2.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, pixels, entry) in enumerate(zip(axes.flat, seen, answer, strict=False)):
        ax.imshow(pixels)
        color = "C3" if entry["class"] == "atypical" else "C0"
        ax.set_title(f"{i + 1}: {entry['class']} {entry['confidence']:.3f}", fontsize=9, color=color)
    sheet = png_of(figure)
    (out_dir / "review.png").write_bytes(sheet)

    manifest = ensemble.manifest
    recorded = sorted({f"{s:.3f}" for s in case.pixel_sizes_um if s is not None})
    if not recorded or manifest.pixel_size_um is None:
        seen_as = "shown as they are" + ("" if recorded else " (no page records a pixel size)")
    else:
        seen_as = f"shown as the model saw them, resampled to {manifest.pixel_size_um} um/px"
    sizes = f"recorded at {', '.join(recorded)} um/px" if recorded else "no pixel size recorded"
    cards = "".join(
        f'<div class="card">{img_tag(pixels_png(pixels), f"page {i + 1}")}<b>page {i + 1}</b>: {entry["class"]}<br>'
        f"P(atypical) {entry['confidence']:.4f}</div>"
        for i, (pixels, entry) in enumerate(zip(seen, answer, strict=True))
    )
    body = (
        f"<p>{html.escape(str(stack))}: {len(seen)} page(s), {sizes}; {seen_as}.</p>"
        f"<p>model {html.escape(str(model_dir))}: {html.escape(manifest.backbone)}, {manifest.folds} folds, "
        f"threshold {threshold:.4f}; graph {ensemble.precision} on {ensemble.provider}.</p>"
        f"<div class='cards'>{cards}</div><h2>Contact sheet</h2>{img_tag(sheet, 'contact sheet')}"
    )
    review = out_dir / "review.html"
    review.write_text(page(f"Case: {stack.name}", body))
    log.info("wrote %s: %d pages, %d atypical", review, len(answer), sum(e["class"] == "atypical" for e in answer))
    return review
