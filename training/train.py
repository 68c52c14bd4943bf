"""Training over slide-grouped folds: one loop for every adaptation mode (``training.adapt``), writing the run
folder that ``training.run.RunFolder`` describes.

Rerunning the same command skips finished folds and resumes an interrupted one from its checkpoint, RNG states
included, so a killed run ends where an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from training.adapt import (
    HeadOnly,
    build_fold_model,
    classifier_of,
    learned_state,
    param_groups,
    restore_learned_state,
    save_fold_model,
)
from training.augment import augment_batch
from training.config import TrainConfig, load_run_config, save_config
from training.data import on_scanners, read_datasets
from training.metrics import pool_out_of_fold, summarize, write_rows
from training.model import embed_all, network_input, predict_probs, preprocess_for
from training.pixels import at_pixel_size, decode_figures, unique_figures
from training.run import FoldFolder, RunFolder, provenance
from training.splits import FoldData, fold_data, load_or_create_splits
from training.workers import Workers, join_workers

log = logging.getLogger(__name__)

EPOCH_METRICS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")  # log.csv's validation columns


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matrix arithmetic in hardware (AMX tiles or AVX512-BF16), as torch reports it.
    Elsewhere oneDNN emulates bf16, and autocast makes a convolution training step slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast_bf16(device: torch.device, cfg: TrainConfig) -> bool:
    """Training steps run under bf16 autocast: always on CUDA; on a CPU where ``cfg.cpu_bf16`` asks and the CPU
    runs bf16 natively."""
    return device.type == "cuda" or (cfg.cpu_bf16 and native_cpu_bf16())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class FoldTrainer:
    """One fold's model, optimizer and state; ``run()`` trains it from its checkpoint (if any) to the end.

    The kept epoch's learned weights and validation probabilities travel in the checkpoint and are written out
    once, when the fold ends: the fold's files can never disagree with ``best.json``, whenever a kill comes.

    ``model`` is what learns, is validated and is saved; ``network`` is what a training batch goes through: the
    model itself, or its DistributedDataParallel wrapper under torchrun.
    """

    def __init__(self, cfg: TrainConfig, fold: int, data: FoldData, folder: FoldFolder, workers: Workers):
        self.cfg, self.fold, self.folder, self.workers = cfg, fold, folder, workers
        self.device = device = workers.device
        self.spec = spec = cfg.spec()
        torch.manual_seed(cfg.seed + fold)
        self.generator = torch.Generator().manual_seed(cfg.seed + fold)
        model = build_fold_model(spec, head_seed=cfg.seed + fold).to(device, memory_format=torch.channels_last)
        classifier = classifier_of(model)
        self.preprocess = preprocess_for(spec, classifier).to(device)
        if spec.mode == "linear":  # the backbone frozen, the inputs unaugmented: embed once, train the head only
            embedded = [
                embed_all(classifier, self.preprocess, x, cfg.eval_batch_size, device)
                for x in (data.train_x, data.val_x)
            ]
            data = dataclasses.replace(data, train_x=embedded[0], val_x=embedded[1])
            self.preprocess, model = torch.nn.Identity(), HeadOnly(classifier)
        self.data, self.model, self.network = data, model, model
        if workers.world > 1:
            if device.type == "cuda":  # batch-norm statistics over the whole batch, as one process computes them
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = None if device.index is None else [device.index]
            self.network = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.head_lr), weight_decay=cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if cfg.grad_checkpointing and device.type == "cuda":
            classifier.backbone.set_grad_checkpointing(True)
        # atypical figures are the minority (about 1 in 4 to 1 in 6): weight them up by the class ratio
        y = data.train_y
        self.pos_weight = torch.tensor((y < 0.5).sum() / max(1.0, (y >= 0.5).sum()), device=device)
        self.steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
        self.epochs = cfg.epochs or math.ceil(cfg.steps / self.steps_per_epoch)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup = int(cfg.warmup_fraction * self.total_steps)
        self.bf16 = autocast_bf16(device, cfg)
        self.state = {"epoch": 0, "best": {"balanced_accuracy": -1.0}, "best_state": None, "best_probs": None}
        self.state["log_rows"] = []

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training figures in a fresh order; the mean training loss."""
        cfg, data, workers = self.cfg, self.data, self.workers
        self.model.train()
        order = torch.randperm(len(data.train_x), generator=self.generator).numpy()
        losses = []
        desc = f"fold {self.fold} epoch {epoch + 1}/{self.epochs}"
        for i in (bar := tqdm(range(self.steps_per_epoch), desc=desc, leave=False, disable=None)):
            step = epoch * self.steps_per_epoch + i
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = augment_batch(torch.from_numpy(data.train_x[idx]), cfg, self.generator)
            targets = torch.from_numpy(data.train_y[idx])
            x = network_input(self.preprocess(batch[workers.share()].to(self.device)))
            y = targets[workers.share()].to(self.device)
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base_lr * lr_factor(step, self.total_steps, self.warmup)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.binary_cross_entropy_with_logits(self.network(x).float(), y, pos_weight=self.pos_weight)
            # DDP averages gradients over processes; weighting each share by its size makes that the whole
            # batch's mean even when the batch does not split evenly (the factor is exactly 1 for one process)
            loss = loss * (len(y) * workers.world / len(idx))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        return float(np.mean(losses))

    def validate(self, epoch: int) -> dict[str, float]:
        """Validation figures at 0.5; keeps this epoch if it is the best so far (or, with selection last, always).

        Model selection on balanced accuracy, the challenge's ranking metric; AUC breaks ties."""
        cfg, data = self.cfg, self.data
        val_p = predict_probs(self.model, self.preprocess, data.val_x, cfg.eval_batch_size, self.device)
        # every process takes the first one's figures, so that the kept-epoch decisions agree
        # (batch-norm statistics, kept per process, would otherwise let them drift apart and hang a collective)
        val_p = self.workers.from_main(val_p)
        metrics = summarize(data.val_y, val_p, threshold=0.5)
        best = self.state["best"]
        score = (metrics["balanced_accuracy"], metrics["roc_auc"])
        if cfg.selection == "last" or score > (best["balanced_accuracy"], best.get("roc_auc", -1)):
            self.state["best"] = {"epoch": epoch + 1, "n_train": data.n_train, **metrics}
            self.state["best_state"] = {k: v.cpu() for k, v in learned_state(self.model, self.spec.mode).items()}
            self.state["best_probs"] = val_p.tolist()
        return metrics

    def resume(self) -> None:
        """Model, optimizer, RNG states and history from the fold's checkpoint, if it has one."""
        if not self.folder.checkpoint.is_file():
            return
        state = torch.load(self.folder.checkpoint, map_location="cpu", weights_only=False)
        restore_learned_state(self.model, state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("torch_rng"))
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.pop("cuda_rng"))  # dropout and drop-path draw from these
        self.generator.set_state(state.pop("generator_rng"))
        self.state = state
        log.info("fold %d: resuming after epoch %d", self.fold, state["epoch"])

    def checkpoint(self) -> None:
        """The end of this epoch, written whole (a rename), so that a kill leaves the last one intact."""
        rng = {"torch_rng": torch.get_rng_state(), "generator_rng": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        checkpoint = {**self.state, "model": learned_state(self.model, self.spec.mode), **rng}
        checkpoint["optimizer"] = self.optimizer.state_dict()
        tmp = self.folder.checkpoint.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, self.folder.checkpoint)

    def run(self) -> dict:
        """Train to the end, then write the kept model, ``val.csv`` and ``best.json``."""
        cfg, fold, folder = self.cfg, self.fold, self.folder
        log.info(
            "fold %d: %d epochs of %d steps (%d figures)",
            fold,
            self.epochs,
            self.steps_per_epoch,
            len(self.data.train_x),
        )
        self.resume()
        board = SummaryWriter(folder.tensorboard) if self.workers.is_main else None
        for epoch in range(self.state["epoch"], self.epochs):
            started = time.perf_counter()
            row = {"epoch": epoch + 1, "train_loss": self.train_epoch(epoch)}
            row["seconds"] = time.perf_counter() - started
            metrics = None
            if (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == self.epochs:
                metrics = self.validate(epoch)
            row.update({k: metrics[k] if metrics else float("nan") for k in EPOCH_METRICS})
            self.state["log_rows"].append(row)
            validated = f" val BA {row['balanced_accuracy']:.4f} AUC {row['roc_auc']:.4f}" if metrics else ""
            log.info("fold %d epoch %d: loss %.4f%s", fold, epoch + 1, row["train_loss"], validated)
            self.state["epoch"] = epoch + 1
            if self.workers.is_main:
                write_rows(folder.log, self.state["log_rows"])
                for key in ("train_loss", "balanced_accuracy", "roc_auc") if metrics else ("train_loss",):
                    board.add_scalar(f"fold_{fold}/{key}", row[key], epoch + 1)
                self.checkpoint()
        if self.workers.is_main:
            board.close()
            self.finish()
        self.workers.barrier()
        return self.state["best"]

    def finish(self) -> None:
        """The kept epoch's model (``save_fold_model``), its predictions on the held-out fold (``val.csv``; with
        ``tta`` the 8-view mean, the single view beside it) and, last, ``best.json``."""
        cfg, data, best = self.cfg, self.data, self.state["best"]
        restore_learned_state(self.model, self.state["best_state"])
        save_fold_model(self.model, self.spec.mode, self.folder.path)
        probs = {"prob_atypical": np.array(self.state["best_probs"])}
        if cfg.tta:  # what the exported graph will serve; the single-view figures stay beside them for comparison
            single = probs["prob_atypical"]
            tta = predict_probs(self.model, self.preprocess, data.val_x, cfg.eval_batch_size, self.device, tta=True)
            probs = {"prob_atypical": tta, "prob_atypical_no_tta": single}
            figures = summarize(data.val_y, tta, threshold=0.5)
            best["tta"] = {k: figures[k] for k in ("balanced_accuracy", "roc_auc")}
            with_tta = f"BA {figures['balanced_accuracy']:.4f} AUC {figures['roc_auc']:.4f}"
            without = f"{best['balanced_accuracy']:.4f}, {best['roc_auc']:.4f}"
            log.info("fold %d kept epoch with D4 TTA: %s (without: %s)", self.fold, with_tta, without)
        rows = []
        for i, f in enumerate(data.val_figures):
            row = {"image_id": f.image_id, "fold": self.fold, "label": f.label}
            row.update({column: float(p[i]) for column, p in probs.items()})
            votes = "".join(map(str, f.votes))
            rows.append({**row, "domain": f.scanner, "tumor": f.tumor, "votes": votes, "path": str(f.path.resolve())})
        write_rows(self.folder.val, rows)
        self.folder.write_best(best)


def train_run(
    cfg: TrainConfig,
    data_roots: list[Path],
    run_dir: Path,
    folds: list[int] | None = None,
    cache_dir: Path | None = None,
) -> dict | None:
    """Train the requested folds (all by default); pool out-of-fold predictions once every fold has finished and
    return the summary (None while folds are missing).

    Under ``torchrun --nproc_per_node N`` the processes share each fold's training (DDP); folds also run as
    independent jobs with ``folds=[k]``. Raises ValueError for a run folder holding another config or a fold
    outside the run's.
    """
    workers, run = join_workers(), RunFolder(run_dir)
    if run.config.is_file() and (saved := load_run_config(run)) != cfg:
        before = saved.model_dump()
        differ = ", ".join(k for k, v in cfg.model_dump().items() if before[k] != v)
        raise ValueError(
            f"{run.config} holds a different config ({differ}): use a new run folder or the same config and options"
        )
    figures = read_datasets(data_roots)
    if cfg.hold_out_scanners:
        figures = [f for f, out in zip(figures, on_scanners(figures, cfg.hold_out_scanners), strict=True) if not out]
    if workers.is_main:
        if cfg.hold_out_scanners:
            log.info("holding out %s: training on %d figures", ", ".join(cfg.hold_out_scanners), len(figures))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        if not run.provenance.is_file():  # a resumed run keeps the record of its start
            run.provenance.write_text(json.dumps(provenance(data_roots), indent=1))
        # a crop filed twice would sit in two folds, one training on what the other validates on
        figures, pixels, _ = unique_figures(figures, decode_figures(figures, cache_dir))
        val_folds = load_or_create_splits(run, figures, cfg)
    workers.barrier()
    if not workers.is_main:  # the first process decoded (and cached) and split; the others read the same
        figures, pixels, _ = unique_figures(figures, decode_figures(figures, cache_dir))
        val_folds = load_or_create_splits(run, figures, cfg)
    if cfg.pixel_size_um is not None:
        pixels = at_pixel_size(figures, pixels, cfg.pixel_size_um)
    if cfg.cpu_bf16 and workers.device.type == "cpu" and not native_cpu_bf16():
        log.info("cpu_bf16: this CPU has no native bf16 (AMX, AVX512-BF16); training in fp32")
    for fold in folds if folds is not None else range(cfg.folds):
        if not 0 <= fold < cfg.folds:
            raise ValueError(f"fold {fold} outside 0..{cfg.folds - 1}")
        if run.fold(fold).finished:
            log.info("fold %d already finished; skipping", fold)
            continue
        run.fold(fold).path.mkdir(parents=True, exist_ok=True)
        data = fold_data(cfg, fold, figures, pixels, set(val_folds[fold]))
        best = FoldTrainer(cfg, fold, data, run.fold(fold), workers).run()
        log.info("fold %d kept epoch %d: BA %.4f", fold, best["epoch"], best["balanced_accuracy"])
    if workers.is_main and not run.unfinished_folds(cfg.folds):
        val_files = [run.fold(k).val for k in range(cfg.folds)]
        summary = pool_out_of_fold(val_files, run.oof)
        run.summary.write_text(json.dumps(summary, indent=1))
        log.info(
            "out-of-fold: BA %.4f AUC %.4f at threshold %.4f",
            summary["oof"]["balanced_accuracy"],
            summary["oof"]["roc_auc"],
            summary["threshold"],
        )
        return summary
    return None
