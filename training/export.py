"""Run folder -> one ONNX ensemble + manifest.

The base is built (its weights read) once; per fold, a copy of it loads what the fold learned; LoRA adapters are
merged with ``merge_and_unload()``, checked to give the unmerged model's logits, and every weight the fold left
as it was is the base's own tensor again. Then ``Preprocess -> folds -> mean(sigmoid)`` is exported as one graph
(input ``pixels`` uint8 [N, H, W, 3], output ``prob_atypical`` float [N], dynamic N/H/W; a run trained with
``tta`` averages each figure's 8 flips and quarter turns inside the graph) that stores each distinct weight once
(``onnx_weights.compact``), checked with ``onnx.checker`` and against PyTorch in ONNX Runtime, and described by
``manifest.json``.

Several runs export as one graph too (``export RUN_A RUN_B ...``): every fold of every run averaged, each run
behind its own preprocessing, at one threshold chosen on the runs' combined out-of-fold predictions. The runs must
share their folds (``splits.json``), so that each figure's combined prediction is out-of-fold for every member,
and their pixel size (pages are resampled to one before the graph).

Reduced precisions (fp16 for CUDA, int8 for the CPU), each behind a parity guard against the fp32 graph on real
patches (``training.precision``, which states the limits). A graph outside its limits is deleted and fp32 is
served on that device; the manifest records the figures either way.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from contracts import (
    MANIFEST_FILENAME,
    ONNX_INPUT,
    ONNX_OUTPUT,
    Device,
    EnsembleMember,
    ModelManifest,
    ParityCheck,
    Precision,
    sha256_of,
)
from training import onnx_weights
from training.adapt import MergeError, load_fold_model, merge_adapter
from training.config import TrainConfig, load_run_config
from training.data import read_datasets
from training.metrics import choose_threshold, read_rows, summarize
from training.model import Classifier, CrossRunEnsemble, Ensemble, classifier_for, preprocess_for
from training.pixels import decode_figures
from training.precision import REDUCED_PRECISIONS, ReducedPrecision, add_reduced_precisions
from training.run import RunFolder
from training.synthetic import synthetic_figures

log = logging.getLogger(__name__)

ONNX_FILE = "ensemble.onnx"
OPSET = 18
ONNX_ATOL = 1e-4  # probabilities, fp32
PARITY_PATCHES = 128  # real patches for the reduced-precision checks; 99% agreement then allows one flip


class ExportCheckError(RuntimeError):
    """An exported artifact disagrees with the model it came from."""


def verification_pixels(run_dir: Path, n: int = 16) -> np.ndarray:
    """Real-looking uint8 patches: held-out figures of the run's own data when reachable, else synthetic ones."""
    try:
        figures = read_datasets(RunFolder(run_dir).data_roots())
        step = max(1, len(figures) // n)
        return decode_figures(figures[::step][:n])
    except (OSError, ValueError) as err:
        log.warning("verifying on synthetic patches: the run's data is not readable here (%s)", err)
        return synthetic_figures(n, seed=7, n_slides=4)[0]


def spread_sample(pixels: np.ndarray, n: int = 16) -> np.ndarray:
    """``n`` patches taken evenly across ``pixels``: the batch merging and ONNX export are checked on."""
    return pixels[:: max(1, len(pixels) // n)][:n]


def share_unchanged_weights(fold: nn.Module, base: nn.Module) -> int:
    """Point every parameter of ``fold`` equal to the base's same-named one at the base's tensor: folds on one
    frozen base then hold it once, in memory and in the exported graph. Returns the parameters shared."""
    base_params = dict(base.named_parameters())
    shared = 0
    for name, param in list(fold.named_parameters()):
        ref = base_params.get(name)
        if ref is not None and ref is not param and ref.shape == param.shape and torch.equal(ref, param):
            owner, _, attribute = name.rpartition(".")
            setattr(fold.get_submodule(owner), attribute, ref)
            shared += 1
    return shared


def fold_model(run_dir: Path, fold: int, pixels: np.ndarray, base: Classifier | None = None) -> Classifier:
    """One fold's best model as a plain Classifier; LoRA adapters are merged, checked on ``pixels``. With
    ``base`` (the run's untrained classifier, built once), the fold starts from a copy of it and shares back
    every weight it left unchanged."""
    run = RunFolder(run_dir)
    spec = load_run_config(run).spec()
    trained = load_fold_model(spec, run.fold(fold).path, base)
    if spec.mode == "lora":
        with torch.no_grad():
            x = preprocess_for(spec, trained.get_base_model())(torch.from_numpy(pixels))
        try:
            trained, diff = merge_adapter(trained, x)
        except MergeError as err:
            raise ExportCheckError(f"fold {fold}: {err}") from None
        log.info("fold %d merged (max |dlogit| %.1e)", fold, diff)
    if base is not None:
        shared = share_unchanged_weights(trained, base)
        log.info("fold %d shares %d unchanged weight tensors with the base", fold, shared)
    return trained


def export_onnx(ensemble: Ensemble, example: torch.Tensor, path: Path) -> None:
    n, h, w = (torch.export.Dim(name, min=1, max=4096) for name in ("N", "H", "W"))
    torch.onnx.export(
        ensemble,
        (example,),
        str(path),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes={"pixels": {0: n, 1: h, 2: w}},
        opset_version=OPSET,
        dynamo=True,
        external_data=True,
    )
    onnx.checker.check_model(str(path))


def compare_with_torch(ensemble: Ensemble, onnx_path: Path, batches: list[np.ndarray]) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for pixels in batches:
        with torch.no_grad():
            expected = ensemble(torch.from_numpy(pixels)).numpy()
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0]
        if got.shape != expected.shape:
            raise ExportCheckError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > ONNX_ATOL:
        raise ExportCheckError(f"ONNX Runtime differs from PyTorch by {worst:.2e} > {ONNX_ATOL} in P(atypical)")
    return worst


def export_ensemble(
    members: list[Ensemble],
    parity_pixels: np.ndarray,
    threshold: float,
    output_dir: Path,
    *,
    records: list[EnsembleMember],
    oof_metrics: dict[str, float | None],
    reduced_precisions: tuple[ReducedPrecision, ...] | None = None,
    pixel_size_um: float | None = None,
) -> ModelManifest:
    """One run's ensemble (or several, averaged fold by fold) -> the model folder ``process.py`` serves: fp32
    graph, reduced precisions (all of ``REDUCED_PRECISIONS`` by default) that pass their parity checks on
    ``parity_pixels`` (real patches), manifest with checksums, ``records`` describing the members. Replaces an
    earlier export. Consumes ``members``: the list is emptied once the fp32 graph is checked, so that a caller
    holding no other reference frees the PyTorch weights before the reduced precisions are written (at Virchow
    size they would not fit beside them)."""
    n_folds = sum(len(m.folds) for m in members)
    ensemble = (members[0] if len(members) == 1 else CrossRunEnsemble(members)).eval()
    pixels = spread_sample(parity_pixels)
    # a single page and an odd page size exercise the dynamic axes and the in-graph resize
    odd = np.pad(pixels[:2], ((0, 0), (0, 72), (0, 22), (0, 0)), mode="reflect")
    batches = [pixels, pixels[:1], odd]
    output_dir.mkdir(parents=True, exist_ok=True)
    graphs: dict[Precision, str] = {"fp32": ONNX_FILE}
    serve: dict[Device, Precision] = {"cuda": "fp32", "cpu": "fp32"}
    parity: dict[Precision, ParityCheck] = {}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        staged = Path(tmp) / ONNX_FILE
        export_onnx(ensemble, torch.from_numpy(pixels[:2]), staged)
        saved = onnx_weights.compact(staged)
        log.info("weights stored once: %.1f MB fewer in the fp32 graph", saved / 1e6)
        worst = compare_with_torch(ensemble, staged, batches)
        log.info("ONNX Runtime vs PyTorch: max |dp| %.2e over %d batches", worst, len(batches))
        del ensemble
        members.clear()
        reduced = REDUCED_PRECISIONS if reduced_precisions is None else reduced_precisions
        add_reduced_precisions(staged, parity_pixels, threshold, reduced, graphs, serve, parity)
        described = {precision: onnx_weights.graph_files(staged.with_name(f)) for precision, f in graphs.items()}
        files = sorted(name for graph in described.values() for name in graph.names)
        for old in [*output_dir.glob("ensemble*.onnx*"), output_dir / MANIFEST_FILENAME]:
            old.unlink(missing_ok=True)
        for name in files:
            shutil.move(Path(tmp) / name, output_dir / name)
            (output_dir / name).chmod(0o644)  # the container reads them as another, non-root user

    manifest = ModelManifest(
        backbone=" + ".join(dict.fromkeys(r.backbone for r in records)),
        folds=n_folds,
        threshold=threshold,
        pixel_size_um=pixel_size_um,
        graphs=described,
        serve=serve,
        parity=parity,
        files={name: sha256_of(output_dir / name) for name in files},
        members=records,
        oof_metrics=oof_metrics,
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    (output_dir / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=1) + "\n")
    ModelManifest.load(output_dir).verify_files(output_dir)
    log.info(
        "exported %d folds of %s to %s (threshold %.4f; served: %s)",
        n_folds,
        manifest.backbone,
        output_dir,
        threshold,
        ", ".join(f"{d} {p}" for d, p in serve.items()),
    )
    return manifest


def _finite(figures: dict[str, float]) -> dict[str, float | None]:
    return {k: float(v) if math.isfinite(v) else None for k, v in figures.items()}


def _same_folds_and_pixel_size(runs: list[RunFolder], configs: list[TrainConfig]) -> None:
    """Runs that can share one graph and one threshold: the same folds, the same pixel size. ValueError if not."""
    first, first_cfg = runs[0], configs[0]
    for run, cfg in zip(runs[1:], configs[1:], strict=True):
        if run.read_val_ids() != first.read_val_ids():
            raise ValueError(
                f"{run.path}: its splits.json differs from {first.path}'s; runs ensembled together must be trained "
                "on the same folds (the same data, split and seed)"
            )
        if (size := cfg.pixel_size_um) != first_cfg.pixel_size_um:
            raise ValueError(
                f"{run.path}: trained at {size} um/px, {first.path} at {first_cfg.pixel_size_um}: one graph serves "
                "one pixel size"
            )


def combined_out_of_fold(runs: list[RunFolder]) -> tuple[float, dict[str, float | None]]:
    """The runs' out-of-fold predictions averaged figure by figure, each run weighted by its fold count as in the
    graph; the threshold chosen there and its figures. One run: its own ``summary.json``'s."""
    if len(runs) == 1:
        summary = runs[0].read_summary()
        return summary["threshold"], _finite(summary["oof"])
    tables = [{r["image_id"]: r for r in read_rows(run.oof)} for run in runs]
    weights = np.array([load_run_config(run).folds for run in runs], dtype=np.float64)
    ids = list(tables[0])
    labels = np.array([int(tables[0][i]["label"]) for i in ids])
    probs = np.array([[float(t[i]["prob_atypical"]) for i in ids] for t in tables])
    combined = weights @ probs / weights.sum()
    threshold = choose_threshold(labels, combined)
    return threshold, _finite(summarize(labels, combined, threshold))


def export_run(
    run_dirs: list[Path], output_dir: Path, folds: list[int] | None = None, parity_patches: int | None = None
) -> ModelManifest:
    """Every fold of the runs (or, of one run, only ``folds``: one leave-one-scanner-out fold, say, to serve it on
    the scanner it never saw), at the threshold chosen on the pooled out-of-fold predictions (of several runs,
    their combination). ``parity_patches``: how many real patches the reduced precisions are checked on (default
    ``PARITY_PATCHES``; the manifest records it). ValueError, in one line, for runs that cannot share one graph."""
    started = time.perf_counter()
    runs = [RunFolder(run_dir) for run_dir in run_dirs]
    configs = [load_run_config(run) for run in runs]
    for run, cfg in zip(runs, configs, strict=True):
        if unfinished := run.unfinished_folds(cfg.folds):
            raise ValueError(f"{run.path}: fold(s) {unfinished} have not finished training")
    if folds is not None and len(runs) > 1:
        raise ValueError("--fold picks folds of one run; an ensemble of runs takes every fold of each")
    _same_folds_and_pixel_size(runs, configs)
    threshold, oof_metrics = combined_out_of_fold(runs)
    parity_pixels = verification_pixels(runs[0].path, PARITY_PATCHES if parity_patches is None else parity_patches)
    members, records = [], []
    for run, cfg in zip(runs, configs, strict=True):
        chosen = list(range(cfg.folds)) if folds is None else sorted(set(folds))
        if not chosen or not all(0 <= k < cfg.folds for k in chosen):
            raise ValueError(f"{run.path}: folds {folds} outside 0..{cfg.folds - 1}")
        base = classifier_for(cfg.spec()).eval()  # the base's weights read once, shared by every fold
        models = [fold_model(run.path, k, spread_sample(parity_pixels), base) for k in chosen]
        del base  # the folds hold what they share of it; export_ensemble frees them after the fp32 graph
        members.append(Ensemble(preprocess_for(cfg.spec(), models[0]), models, tta=cfg.tta))
        del models
        own = _finite(run.read_summary()["oof"])
        config = cfg.model_dump()
        records.append(
            EnsembleMember(
                run=run.path.name, backbone=cfg.backbone, folds=len(chosen), training_config=config, oof_metrics=own
            )
        )
    manifest = export_ensemble(
        members,
        parity_pixels,
        threshold,
        output_dir,
        records=records,
        oof_metrics=oof_metrics,
        pixel_size_um=configs[0].pixel_size_um,
    )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    log.info("export took %.0f s, peak resident memory %.1f GiB", time.perf_counter() - started, peak_gb)
    return manifest
