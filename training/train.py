"""Training over slide-grouped folds: one loop for every adaptation mode (see ``training.adapt``).

Run folder (nnU-Net style)::

    RUN_DIR/config.yaml          the resolved config; a rerun with another config is refused
    RUN_DIR/provenance.json      data root, git commit, library versions
    RUN_DIR/splits.json          validation image ids per fold
    RUN_DIR/fold_<k>/adapter/    best epoch's peft adapter + head (lora), or
    RUN_DIR/fold_<k>/weights.safetensors   best epoch's learned weights (linear, full)
    RUN_DIR/fold_<k>/checkpoint.pt         end of the last epoch, to resume after a kill
    RUN_DIR/fold_<k>/log.csv     one row per epoch, written as it goes (and the same in fold_<k>/tensorboard/)
    RUN_DIR/fold_<k>/val.csv     the best epoch's predictions on the held-out fold
    RUN_DIR/fold_<k>/best.json   best epoch and its validation figures; written last, it marks the fold finished
    RUN_DIR/oof.csv              all folds' held-out predictions (image_id, fold, label, prob_atypical, domain =
                                 scanner, tumor; with tta, also prob_atypical_no_tta)
    RUN_DIR/summary.json         threshold chosen on the pooled out-of-fold predictions, its figures (also per scanner)

Rerunning the same command skips finished folds and resumes an interrupted one from its checkpoint, RNG states
included, so a killed run ends where an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from training.adapt import (
    HeadOnly,
    learned_state,
    param_groups,
    prepare,
    restore_learned_state,
    save_fold_model,
    set_train_mode,
)
from training.config import TrainConfig, load_config, save_config
from training.data import Figure, at_pixel_size, decode_figures, on_scanners, read_datasets
from training.metrics import choose_threshold, summarize
from training.model import Preprocess, binomial_blur, classifier_for, mean_over_views, model_input
from training.splits import load_or_create_splits, training_subset

log = logging.getLogger(__name__)

FINISHED_MARKER = "best.json"
CHECKPOINT = "checkpoint.pt"
PROVENANCE = "provenance.json"
EPOCH_METRICS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")  # log.csv's validation columns

# Ruifrok & Johnston's stain vectors (rows: hematoxylin, eosin, DAB) for H&E colour deconvolution
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def augment_d4(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns of [N, H, W, 3]: a mitotic figure has no canonical orientation."""
    out = []
    for img, (flip, turns) in zip(batch, torch.randint(0, 4, (len(batch), 2), generator=generator), strict=True):
        img = torch.rot90(img, int(turns), dims=(0, 1))
        out.append(img.flip(1) if flip % 2 else img)
    return torch.stack(out)


def rescale_stains(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Colour deconvolution and back: each stain's optical density (hematoxylin, eosin, DAB) times ``alpha`` plus
    ``beta``, both broadcast against [..., 3]. Float [..., H, W, 3] in [0, 255] in, the same dtype out, clamped to
    [0, 255]."""
    od = -torch.log((x + 1) / 256)
    od = ((od @ HED_FROM_RGB.to(x.dtype)) * alpha + beta) @ RGB_FROM_HED.to(x.dtype)
    return (256 * torch.exp(-od) - 1).clamp(0, 255)


def augment_stain(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """HED jitter: scale and shift each stain's optical density per image, as labs and scanners differ.

    [N, H, W, 3] uint8 in, float in [0, 255] out (``Preprocess`` takes either).
    """
    n = len(batch)
    alpha = 1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    beta = (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    return rescale_stains(batch.float(), alpha, beta)


def augment_color(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled per image by a factor in [1 - strength, 1 + strength]:
    scanners differ in exposure, gamma and colour saturation as well as in stain. [N, H, W, 3] in, float out."""
    x = batch.float()
    n = len(x)
    brightness, contrast, saturation = 1 + (torch.rand(3, n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x @ torch.tensor([0.299, 0.587, 0.114])
    x = gray[..., None] + (x - gray[..., None]) * saturation
    return x.clamp(0, 255)


def augment_tone(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A random tone curve per image, ``255 (x / 255) ** g`` with ``log g`` uniform in [-strength, strength]:
    scanners map optical density to pixel values along different curves, which channel standardization (a gain
    and an offset) cannot undo. Black and white stay; every pixel keeps its rank. [N, H, W, 3] in, float out."""
    gamma = torch.exp((torch.rand(len(batch), 1, 1, 1, generator=generator) * 2 - 1) * strength)
    return 255 * (batch.float() / 255) ** gamma


def augment_geometry_blur(batch: torch.Tensor, shift_scale: float, blur: float, generator: torch.Generator):
    """Small random shift and zoom (the figure is not always centred), and a mild blur with probability ``blur``.

    [N, H, W, 3] in, float [N, H, W, 3] in [0, 255] out; borders are reflected, not black.
    """
    x = batch.float().permute(0, 3, 1, 2)
    n = len(x)
    if shift_scale:
        scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * shift_scale
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift_scale * 2  # grid units span [-1, 1]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if blur:
        blurred = x.clone()
        chosen = torch.rand(n, generator=generator) < blur
        if chosen.any():
            blurred[chosen] = binomial_blur(x[chosen])
        x = blurred
    return x.permute(0, 2, 3, 1).clamp(0, 255)


def augment_sharpness(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``x + k (x - blur(x))`` with ``k`` uniform in [-strength, strength] per image: k < 0 blurs (k = -1 is the
    binomial blur itself), k > 0 sharpens (unsharp masking). Scanners differ most in sharpness: on the breast
    subset the mean gradient of an Aperio CS2 patch is 1.7x a Hamamatsu S360 one (python -m training describe).
    [N, H, W, 3] in, float [N, H, W, 3] in [0, 255] out."""
    x = batch.float().permute(0, 3, 1, 2)
    k = (torch.rand(len(x), 1, 1, 1, generator=generator) * 2 - 1) * strength
    x = x + k * (x - binomial_blur(x))
    return x.permute(0, 2, 3, 1).clamp(0, 255)


def mixup(batch: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator):
    """Blend each figure and its target with a random partner's from the same batch, the figure's own weight
    ``max(w, 1 - w)`` with ``w ~ Beta(alpha, alpha)``: more figures between the classes, a smoother decision
    boundary for 1,000-odd training figures. Pixels [N, H, W, 3] (or a linear probe's embeddings [N, D]) in,
    float out; targets [N] in and out."""
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))  # Beta takes no generator
    w = torch.from_numpy(rng.beta(alpha, alpha, size=len(batch))).float()
    w = torch.maximum(w, 1 - w)
    partner = torch.randperm(len(batch), generator=generator)
    w_each = w.view(-1, *[1] * (batch.dim() - 1))
    blended = w_each * batch.float() + (1 - w_each) * batch[partner].float()
    return blended, w * targets + (1 - w) * targets[partner]


MIXSTYLE_ALPHA = 0.1  # MixStyle's Beta(0.1, 0.1): most figures keep nearly all of their own statistics
MIXSTYLE_STAGES = 3  # the early stages, where feature statistics carry style (stain, sharpness), not the figure


def mix_feature_styles(features: torch.Tensor, alpha: float = MIXSTYLE_ALPHA) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): each figure's feature maps [N, C, H, W] renormalized to a blend of its
    own per-channel mean and standard deviation and a random partner's, ``w ~ Beta(alpha, alpha)``. Within a CNN's
    early stages these statistics are mostly the scanner's and the lab's, so the classifier learns on styles
    between those of its training scanners. Draws from torch's global generator (checkpointed for resume)."""
    x = features.float()
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = x.var(dim=(2, 3), keepdim=True).add(1e-6).sqrt().detach()
    w = torch.distributions.Beta(alpha, alpha).sample((len(x), 1, 1, 1)).to(x)
    partner = torch.randperm(len(x)).to(x.device)
    mixed_mean = w * mean + (1 - w) * mean[partner]
    mixed_std = w * std + (1 - w) * std[partner]
    return ((x - mean) / std * mixed_std + mixed_mean).to(features.dtype)


def attach_mixstyle(backbone: torch.nn.Module, probability: float) -> None:
    """In training mode only, each of the backbone's first ``MIXSTYLE_STAGES`` feature stages (timm's
    ``feature_info``) mixes its output's styles with chance ``probability`` per batch; evaluation and the exported
    graph (built afresh from the saved weights) are untouched."""
    modules = dict(backbone.named_modules())

    def maybe_mix(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if module.training and float(torch.rand(())) < probability:
            return mix_feature_styles(output)
        return None

    for stage in backbone.feature_info[:MIXSTYLE_STAGES]:
        modules[stage["module"]].register_forward_hook(maybe_mix)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor, cfg: TrainConfig):
    """Class-weighted BCE, or focal loss (confident examples weighted down) with the same class weight."""
    if cfg.loss == "weighted-bce":
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    p = torch.sigmoid(logits)
    p_true = targets * p + (1 - targets) * (1 - p)
    return (bce * (1 - p_true) ** cfg.focal_gamma).mean()


def scanner_alignment_penalty(logits: torch.Tensor, labels: torch.Tensor, scanners: torch.Tensor) -> torch.Tensor:
    """An unbiased estimate of the squared gap between two scanners' mean logits for figures of one class,
    averaged over every class and pair of scanners in the batch with 2 figures or more each (0 if none).

    A model whose scores shift with the scanner (one finds all its figures more atypical than another) needs a
    threshold per scanner, and an unseen scanner gets the wrong one. The plain squared gap of two batch means
    would also count their sampling noise, ``var_a / n_a + var_b / n_b``, and minimizing that shrinks every
    logit towards its class mean: a confidence penalty nobody asked for. Subtracting the noise leaves an estimate
    whose expected gradient is the true gap's.
    """
    terms = []
    for label in (0, 1):
        groups = [logits[(labels == label) & (scanners == s)] for s in scanners.unique()]
        groups = [g for g in groups if len(g) >= 2]
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                terms.append((a.mean() - b.mean()).square() - a.var() / len(a) - b.var() / len(b))
    return torch.stack(terms).mean() if terms else logits.new_zeros(())


@torch.no_grad()
def embed_all(classifier, preprocess, pixels: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    classifier.eval()
    chunks = (torch.from_numpy(pixels[s : s + batch_size]).to(device) for s in range(0, len(pixels), batch_size))
    return np.concatenate([classifier.embed(preprocess(chunk)).float().cpu().numpy() for chunk in chunks])


def network_input(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last layout (NHWC in memory), which oneDNN and cuDNN convolve faster (about 1.3x per
    training step and 2x in evaluation for EfficientNetV2-B0 on a CPU); embeddings pass unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict_probs(model, preprocess, pixels: np.ndarray, batch_size: int, device: torch.device,
                  tta: bool = False) -> np.ndarray:  # fmt: skip
    """Validation probabilities in fp32, the precision the exported graph serves: the threshold is chosen on them.
    With ``tta``, the mean over the 8 D4 orientations, as the exported graph computes it."""
    model.eval()
    probs = []
    for start in range(0, len(pixels), batch_size):
        x = model_input(preprocess, torch.from_numpy(pixels[start : start + batch_size]).to(device), tta)
        p = torch.sigmoid(model(network_input(x)).float())
        probs.append(mean_over_views(p, 8 if tta else 1).cpu().numpy())
    return np.concatenate(probs)


class WeightAverage:
    """An exponential moving average of what a fold learns (batch-norm statistics included), updated after every
    optimizer step: the average of the last few hundred steps' weights sits in a wider, flatter part of the loss
    surface than the last step's, which carries better to figures unlike the training ones. With it, validation,
    the kept epoch and the exported weights are all the average's; training goes on from the live weights."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.decay = float(cfg.ema_decay)
        self.averaged = learned_state(model, cfg)
        self.live = {k: v for k, v in model.state_dict().items() if k in self.averaged}  # views, not copies

    @torch.no_grad()
    def update(self) -> None:
        for key, average in self.averaged.items():
            if average.is_floating_point():
                average.lerp_(self.live[key], 1 - self.decay)
            else:  # batch-norm's step counter
                average.copy_(self.live[key])

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its live ones again after it."""
        live = learned_state(self.model, self.cfg)
        restore_learned_state(self.model, self.averaged)
        try:
            yield
        finally:
            restore_learned_state(self.model, live)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Workers:
    """This process's place among torchrun's processes; one of one without torchrun.

    Every process draws the same batch order and augmentations for the whole batch and trains on its share of
    it; DDP averages the gradients, so the optimizer sees the same batch as one process would. Every process
    evaluates (the selection of the best epoch stays identical everywhere); only the first writes files.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, value):
        """The first process's ``value``, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join_workers() -> Workers:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    workers = Workers(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(workers.local_rank)
    return workers


def train_fold(
    cfg: TrainConfig,
    fold: int,
    figures: list[Figure],
    pixels: np.ndarray,
    val_ids: set[str],
    run_dir: Path,
    workers: Workers = Workers(),
) -> dict:
    fold_dir = run_dir / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    device = workers.device
    torch.manual_seed(cfg.seed + fold)
    generator = torch.Generator().manual_seed(cfg.seed + fold)

    is_val = np.array([f.image_id in val_ids for f in figures])
    labels = np.array([f.label for f in figures], dtype=np.float32)
    train_idx = np.flatnonzero(~is_val)
    if cfg.train_fraction < 1 or cfg.train_per_class:
        keep = training_subset(labels[train_idx], cfg.train_fraction, cfg.train_per_class, cfg.seed + fold)
        log.info("fold %d: training on %d of %d figures", fold, len(keep), len(train_idx))
        train_idx = train_idx[keep]
    train_x, train_y = pixels[train_idx], labels[train_idx]
    val_x, val_y = pixels[is_val], labels[is_val]
    val_figs = [f for f, v in zip(figures, is_val, strict=True) if v]

    classifier = classifier_for(cfg, head_seed=cfg.seed + fold)
    if cfg.mixstyle:
        attach_mixstyle(classifier.backbone, cfg.mixstyle)
    preprocess = Preprocess.for_backbone(classifier.backbone).to(device)
    model = prepare(classifier, cfg).to(device, memory_format=torch.channels_last)
    network = model  # what a training batch goes through
    if cfg.mode == "linear":
        # the backbone is frozen and the inputs unaugmented: embed every figure once, then only the head trains
        train_x, val_x = (embed_all(classifier, preprocess, x, cfg.eval_batch_size, device) for x in (train_x, val_x))
        preprocess, network = torch.nn.Identity(), HeadOnly(classifier)
    forward = network
    if workers.world > 1:
        if device.type == "cuda":  # batch-norm statistics over the whole batch, as one process computes them
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        forward = DistributedDataParallel(network, device_ids=None if device.index is None else [device.index])
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if cfg.grad_checkpointing and device.type == "cuda":
        classifier.backbone.set_grad_checkpointing(True)
    train_majority = torch.from_numpy(train_y >= 0.5)  # hard labels, for the scanner alignment's classes
    scanner_codes = {s: k for k, s in enumerate(sorted({f.scanner for f in figures}))}
    train_scanner = torch.tensor([scanner_codes[figures[i].scanner] for i in train_idx])
    if cfg.soft_labels:
        train_y = np.array([figures[i].soft_label for i in train_idx], dtype=np.float32)
    # atypical figures are the minority (about 1 in 4 to 1 in 6): weight them up by the class ratio
    pos_weight = torch.tensor((train_y < 0.5).sum() / max(1.0, (train_y >= 0.5).sum()), device=device)

    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    epochs = cfg.epochs or math.ceil(cfg.steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    log.info("fold %d: %d epochs of %d steps (%d figures)", fold, epochs, steps_per_epoch, len(train_x))
    warmup = int(cfg.warmup_fraction * total_steps)
    # the best epoch's learned weights and validation probabilities travel in the checkpoint and are written out
    # once, when the fold ends: the fold's files can never disagree with best.json, whenever a kill comes
    average = WeightAverage(model, cfg) if cfg.ema_decay else None
    state = {"epoch": 0, "best": {"balanced_accuracy": -1.0}, "best_state": None, "best_probs": None, "log_rows": []}
    if (fold_dir / CHECKPOINT).is_file():
        state = torch.load(fold_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        restore_learned_state(model, state.pop("model"))
        if average is not None:
            average.averaged = {k: v.to(device) for k, v in state.pop("average").items()}
        optimizer.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("torch_rng"))
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.pop("cuda_rng"))  # dropout and drop-path draw from these
        generator.set_state(state.pop("generator_rng"))
        log.info("fold %d: resuming after epoch %d", fold, state["epoch"])

    board = SummaryWriter(fold_dir / "tensorboard") if workers.is_main else None
    for epoch in range(state["epoch"], epochs):
        if cfg.patience and epoch - state["best"].get("epoch", 0) >= cfg.patience:
            log.info("fold %d: no better balanced accuracy for %d epochs; stopping early", fold, cfg.patience)
            break
        set_train_mode(model, cfg)
        order = torch.randperm(len(train_x), generator=generator).numpy()
        started, losses = time.perf_counter(), []
        desc = f"fold {fold} epoch {epoch + 1}/{epochs}"
        for i in (bar := tqdm(range(steps_per_epoch), desc=desc, leave=False, disable=None)):
            step = epoch * steps_per_epoch + i
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = torch.from_numpy(train_x[idx])
            if cfg.augment:
                batch = augment_d4(batch, generator)
            if cfg.stain_jitter:
                batch = augment_stain(batch, cfg.stain_jitter, generator)
            if cfg.color_jitter:
                batch = augment_color(batch, cfg.color_jitter, generator)
            if cfg.tone_jitter:
                batch = augment_tone(batch, cfg.tone_jitter, generator)
            if cfg.shift_scale or cfg.blur:
                batch = augment_geometry_blur(batch, cfg.shift_scale, cfg.blur, generator)
            if cfg.sharpness_jitter:
                batch = augment_sharpness(batch, cfg.sharpness_jitter, generator)
            targets = torch.from_numpy(train_y[idx])
            if cfg.mixup:
                batch, targets = mixup(batch, targets, cfg.mixup, generator)
            share = slice(workers.rank, None, workers.world)
            x = network_input(preprocess(batch[share].to(device)))
            y = targets[share].to(device)
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * _lr_factor(step, total_steps, warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cfg.cpu_bf16):
                logits = forward(x).float()
                loss = classification_loss(logits, y, pos_weight, cfg)
                if cfg.scanner_alignment:  # mixup keeps each figure weighted >= 0.5: its label and scanner stand
                    hard, scanner = train_majority[idx][share].to(device), train_scanner[idx][share].to(device)
                    loss = loss + cfg.scanner_alignment * scanner_alignment_penalty(logits, hard, scanner)
            # DDP averages gradients over processes; weighting each share by its size makes that the whole
            # batch's mean even when the batch does not split evenly (the factor is exactly 1 for one process)
            loss = loss * (len(y) * workers.world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")

        metrics = None
        if (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == epochs:
            with average.applied() if average is not None else nullcontext():  # what would be kept
                val_p = predict_probs(network, preprocess, val_x, cfg.eval_batch_size, device)
                # every process takes the first one's figures, so that best-epoch and early-stopping decisions
                # agree (batch-norm statistics, kept per process, would otherwise let them drift apart and hang a
                # collective)
                val_p = workers.from_main(val_p)
                metrics = summarize(val_y, val_p, threshold=0.5)
                # model selection on balanced accuracy, the challenge's ranking metric; AUC breaks ties. With
                # selection "last" every epoch replaces the previous one: the held-out fold only measures then
                best = state["best"]
                score = (metrics["balanced_accuracy"], metrics["roc_auc"])
                improved = cfg.selection == "last" or score > (best["balanced_accuracy"], best.get("roc_auc", -1))
                if improved:
                    state["best"] = {"epoch": epoch + 1, "n_train": len(train_idx), **metrics}
                    state["best_state"] = {k: v.cpu() for k, v in learned_state(model, cfg).items()}
                    state["best_probs"] = val_p.tolist()
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "seconds": time.perf_counter() - started}
        row.update({k: metrics[k] if metrics else float("nan") for k in EPOCH_METRICS})
        state["log_rows"].append(row)
        validated = f" val BA {row['balanced_accuracy']:.4f} AUC {row['roc_auc']:.4f}" if metrics else ""
        log.info("fold %d epoch %d: loss %.4f%s", fold, epoch + 1, row["train_loss"], validated)
        state["epoch"] = epoch + 1
        if workers.is_main:
            _write_rows(fold_dir / "log.csv", state["log_rows"])
            for key in ("train_loss", "balanced_accuracy", "roc_auc") if metrics else ("train_loss",):
                board.add_scalar(f"fold_{fold}/{key}", row[key], epoch + 1)
            rng = {"torch_rng": torch.get_rng_state(), "generator_rng": generator.get_state()}
            if torch.cuda.is_available():
                rng["cuda_rng"] = torch.cuda.get_rng_state_all()
            checkpoint = {**state, "model": learned_state(model, cfg), "optimizer": optimizer.state_dict(), **rng}
            if average is not None:
                checkpoint["average"] = average.averaged
            _save_atomically(checkpoint, fold_dir / CHECKPOINT)

    if workers.is_main:
        if board is not None:
            board.close()
        restore_learned_state(model, state["best_state"])
        save_fold_model(model, cfg, fold_dir)
        probs = {"prob_atypical": np.array(state["best_probs"])}
        if cfg.tta:  # what the exported graph will serve; the single-view figures stay beside them for comparison
            probs = {"prob_atypical": predict_probs(network, preprocess, val_x, cfg.eval_batch_size, device, tta=True),
                     "prob_atypical_no_tta": probs["prob_atypical"]}  # fmt: skip
            tta = summarize(val_y, probs["prob_atypical"], threshold=0.5)
            state["best"]["tta"] = {k: tta[k] for k in ("balanced_accuracy", "roc_auc")}
            log.info("fold %d best epoch with D4 TTA: BA %.4f AUC %.4f (without: %.4f, %.4f)", fold,
                     tta["balanced_accuracy"], tta["roc_auc"], state["best"]["balanced_accuracy"],
                     state["best"]["roc_auc"])  # fmt: skip
        _write_predictions(fold_dir / "val.csv", val_figs, fold, probs)
        tmp = fold_dir / f".{FINISHED_MARKER}.tmp"
        tmp.write_text(json.dumps(state["best"], indent=1))
        os.replace(tmp, fold_dir / FINISHED_MARKER)  # last, and whole: it marks the fold finished
    workers.barrier()
    return state["best"]


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_predictions(path: Path, figures: list[Figure], fold: int, probs: dict[str, np.ndarray]) -> None:
    """One row per figure; ``probs`` maps column name -> probabilities (``prob_atypical`` first)."""
    rows = []
    for i, f in enumerate(figures):
        row = {"image_id": f.image_id, "fold": fold, "label": f.label}
        row.update({column: float(p[i]) for column, p in probs.items()})
        rows.append({**row, "domain": f.scanner, "tumor": f.tumor})
    _write_rows(path, rows)


def unfinished_folds(run_dir: Path, n_folds: int) -> list[int]:
    return [k for k in range(n_folds) if not (run_dir / f"fold_{k}" / FINISHED_MARKER).is_file()]


def pool_out_of_fold(run_dir: Path, cfg: TrainConfig) -> dict:
    """Concatenate every fold's held-out predictions, choose the threshold there, and write the summary.

    The threshold is chosen on single-fold probabilities and applied to the mean over folds, whose probabilities
    are a little less extreme; with a BA-maximizing cut between classes this costs little, and it is the only
    unbiased choice (no figure is scored by a fold that trained on it).
    """
    rows = []
    for fold in range(cfg.folds):
        with (run_dir / f"fold_{fold}" / "val.csv").open(newline="") as f:
            rows.extend(csv.DictReader(f))
    _write_rows(run_dir / "oof.csv", rows)
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob_atypical"]) for r in rows])
    domains = np.array([r["domain"] for r in rows]) if cfg.threshold == "domain-balanced" else None
    threshold = choose_threshold(labels, probs, domains)
    summary = {"threshold": threshold, "oof": summarize(labels, probs, threshold)}
    summary["oof_at_0.5"] = summarize(labels, probs, 0.5)
    if "prob_atypical_no_tta" in rows[0]:  # the same folds without test-time augmentation, at their own threshold
        single = np.array([float(r["prob_atypical_no_tta"]) for r in rows])
        single_threshold = choose_threshold(labels, single, domains)
        summary["oof_no_tta"] = summarize(labels, single, single_threshold)
    scanners = np.array([r["domain"] for r in rows])
    summary["oof_by_scanner"] = {str(s): summarize(labels[scanners == s], probs[scanners == s], threshold)
                                 for s in np.unique(scanners)}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def library_versions() -> dict[str, str]:
    import peft
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__}


def provenance(data_roots: list[Path]) -> dict:
    """Where a run came from: its data and the code and library versions that trained it."""
    try:
        repo = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
        git = sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        git = None
    return {"data_roots": [str(r.resolve()) for r in data_roots], "git": git, "versions": library_versions()}


def train_run(
    cfg: TrainConfig,
    data_roots: list[Path],
    run_dir: Path,
    folds: list[int] | None = None,
    cache_dir: Path | None = None,
) -> dict | None:
    """Train the requested folds (all by default); pool out-of-fold predictions once every fold has finished.

    Under ``torchrun --nproc_per_node N`` the processes share each fold's training (DDP); folds also run as
    independent jobs with ``folds=[k]``.
    """
    workers = join_workers()
    config_path = run_dir / "config.yaml"
    if config_path.is_file() and (saved := load_config(config_path)) != cfg:
        before = saved.model_dump()
        differ = ", ".join(k for k, v in cfg.model_dump().items() if before[k] != v)
        raise ValueError(f"{config_path} holds a different config ({differ}): use a new run folder or the same "
                         "config and options")  # fmt: skip
    figures = read_datasets(data_roots)
    if cfg.hold_out_scanners:
        figures = [f for f, out in zip(figures, on_scanners(figures, cfg.hold_out_scanners), strict=True) if not out]
    if workers.is_main:
        if cfg.hold_out_scanners:
            log.info("holding out %s: training on %d figures", ", ".join(cfg.hold_out_scanners), len(figures))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_path)
        if not (run_dir / PROVENANCE).is_file():  # a resumed run keeps the record of its start
            (run_dir / PROVENANCE).write_text(json.dumps(provenance(data_roots), indent=1))
        pixels = decode_figures(figures, cache_dir)
        val_folds = load_or_create_splits(run_dir, figures, cfg)
    workers.barrier()
    if not workers.is_main:  # the first process decoded (and cached) and split; the others read the same
        pixels = decode_figures(figures, cache_dir)
        val_folds = load_or_create_splits(run_dir, figures, cfg)
    if cfg.pixel_size_um is not None:
        pixels = at_pixel_size(figures, pixels, cfg.pixel_size_um)
    for fold in folds if folds is not None else range(cfg.folds):
        if not 0 <= fold < cfg.folds:
            raise ValueError(f"fold {fold} outside 0..{cfg.folds - 1}")
        if fold not in unfinished_folds(run_dir, cfg.folds):
            log.info("fold %d already finished; skipping", fold)
            continue
        best = train_fold(cfg, fold, figures, pixels, set(val_folds[fold]), run_dir, workers)
        log.info("fold %d best epoch %d: BA %.4f", fold, best["epoch"], best["balanced_accuracy"])
    if workers.is_main and not unfinished_folds(run_dir, cfg.folds):
        summary = pool_out_of_fold(run_dir, cfg)
        log.info("out-of-fold: BA %.4f AUC %.4f at threshold %.4f", summary["oof"]["balanced_accuracy"],
                 summary["oof"]["roc_auc"], summary["threshold"])  # fmt: skip
        return summary
    return None
