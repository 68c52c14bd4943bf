"""Run folder -> one ONNX ensemble + manifest.

Per fold: rebuild the base and load what the fold learned; LoRA adapters are merged with ``merge_and_unload()``,
checked to give the unmerged model's logits. Then ``Preprocess -> folds -> mean(sigmoid)`` is exported as one
graph (input ``pixels`` uint8 [N, H, W, 3], output ``prob_atypical`` float [N], dynamic N/H/W), checked with
``onnx.checker`` and against PyTorch in ONNX Runtime, and described by ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from contracts import MANIFEST_FILENAME, ONNX_INPUT, ONNX_OUTPUT, ModelManifest, ParityCheck, sha256_of
from training.adapt import load_fold_model
from training.config import load_config
from training.data import decode_figures, read_datasets
from training.model import Classifier, Ensemble, Preprocess
from training.synthetic import synthetic_figures
from training.train import PROVENANCE, unfinished_folds

log = logging.getLogger(__name__)

ONNX_FILE = "ensemble.onnx"
FP16_FILE = "ensemble.fp16.onnx"
OPSET = 18
MERGE_ATOL = 1e-4  # logits, fp32
ONNX_ATOL = 1e-4  # probabilities, fp32
FP16_MAX_DP = 1e-3  # fp16 against fp32: P(atypical), and every class the same
PARITY_PATCHES = 64
PROTOBUF_LIMIT = 2**31 - 1  # a graph beyond 2 GB cannot be one protobuf: shape inference must not rebuild it


class ExportCheckError(RuntimeError):
    """An exported artifact disagrees with the model it came from."""


def verification_pixels(run_dir: Path, n: int = 16) -> np.ndarray:
    """Real-looking uint8 patches: held-out figures of the run's own data when reachable, else synthetic ones."""
    roots = [Path(r) for r in json.loads((run_dir / PROVENANCE).read_text())["data_roots"]]
    try:
        figures = read_datasets(roots)
        step = max(1, len(figures) // n)
        return decode_figures(figures[::step][:n])
    except (OSError, ValueError) as err:
        log.warning("verifying on synthetic patches: the run's data is not readable here (%s)", err)
        return synthetic_figures(n, seed=7, n_slides=4)[0]


def fold_model(run_dir: Path, fold: int, pixels: np.ndarray) -> Classifier:
    """One fold's best model as a plain Classifier; LoRA adapters are merged, checked on ``pixels``."""
    cfg = load_config(run_dir / "config.yaml")
    trained = load_fold_model(cfg, run_dir / f"fold_{fold}")
    if cfg.mode != "lora":
        return trained
    with torch.no_grad():
        x = Preprocess.for_backbone(trained.get_base_model().backbone)(torch.from_numpy(pixels))
        unmerged = trained(x)
        merged = trained.merge_and_unload().eval()
        diff = (merged(x) - unmerged).abs().max().item()
    if diff > MERGE_ATOL:
        raise ExportCheckError(f"fold {fold}: merged logits differ from unmerged by {diff:.2e} > {MERGE_ATOL}")
    log.info("fold %d merged (max |dlogit| %.1e)", fold, diff)
    return merged


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


def write_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """The fp32 graph with its weights and arithmetic in fp16; input (uint8) and output (float32) unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    size = sum(p.stat().st_size for p in fp32_path.parent.glob(f"{fp32_path.name}*"))
    model = onnx.load(str(fp32_path))  # external weights loaded too
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=size > PROTOBUF_LIMIT)
    onnx.save(half, str(fp16_path), save_as_external_data=True, location=f"{fp16_path.name}.data")
    onnx.checker.check_model(str(fp16_path))


def check_parity(reference: Path, candidate: Path, pixels: np.ndarray, threshold: float, max_dp: float,
                 min_agreement: float) -> ParityCheck:  # fmt: skip
    """Both graphs on the same real patches, on CUDA when this machine has it (where fp16 is served)."""
    # the onnxruntime-gpu wheel lists CUDA even where it cannot load; torch tells whether a GPU is really there
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    probs = []
    for path in (reference, candidate):
        session = ort.InferenceSession(str(path), providers=providers)
        probs.append(np.concatenate([session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels[s : s + 16]})[0]
                                     for s in range(0, len(pixels), 16)]))  # fmt: skip
    dp = float(np.abs(probs[1].astype(np.float64) - probs[0]).max())
    agreement = float(((probs[0] >= threshold) == (probs[1] >= threshold)).mean())
    accepted = dp <= max_dp and agreement >= min_agreement
    provider = session.get_providers()[0]
    return ParityCheck(max_abs_dp=dp, class_agreement=agreement, patches=len(pixels), provider=provider,
                       accepted=accepted)  # fmt: skip


def export_run(run_dir: Path, output_dir: Path) -> ModelManifest:
    cfg = load_config(run_dir / "config.yaml")
    if unfinished := unfinished_folds(run_dir, cfg.folds):
        raise ValueError(f"{run_dir}: fold(s) {unfinished} have not finished training")
    summary = json.loads((run_dir / "summary.json").read_text())
    parity_pixels = verification_pixels(run_dir, PARITY_PATCHES)
    pixels = parity_pixels[:: max(1, len(parity_pixels) // 16)][:16]

    folds = [fold_model(run_dir, k, pixels) for k in range(cfg.folds)]
    ensemble = Ensemble(Preprocess.for_backbone(folds[0].backbone), folds).eval()

    # a single page and an odd page size exercise the dynamic axes and the in-graph resize
    odd = np.pad(pixels[:2], ((0, 0), (0, 72), (0, 22), (0, 0)), mode="reflect")
    batches = [pixels, pixels[:1], odd]
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        staged = Path(tmp) / ONNX_FILE
        export_onnx(ensemble, torch.from_numpy(pixels[:2]), staged)
        worst = compare_with_torch(ensemble, staged, batches)
        log.info("ONNX Runtime vs PyTorch: max |dp| %.2e over %d batches", worst, len(batches))
        write_fp16(staged, staged.with_name(FP16_FILE))
        fp16 = check_parity(staged, staged.with_name(FP16_FILE), parity_pixels, summary["threshold"], FP16_MAX_DP, 1.0)
        verdict = "served on CUDA" if fp16.accepted else f"refused (limits {FP16_MAX_DP}, 100%): fp32 everywhere"
        log.info("fp16 vs fp32 on %d patches (%s): max |dp| %.2e, classes agree on %.1f%%: %s", fp16.patches,
                 fp16.provider, fp16.max_abs_dp, 100 * fp16.class_agreement, verdict)  # fmt: skip
        if not fp16.accepted:
            for refused in Path(tmp).glob(f"{FP16_FILE}*"):
                refused.unlink()
        files = sorted(p.name for p in Path(tmp).iterdir())
        for old in [*output_dir.glob("ensemble*.onnx*"), output_dir / MANIFEST_FILENAME]:
            old.unlink(missing_ok=True)
        for name in files:
            shutil.move(Path(tmp) / name, output_dir / name)
            (output_dir / name).chmod(0o644)  # the container reads them as another, non-root user

    manifest = ModelManifest(
        backbone=cfg.backbone,
        folds=cfg.folds,
        threshold=summary["threshold"],
        graphs={"fp32": ONNX_FILE, **({"fp16": FP16_FILE} if fp16.accepted else {})},
        serve={"cuda": "fp16" if fp16.accepted else "fp32", "cpu": "fp32"},
        parity={"fp16": fp16},
        files={name: sha256_of(output_dir / name) for name in files},
        training_config=cfg.model_dump(),
        oof_metrics={k: float(v) if math.isfinite(v) else None for k, v in summary["oof"].items()},
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    (output_dir / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=1) + "\n")
    ModelManifest.load(output_dir).verify_files(output_dir)  # what process.py will do first
    log.info("exported %d folds of %s to %s (threshold %.4f)", cfg.folds, cfg.backbone, output_dir,
             manifest.threshold)  # fmt: skip
    return manifest
