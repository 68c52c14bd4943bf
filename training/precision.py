"""Reduced-precision graphs beside the fp32 one, each served only within its limits against fp32 on real patches,
on the provider that would serve it: fp16 for CUDA and int8 for the CPU (ONNX Runtime's dynamic quantization of
the MatMul weights). The limits are stated once, in ``REDUCED_PRECISIONS``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from contracts import ONNX_INPUT, ONNX_OUTPUT, Device, ParityCheck, Precision, classify
from training.onnx_weights import fold_weight_transposes, save, share_identical_weights, unshare_weights

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")  # int8: the weights of the projections, where a ViT spends its FLOPs
PROTOBUF_LIMIT = 2**31 - 1  # a graph beyond 2 GB cannot be one protobuf: shape inference must not rebuild it


def write_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """The fp32 graph with its weights and arithmetic in fp16; input (uint8) and output (float32) unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))  # external weights loaded too
    too_big = _graph_bytes(fp32_path) > PROTOBUF_LIMIT
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=too_big)
    share_identical_weights(half.graph)
    save(half, fp16_path)


def write_int8(fp32_path: Path, int8_path: Path) -> None:
    """The fp32 graph with its MatMul weights in int8 (per output channel) and their inputs quantized per batch
    at run time: ONNX Runtime's dynamic quantization, MatMulInteger on the CPU's int8 units (VNNI, AMX). A weight
    several folds share is quantized once and stays shared."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    # the exporter's shape annotations (value_info) contradict the quantizer's own shape inference: drop them
    model.graph.ClearField("value_info")
    fold_weight_transposes(model.graph)
    unshare_weights(model.graph, ("Gemm",))  # a Gemm weight read twice fails the quantizer; a MatMul's does not
    # the quantizer reads the graph from disk: handed it in memory, it would hold a second copy while it works
    staged = int8_path.with_name(f"{int8_path.stem}.to-quantize.onnx")
    save(model, staged)
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor to the root logger
    try:
        quantize_dynamic(
            staged,
            int8_path,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    finally:
        root.setLevel(level)
        for path in staged.parent.glob(f"{staged.name}*"):
            path.unlink()
    quantized = onnx.load(str(int8_path))
    share_identical_weights(quantized.graph)  # the quantizer's zero points and scales repeat across folds
    save(quantized, int8_path)


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


def check_parity(
    reference: Path, candidate: Path, pixels: np.ndarray, threshold: float, reduced: ReducedPrecision
) -> ParityCheck:
    """Both graphs on the same real patches, on the device the candidate is served on when this machine has it."""
    # the onnxruntime-gpu wheel lists CUDA even where it cannot load; torch tells whether a GPU is really there
    cuda = reduced.device == "cuda" and torch.cuda.is_available()
    cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    probs = []
    for path in (reference, candidate):
        session = ort.InferenceSession(str(path), providers=providers)
        probs.append(
            np.concatenate(
                [session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels[s : s + 16]})[0] for s in range(0, len(pixels), 16)]
            )
        )
    dp = float(np.abs(probs[1].astype(np.float64) - probs[0]).max())
    agreement = float((classify(probs[0], threshold) == classify(probs[1], threshold)).mean())
    accepted = dp <= reduced.max_dp and agreement >= reduced.min_agreement
    return ParityCheck(
        max_abs_dp=dp,
        class_agreement=agreement,
        patches=len(pixels),
        provider=session.get_providers()[0],
        accepted=accepted,
    )


def add_reduced_precisions(
    staged: Path,
    pixels: np.ndarray,
    threshold: float,
    candidates: tuple[ReducedPrecision, ...],
    graphs: dict[Precision, str],
    serve: dict[Device, Precision],
    parity: dict[Precision, ParityCheck],
) -> None:
    """Write each candidate beside the fp32 graph ``staged``, check it on ``pixels``, record the check in ``parity``;
    an accepted one goes into ``graphs`` and is served on its device (``serve``), a refused one is deleted."""
    for reduced in candidates:
        candidate = staged.with_name(reduced.file)
        reduced.write(staged, candidate)
        check = parity[reduced.precision] = check_parity(staged, candidate, pixels, threshold, reduced)
        limits = f"limits |dp| <= {reduced.max_dp}, classes >= {reduced.min_agreement:.0%}"
        verdict = f"served on {reduced.device}" if check.accepted else f"refused ({limits}): fp32 there"
        agree = 100 * check.class_agreement
        log.info(
            "%s vs fp32 on %d patches (%s): max |dp| %.2e, classes agree on %.1f%%: %s",
            reduced.precision,
            check.patches,
            check.provider,
            check.max_abs_dp,
            agree,
            verdict,
        )
        if check.accepted:
            graphs[reduced.precision] = reduced.file
            serve[reduced.device] = reduced.precision
        else:
            for refused in staged.parent.glob(f"{reduced.file}*"):
                refused.unlink()
