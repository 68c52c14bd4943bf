"""Run folder -> one ONNX ensemble + manifest.

Per fold: rebuild the base and load what the fold learned; LoRA adapters are merged with ``merge_and_unload()``,
checked to give the unmerged model's logits. Then ``Preprocess -> folds -> mean(sigmoid)`` is exported as one
graph (input ``pixels`` uint8 [N, H, W, 3], output ``prob_atypical`` float [N], dynamic N/H/W; a run trained with
``tta`` averages each figure's 8 flips and quarter turns inside the graph), checked with
``onnx.checker`` and against PyTorch in ONNX Runtime, and described by ``manifest.json``.

Reduced precisions, each behind a parity guard against the fp32 graph on real patches, on the provider that
would serve it: fp16 for CUDA (max |dp| <= 1e-3, every class the same) and int8 for the CPU (ONNX Runtime's
dynamic quantization of the MatMul weights; max |dp| <= 0.02, classes agree on >= 99%). A graph outside its
limits is deleted and fp32 is served on that device; the manifest records the figures either way.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from contracts import (
    MANIFEST_FILENAME,
    ONNX_INPUT,
    ONNX_OUTPUT,
    Device,
    ModelManifest,
    ParityCheck,
    Precision,
    sha256_of,
)
from training.adapt import load_fold_model
from training.config import load_config
from training.data import decode_figures, read_datasets
from training.model import Classifier, Ensemble, Preprocess
from training.synthetic import synthetic_figures
from training.train import PROVENANCE, unfinished_folds

log = logging.getLogger(__name__)

ONNX_FILE = "ensemble.onnx"
OPSET = 18
MERGE_ATOL = 1e-4  # logits, fp32
ONNX_ATOL = 1e-4  # probabilities, fp32
PARITY_PATCHES = 128  # real patches for the reduced-precision checks; 99% agreement then allows one flip
QUANTIZED_OPS = ("MatMul", "Gemm")  # int8: the weights of the projections, where a ViT spends its FLOPs
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


def spread_sample(pixels: np.ndarray, n: int = 16) -> np.ndarray:
    """``n`` patches taken evenly across ``pixels``: the batch merging and ONNX export are checked on."""
    return pixels[:: max(1, len(pixels) // n)][:n]


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

    model = onnx.load(str(fp32_path))  # external weights loaded too
    too_big = _graph_bytes(fp32_path) > PROTOBUF_LIMIT
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=too_big)
    onnx.save(half, str(fp16_path), save_as_external_data=True, location=f"{fp16_path.name}.data")
    onnx.checker.check_model(str(fp16_path))


def write_int8(fp32_path: Path, int8_path: Path) -> None:
    """The fp32 graph with its MatMul weights in int8 (per output channel) and their inputs quantized per batch
    at run time: ONNX Runtime's dynamic quantization, MatMulInteger on the CPU's int8 units (VNNI, AMX)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    # the exporter's shape annotations (value_info) contradict the quantizer's own shape inference: drop them
    model.graph.ClearField("value_info")
    fold_weight_transposes(model.graph)
    unshare_weights(model.graph, QUANTIZED_OPS)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor to the root logger
    try:
        quantize_dynamic(model, int8_path, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)  # fmt: skip
    finally:
        root.setLevel(level)
    onnx.checker.check_model(str(int8_path))


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Replace ``Transpose(weight)`` by the transposed weight; returns the transposes folded.

    The exporter keeps a Linear's weight transpose as a node when modules share the weight (folds on one frozen
    base, say), and the quantizer only quantizes a MatMul whose weight is a constant."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    folded = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] in initializers]
    for node in folded:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = onnx.numpy_helper.to_array(initializers[node.input[0]])
        graph.initializer.append(onnx.numpy_helper.from_array(np.transpose(weight, perm), node.output[0]))
        graph.node.remove(node)
    still_read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in still_read]:
        graph.initializer.remove(tensor)
    return len(folded)


def unshare_weights(graph: onnx.GraphProto, op_types: tuple[str, ...]) -> int:
    """Give each of these ops its own copy of a weight that another node also reads; returns the copies made.

    The quantizer replaces a weight by its int8 version at the first MatMul that reads it, and then cannot
    type it at the second."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input if name in initializers)
    copies = 0
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        for i, name in enumerate(node.input):
            if readers.get(name, 0) > 1:
                readers[name] -= 1  # the last reader keeps the original
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = node.input[i] = f"{name}.{node.name or copies}.copy"
                copies += 1
    return copies


def _graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


@dataclass(frozen=True)
class ReducedPrecision:
    """A cheaper graph for one device, served there only within its limits against fp32."""

    precision: Precision
    file: str
    write: Callable[[Path, Path], None]
    device: Device  # where it is served, and so where its parity is checked
    max_dp: float
    min_agreement: float


REDUCED_PRECISIONS = (
    ReducedPrecision("fp16", "ensemble.fp16.onnx", write_fp16, "cuda", max_dp=1e-3, min_agreement=1.0),
    ReducedPrecision("int8", "ensemble.int8.onnx", write_int8, "cpu", max_dp=0.02, min_agreement=0.99),
)


def check_parity(reference: Path, candidate: Path, pixels: np.ndarray, threshold: float,
                 reduced: ReducedPrecision) -> ParityCheck:  # fmt: skip
    """Both graphs on the same real patches, on the device the candidate is served on when this machine has it."""
    # the onnxruntime-gpu wheel lists CUDA even where it cannot load; torch tells whether a GPU is really there
    cuda = reduced.device == "cuda" and torch.cuda.is_available()
    cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    probs = []
    for path in (reference, candidate):
        session = ort.InferenceSession(str(path), providers=providers)
        probs.append(np.concatenate([session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels[s : s + 16]})[0]
                                     for s in range(0, len(pixels), 16)]))  # fmt: skip
    dp = float(np.abs(probs[1].astype(np.float64) - probs[0]).max())
    agreement = float(((probs[0] >= threshold) == (probs[1] >= threshold)).mean())
    accepted = dp <= reduced.max_dp and agreement >= reduced.min_agreement
    return ParityCheck(max_abs_dp=dp, class_agreement=agreement, patches=len(pixels),
                       provider=session.get_providers()[0], accepted=accepted)  # fmt: skip


def export_ensemble(
    folds: list[Classifier],
    parity_pixels: np.ndarray,
    threshold: float,
    output_dir: Path,
    *,
    backbone: str,
    training_config: dict,
    oof_metrics: dict[str, float | None],
    reduced_precisions: tuple[ReducedPrecision, ...] | None = None,
    tta: bool = False,
    pixel_size_um: float | None = None,
) -> ModelManifest:
    """Merged folds -> the model folder ``process.py`` serves: fp32 graph (with ``tta``, averaging the 8 D4
    orientations), reduced precisions (all of ``REDUCED_PRECISIONS`` by default) that pass their parity checks on
    ``parity_pixels`` (real patches), manifest with checksums. Replaces an earlier export."""
    ensemble = Ensemble(Preprocess.for_backbone(folds[0].backbone), folds, tta=tta).eval()
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
        worst = compare_with_torch(ensemble, staged, batches)
        log.info("ONNX Runtime vs PyTorch: max |dp| %.2e over %d batches", worst, len(batches))
        for reduced in REDUCED_PRECISIONS if reduced_precisions is None else reduced_precisions:
            candidate = staged.with_name(reduced.file)
            reduced.write(staged, candidate)
            check = parity[reduced.precision] = check_parity(staged, candidate, parity_pixels, threshold, reduced)
            limits = f"limits |dp| <= {reduced.max_dp}, classes >= {reduced.min_agreement:.0%}"
            verdict = f"served on {reduced.device}" if check.accepted else f"refused ({limits}): fp32 there"
            log.info("%s vs fp32 on %d patches (%s): max |dp| %.2e, classes agree on %.1f%%: %s", reduced.precision,
                     check.patches, check.provider, check.max_abs_dp, 100 * check.class_agreement, verdict)  # fmt: skip
            if check.accepted:
                graphs[reduced.precision] = reduced.file
                serve[reduced.device] = reduced.precision
            else:
                for refused in Path(tmp).glob(f"{reduced.file}*"):
                    refused.unlink()
        files = sorted(p.name for p in Path(tmp).iterdir())
        for old in [*output_dir.glob("ensemble*.onnx*"), output_dir / MANIFEST_FILENAME]:
            old.unlink(missing_ok=True)
        for name in files:
            shutil.move(Path(tmp) / name, output_dir / name)
            (output_dir / name).chmod(0o644)  # the container reads them as another, non-root user

    manifest = ModelManifest(
        backbone=backbone,
        folds=len(folds),
        threshold=threshold,
        pixel_size_um=pixel_size_um,
        graphs=graphs,
        serve=serve,
        parity=parity,
        files={name: sha256_of(output_dir / name) for name in files},
        training_config=training_config,
        oof_metrics=oof_metrics,
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    (output_dir / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=1) + "\n")
    ModelManifest.load(output_dir).verify_files(output_dir)  # what process.py will do first
    log.info("exported %d folds of %s to %s (threshold %.4f; served: %s)", len(folds), backbone, output_dir,
             threshold, ", ".join(f"{d} {p}" for d, p in serve.items()))  # fmt: skip
    return manifest


def export_run(run_dir: Path, output_dir: Path, folds: list[int] | None = None) -> ModelManifest:
    """Every fold of the run (or only ``folds``: one leave-one-scanner-out fold, say, to serve it on the scanner it
    never saw), at the threshold chosen on the run's pooled out-of-fold predictions."""
    cfg = load_config(run_dir / "config.yaml")
    if unfinished := unfinished_folds(run_dir, cfg.folds):
        raise ValueError(f"{run_dir}: fold(s) {unfinished} have not finished training")
    chosen = list(range(cfg.folds)) if folds is None else sorted(set(folds))
    if not chosen or not all(0 <= k < cfg.folds for k in chosen):
        raise ValueError(f"{run_dir}: folds {folds} outside 0..{cfg.folds - 1}")
    summary = json.loads((run_dir / "summary.json").read_text())
    parity_pixels = verification_pixels(run_dir, PARITY_PATCHES)
    models = [fold_model(run_dir, k, spread_sample(parity_pixels)) for k in chosen]
    return export_ensemble(
        models, parity_pixels, summary["threshold"], output_dir, backbone=cfg.backbone,
        training_config=cfg.model_dump(),
        oof_metrics={k: float(v) if math.isfinite(v) else None for k, v in summary["oof"].items()}, tta=cfg.tta,
        pixel_size_um=cfg.pixel_size_um,
    )  # fmt: skip
