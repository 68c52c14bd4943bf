"""The prepared GPU check (``make gpu-check``): the Virchow-size ensemble on one GPU, in one JSON.

``python -m training gpu-check [--device cuda|cpu] [--backbone virchow-size] [--json OUT]`` measures, on random
weights of the backbone's real shape:

- the container's path on one stack: ONNX Runtime's CUDA provider serving the exported fp16 graph, one page at a
  time, as ``process.py`` does (``bench``), when this machine's onnxruntime has a CUDA provider that loads; else
  PyTorch fp16, the folds merged, the stack as one batch (``container_path`` says which, and why);
- the peer path (a PeftModel per fold, fp32, one image at a time) on the same weights, and how far apart they are;
- cold start: a fresh process from its start to the stack's answer, and its peak GPU memory;
- LoRA training steps (``bench-train``): images/s and model-FLOPs utilization, naive recipe and ours.

On a CPU with ``--backbone tiny-virchow`` it runs the same code in seconds: the test suite's rehearsal.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.adapt import merge_adapter
from training.lab.bench import bench_stack, hardware_description, peer_folds, peer_predict, timed
from training.lab.bench_train import bench_train
from training.lab.cold_start import REPO, SAMPLE_CASE
from training.model import Ensemble
from training.preprocess import Preprocess

log = logging.getLogger(__name__)

# A fresh process: load the pickled fp16 ensemble onto the device, read the stack, answer it; print what it took.
_COLD = """
import json, sys
import numpy as np
import torch
import process
model = torch.load(sys.argv[1], weights_only=False, map_location=sys.argv[2])
pages = process.read_stack(process.find_stack(process.Path(sys.argv[3]))).pages
with torch.inference_mode(), torch.autocast(sys.argv[2], dtype=torch.float16):
    probs = model(torch.from_numpy(np.stack(pages)).to(sys.argv[2])).float().cpu()
cuda = sys.argv[2] == "cuda"
print(json.dumps({"pages": len(probs), "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}))
"""


def onnxruntime_cuda() -> tuple[bool, str]:
    """Whether ONNX Runtime's CUDA provider loads on this machine (a one-node graph opened on it), and why not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} here has no CUDA provider (a CPU-only build)"
    if not torch.cuda.is_available():
        return False, "no GPU visible"
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    ort.set_default_logger_severity(4)  # a CUDA library that fails to load is reported below, in one line
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"onnxruntime {ort.__version__}'s CUDA provider did not load (its CUDA or cuDNN libraries)"
    return True, f"onnxruntime {ort.__version__} with its CUDA provider"


def torch_serving(device: str, backbone: str, repeats: int, case_dir: Path, cold_repeats: int) -> dict:
    """PyTorch fp16, merged folds, one batch per stack, against the peer path; then its cold start in fresh
    processes, with their peak GPU memory."""
    import process

    pages = process.read_stack(process.find_stack(case_dir)).pages
    dev = torch.device(device)
    folds = peer_folds(backbone, dev)
    preprocess = Preprocess.for_backbone(folds[0].get_base_model().backbone).to(dev)
    x = preprocess(torch.from_numpy(np.stack(pages)).to(dev))
    merged = [merge_adapter(copy.deepcopy(fold), x)[0].half() for fold in folds]  # checked as export checks it
    ensemble = Ensemble(Preprocess.for_backbone(merged[0].backbone), merged).to(dev).eval()
    batch = torch.from_numpy(np.stack(pages)).to(dev)

    def ours() -> np.ndarray:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16):
            return ensemble(batch).float().cpu().numpy()

    paths = {"peer": lambda: peer_predict(folds, preprocess, pages), "ours": ours}
    answers = {name: run() for name, run in paths.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in tqdm(range(repeats), desc=f"gpu-check {backbone} on {device}", unit="round"):
        for name, run in paths.items():
            times[name].append(timed(run, device))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        pickled = Path(tmp) / "ensemble.pt"
        torch.save(ensemble.cpu(), pickled)
        cold = cold_starts(pickled, device, case_dir, cold_repeats)
    return {
        "ours_s_per_stack": seconds["ours"],
        "peer_s_per_stack": seconds["peer"],
        "speedup_vs_peer": seconds["peer"] / seconds["ours"],
        "max_abs_dp_ours_vs_peer": float(np.abs(answers["ours"] - answers["peer"]).max()),
        "pages": len(pages),
        "repeats": repeats,
        **cold,
    }


def cold_starts(pickled: Path, device: str, case_dir: Path, repeats: int) -> dict:
    """Median seconds from a fresh process's start to the stack's answer, and the largest peak GPU memory."""
    totals, peaks = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _COLD, str(pickled), device, str(case_dir)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        totals.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"cold start failed: {result.stderr.strip().splitlines()[-1:]}")
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])
    return {
        "cold_start_s": statistics.median(totals),
        "cold_start_repeats": repeats,
        "peak_vram_bytes": max(peaks) if device == "cuda" else None,
    }


def gpu_check(
    device: str = "cuda",
    backbone: str = "virchow-size-random",
    repeats: int = 5,
    case_dir: Path = SAMPLE_CASE,
    cold_repeats: int = 3,
    train_batch_size: int = 32,
    train_steps: int = 3,
) -> dict:
    """Serving (the container's path and the peer's), cold start, peak GPU memory and training MFU, in one dict."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here")
    started = time.perf_counter()
    ort_cuda, why = onnxruntime_cuda() if device == "cuda" else (False, "a CPU rehearsal")
    if ort_cuda:
        serving = bench_stack(device, backbone, repeats, case_dir, cold_repeats)
        path = "onnxruntime-cuda: the exported graph as process.py serves it, one page at a time"
    else:
        serving = torch_serving(device, backbone, repeats, case_dir, cold_repeats)
        path = f"pytorch-fp16: merged folds, the stack as one batch ({why})"
    training = bench_train(device, backbone, batch_size=train_batch_size, steps=train_steps)
    hardware, _ = hardware_description(device, "fp16")
    return {
        "device": device,
        "backbone": backbone,
        "hardware": hardware,
        "container_path": path,
        "serving": serving,
        "training": training,
        "wall_s": time.perf_counter() - started,
    }
