"""Training throughput of LoRA steps: the recipe ``training.train`` runs on a GPU against a naive loop.

``python -m training bench-train [--device cpu|cuda] [--backbone tiny-virchow|vit-base-random|virchow-size-random]
[--batch-size B] [--steps S] [--json OUT]`` times optimizer steps (forward, class-weighted BCE, backward, AdamW) of
one rank-8 LoRA model on random patches, two ways, interleaved after a warm-up:

- ``naive``: fp32, attention written out (softmax(QK^T)V as separate ops), every activation kept;
- ``optimized``: bf16 autocast, fused attention (``scaled_dot_product_attention``), gradient checkpointing of the
  blocks (recomputes each block's forward during backward: less memory for a larger batch, more arithmetic).

Model FLOPs per step are counted by PyTorch on one naive step (forward + backward, no recomputation: the FLOPs
the model needs, whatever a recipe spends on top), so images/s and model-FLOPs utilization (MFU, against the
device's dense bf16 peak where it is known) compare the two on the same footing.
"""

from __future__ import annotations

import logging
import statistics

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from training.adapt import apply_lora
from training.lab.bench import BENCH_LORA, hardware_description, set_fused_attention, timed, versions
from training.model import build_classifier
from training.preprocess import Preprocess
from training.spec import LoraSettings

log = logging.getLogger(__name__)

RECIPES = {  # name -> (bf16 autocast, fused attention, gradient checkpointing)
    "naive": (False, False, False),
    "optimized": (True, True, True),
}


def set_recipe(model: torch.nn.Module, fused_attention: bool, checkpointing: bool) -> None:
    set_fused_attention(model, fused_attention)
    model.get_base_model().backbone.set_grad_checkpointing(checkpointing)


def bench_train(
    device: str = "cpu",
    backbone: str = "tiny-virchow",
    batch_size: int = 16,
    steps: int = 5,
    peak_tflops: float | None = None,
) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here")
    dev = torch.device(device)
    model = apply_lora(build_classifier(backbone), LoraSettings(**BENCH_LORA))
    model = model.to(dev).train()
    preprocess = Preprocess.for_backbone(model.get_base_model().backbone).to(dev)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, 128, 128, 3), dtype=torch.uint8, generator=generator).to(dev)
    labels = (torch.rand(batch_size, generator=generator) < 0.25).float().to(dev)
    pos_weight = torch.tensor(3.0, device=dev)

    def step(bf16: bool) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(preprocess(pixels)).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    set_recipe(model, *RECIPES["naive"][1:])
    counter = FlopCounterMode(display=False)
    with counter:
        step(bf16=False)
    flops_per_step = counter.get_total_flops()

    times: dict[str, list[float]] = {name: [] for name in RECIPES}
    for bf16, fused, checkpointing in RECIPES.values():  # warm-up
        set_recipe(model, fused, checkpointing)
        step(bf16)
    for _ in tqdm(range(steps), desc=f"bench-train {backbone} on {device}", unit="round"):
        for name, (bf16, fused, checkpointing) in RECIPES.items():
            set_recipe(model, fused, checkpointing)
            times[name].append(timed(lambda bf16=bf16: step(bf16), device))
    hardware, gpu_peak = hardware_description(device, "bf16")
    peak = peak_tflops or gpu_peak
    result = {
        "device": device,
        "backbone": backbone,
        "batch_size": batch_size,
        "model_tflop_per_step": flops_per_step / 1e12,
        "peak_tflops": peak,
    }
    for name, values in times.items():
        seconds = statistics.median(values)
        achieved = flops_per_step / seconds / 1e12
        result[name] = {
            "s_per_step": seconds,
            "images_per_s": batch_size / seconds,
            "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None,
        }
    result["speedup"] = result["naive"]["s_per_step"] / result["optimized"]["s_per_step"]
    result.update({"steps": steps, "hardware": hardware, "versions": versions()})
    return result
