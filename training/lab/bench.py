"""Ours against the peer approach on one stack (``python -m training bench``): merged folds in one ONNX graph,
the pages one at a time, int8 on the CPU / fp16 on CUDA, against PyTorch eager with a PeftModel per fold, one image
at a time, fp32, from the same random weights; and the helpers ``bench-train`` shares."""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from tqdm import tqdm

from training.adapt import merge_adapter
from training.lab.cold_start import SAMPLE_CASE, cold_start
from training.model import Ensemble
from training.preprocess import Preprocess

log = logging.getLogger(__name__)

# --backbone name -> registry entry: Virchow's blocks at three sizes, random weights
# Virchow's blocks at three sizes, random weights: names in the backbone registry (training.backbones)
BENCH_BACKBONES = ("tiny-virchow", "vit-base-random", "virchow-size-random")
BENCH_FOLDS = 3
BENCH_LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}  # the paper's rank; no dropout, so eval == train numerics
HEAD_STD = 0.5  # a random head that spreads P(atypical) over (0, 1) as a trained one does, so parity means something
# dense tensor-core peaks (TFLOP/s) per precision: the hardware limit where the GPU is recognised (the T4 has no
# bf16 tensor cores); the first name contained in the device's name wins
GPU_PEAK_TFLOPS = {
    "T4": {"fp16": 65.0},
    "A100": {"fp16": 312.0, "bf16": 312.0},
    "H100 PCIe": {"fp16": 756.0, "bf16": 756.0},
    "H100": {"fp16": 989.0, "bf16": 989.0},
    "H200": {"fp16": 989.0, "bf16": 989.0},
}


def peer_folds(backbone: str, device: torch.device) -> list[PeftModel]:
    """The peer container's model: per fold, a PeftModel with a rank-8 LoRA adapter (non-zero B: merging changes
    the weights) and its own head, on the same base weights, left unmerged; fp32, eval mode."""
    from training.adapt import HEAD, apply_lora
    from training.model import build_classifier
    from training.spec import LoraSettings

    folds = []
    for fold in range(BENCH_FOLDS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold)  # peft draws lora_A from the global RNG: the same folds, and parity, every run
            model = apply_lora(build_classifier(backbone, head_seed=fold), LoraSettings(**BENCH_LORA))
        generator = torch.Generator().manual_seed(fold)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                elif name.endswith(f"{HEAD}.weight") and "modules_to_save" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * HEAD_STD / param.shape[1] ** 0.5)
        folds.append(model.to(device).eval())
    return folds


def peer_predict(folds: list[PeftModel], preprocess: Preprocess, pages: list[np.ndarray]) -> np.ndarray:
    """PyTorch eager, one image at a time through every fold: mean of sigmoids."""
    device = next(folds[0].parameters()).device
    probs = []
    with torch.inference_mode():
        for page in pages:
            x = preprocess(torch.from_numpy(page[None].copy()).to(device))  # decoded pages are read-only
            probs.append(torch.stack([torch.sigmoid(fold(x)) for fold in folds]).mean().item())
    return np.asarray(probs)


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's Attention: one ``scaled_dot_product_attention`` call when set, softmax(QK^T)V written out otherwise."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def stack_gflops(ensemble: Ensemble, pages: list[np.ndarray]) -> float:
    """Model GFLOPs of one stack through the merged ensemble (multiply-add = 2), counted by PyTorch with the
    attention written out: the counter does not see inside the CPU's fused attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    ensemble = copy.deepcopy(ensemble).cpu()
    set_fused_attention(ensemble, False)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        ensemble(torch.from_numpy(np.stack(pages)))
    return counter.get_total_flops() / 1e9


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def hardware_description(device: str, precision: str) -> tuple[str, float | None]:
    """The processor's name and, for a GPU the table knows, its dense peak in TFLOP/s at this precision."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peaks = next((peaks for key, peaks in GPU_PEAK_TFLOPS.items() if key in name), {})
        return name, peaks.get(precision)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{model}, {torch.get_num_threads()} threads", None


def cpu_matmul_ceiling_tflops(precision: str, size: int = 2048, repeats: int = 7) -> float:
    """The best TFLOP/s ONNX Runtime reaches on this CPU for one large square matrix product in this precision
    (fp32 MatMul, or int8 as the served graph runs it: dynamically quantized input, MatMulInteger): the ceiling
    a stack's arithmetic can approach here, where the processor does not state its peak."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from training.precision import write_int8

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    a_info, y_info = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "ay")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "matmul", [a_info], [y_info], [weight])
    a = rng.standard_normal((size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # ORT reads <= 13
        onnx.save(model, str(path))
        if precision == "int8":
            write_int8(path, path.with_name("matmul.int8.onnx"))
            path = path.with_name("matmul.int8.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {"a": a})
        best = min(timed(lambda: session.run(None, {"a": a}), "cpu") for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def versions() -> dict[str, str]:
    import onnxruntime

    from training.run import library_versions

    return {**library_versions(), "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


def _peak(device: str, precision: str, given: float | None) -> tuple[str, float | None, str]:
    """The hardware in words, and the peak TFLOP/s to set the achieved ones against, with where it came from:
    ``given``, else the GPU's table entry, else on a CPU the measured matmul ceiling."""
    hardware, gpu_peak = hardware_description(device, precision)
    if given is not None:
        return hardware, given, "--peak-tflops"
    if gpu_peak is not None:
        return hardware, gpu_peak, f"GPU's dense {precision} peak"
    if device == "cpu":
        return hardware, cpu_matmul_ceiling_tflops(precision), f"measured {precision} matmul ceiling"
    return hardware, None, "GPU's dense peak"


def export_with_sizes(merged: list, pages: list[np.ndarray], backbone: str, device: str, folder: Path) -> dict:
    """The merged folds exported to ``folder/model`` as ``training.export`` does (on a CPU every precision, the
    upload's fp16 included; on CUDA not the CPU's int8), its upload to ``folder/upload``, and their sizes:
    parameters per fold, each graph's bytes, the upload's bytes against three folds stored whole in fp16 (1.0
    without sharing; 5/9 when the folds change only the attention, a third of a Virchow block)."""
    from contracts import EnsembleMember
    from training.export import PARITY_PATCHES, export_ensemble
    from training.model import Ensemble
    from training.precision import REDUCED_PRECISIONS
    from training.preprocess import Preprocess
    from training.synthetic import synthetic_figures
    from training.upload import folder_bytes, write_upload

    params_per_fold = sum(p.numel() for p in merged[0].parameters())
    # the parity patches: the stack itself, and synthetic figures up to the export's count
    extra = synthetic_figures(PARITY_PATCHES - len(pages), seed=11, n_slides=4)[0]
    folds = [m.cpu() for m in merged]
    record = EnsembleMember(
        run="bench",
        backbone=backbone,
        folds=len(folds),
        training_config={"bench": f"{BENCH_FOLDS} random LoRA rank-8 folds"},
        oof_metrics={},
    )
    manifest = export_ensemble(
        [Ensemble(Preprocess.for_backbone(folds[0].backbone), folds)],
        np.concatenate([np.stack(pages), extra]),
        0.5,
        folder / "model",
        records=[record],
        oof_metrics={},
        reduced_precisions=tuple(r for r in REDUCED_PRECISIONS if device == "cpu" or r.device == device),
    )
    upload = write_upload(folder / "model", folder / "upload")  # what a GPU platform is handed
    upload_bytes = folder_bytes(folder / "upload")
    return {
        "params_per_fold": params_per_fold,
        "model_bytes": {precision: manifest.size_bytes(folder / "model", precision) for precision in manifest.graphs},
        "upload_bytes": upload_bytes,
        "upload_precision": next(iter(upload.graphs)),
        "upload_vs_three_fp16_folds": upload_bytes / (BENCH_FOLDS * params_per_fold * 2),
        "parity": {p: c.model_dump() for p, c in manifest.parity.items()},
    }


def bench_stack(
    device: str = "cpu",
    backbone: str = "tiny-virchow",
    repeats: int = 5,
    case_dir: Path = SAMPLE_CASE,
    cold_repeats: int = 3,
    peak_tflops: float | None = None,
) -> dict:
    """Both paths from the same random weights on one stack, interleaved after a warm-up, medians per stack; and
    the sizes of the export and its upload (``export_with_sizes``)."""
    import process

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here")
    pages = process.read_stack(process.find_stack(case_dir)).pages
    folds = peer_folds(backbone, torch.device(device))
    preprocess = Preprocess.for_backbone(folds[0].get_base_model().backbone).to(device)
    x = preprocess(torch.from_numpy(np.stack(pages)).to(device))
    merged = [merge_adapter(copy.deepcopy(fold), x)[0] for fold in folds]  # checked as export checks it
    gflops = stack_gflops(Ensemble(Preprocess.for_backbone(merged[0].backbone), merged).eval(), pages)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        sizes = export_with_sizes(merged, pages, backbone, device, Path(tmp))
        del merged
        model_dir = Path(tmp) / "model"
        ours = process.OnnxEnsemble(model_dir, device)
        fp32 = process.OnnxEnsemble(model_dir, device, precision="fp32")
        paths = {
            "peer": lambda: peer_predict(folds, preprocess, pages),
            "ours": lambda: ours.predict(pages),
            "ours_fp32": lambda: fp32.predict(pages),
        }
        answers = {name: run() for name, run in paths.items()}  # warm-up; and the paths must agree
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in tqdm(range(repeats), desc=f"bench {backbone} on {device}", unit="round"):
            for name, run in paths.items():
                times[name].append(timed(run, device))
        cold = cold_start(model_dir, case_dir, device, cold_repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    hardware, peak, peak_source = _peak(device, ours.precision, peak_tflops)
    return {
        "device": device,
        "backbone": backbone,
        "peer_s_per_stack": seconds["peer"],
        "ours_s_per_stack": seconds["ours"],
        "cold_start_s": cold["cold_start_s"],
        **{key: value for key, value in sizes.items() if key != "parity"},
        "gflops_per_stack": gflops,
        "achieved_tflops": gflops / seconds["ours"] / 1e3,
        "speedup_vs_peer": seconds["peer"] / seconds["ours"],
        "ours_precision": ours.precision,
        "ours_provider": ours.provider,
        "ours_fp32_s_per_stack": seconds["ours_fp32"],
        "peer_achieved_tflops": gflops / seconds["peer"] / 1e3,
        "peak_tflops": peak,
        "peak_source": peak_source if peak else None,
        "hardware_limit_s_per_stack": gflops / peak / 1e3 if peak else None,
        "max_abs_dp_ours_vs_peer": float(np.abs(answers["ours"] - answers["peer"]).max()),
        "parity": sizes["parity"],
        "pages": len(pages),
        "repeats": repeats,
        "hardware": hardware,
        "versions": versions(),
    }
