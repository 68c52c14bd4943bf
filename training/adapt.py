"""How a fold's classifier learns, and what of it is saved: LoRA adapters, a linear probe, or full fine-tuning.

- ``lora``: peft adapters on the configured projections, the head trained in full; saved as a peft adapter folder
  and merged into the base at export.
- ``linear``: the backbone frozen, every figure embedded once (no augmentation: the embeddings are cached), only
  the head learns, in seconds; saved as the head's weights.
- ``full``: every weight learns (the mode for task-specific models trained from scratch); saved as the whole
  state dict.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from training.model import Classifier, classifier_for
from training.run import FoldFolder
from training.spec import LoraSettings, Mode, ModelSpec

HEAD = "atypia_head"
MERGE_ATOL = 1e-4  # logits, fp32: what folding an adapter into the base weights may change


class MergeError(RuntimeError):
    """A merged adapter answers otherwise than the unmerged one."""


def apply_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Adapters on the target projections; the classifier head is trained in full and saved with them."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=[HEAD],
        bias="none",
    )
    return get_peft_model(model, config)


def build_fold_model(spec: ModelSpec, head_seed: int = 0) -> nn.Module:
    """A fold's untrained model, ready for the optimizer: the classifier ``spec`` describes, adapted for its mode
    (a PeftModel for LoRA, else the classifier with ``requires_grad`` set)."""
    classifier = classifier_for(spec, head_seed)
    if spec.mode == "lora":
        return apply_lora(classifier, spec.lora)
    classifier.backbone.requires_grad_(spec.mode == "full")
    return classifier


def merge_adapter(model: PeftModel, x: torch.Tensor) -> tuple[Classifier, float]:
    """The adapter folded into the base weights (peft's ``merge_and_unload``, in place), checked on backbone input
    ``x``: the merged classifier and its largest |logit difference| from the unmerged model; MergeError beyond
    ``MERGE_ATOL``."""
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge_and_unload().eval()
        diff = (merged(x) - unmerged).abs().max().item()
    if diff > MERGE_ATOL:
        raise MergeError(f"merged logits differ from unmerged by {diff:.2e} > {MERGE_ATOL}")
    return merged, diff


def classifier_of(model: nn.Module) -> Classifier:
    """The classifier inside a fold's model (a PeftModel wraps it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class HeadOnly(nn.Module):
    """The classifier from its embedding on: a linear probe trains it on embeddings computed once. Its head keeps
    the classifier's name, so its learned state loads into the classifier as it is."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.add_module(HEAD, getattr(classifier, HEAD))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return getattr(self, HEAD)(embeddings).squeeze(-1)


def param_groups(model: nn.Module, lr: float, head_lr: float) -> list[dict]:
    """The freshly initialized head learns at ``head_lr``, everything else trainable at ``lr``."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if f"{HEAD}." in n]
    rest = [p for n, p in trainable if f"{HEAD}." not in n]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def learned_state(model: nn.Module, mode: Mode) -> dict[str, torch.Tensor]:
    """What differs from a freshly built base: trainable parameters, plus buffers when the whole model learns."""
    if mode == "full":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_learned_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = set(state) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint has weights the model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)


def save_fold_model(model: nn.Module, mode: Mode, fold_dir: Path) -> None:
    fold = FoldFolder(fold_dir)
    if mode == "lora":
        model.save_pretrained(fold.adapter)
    else:
        save_file({k: v.contiguous() for k, v in learned_state(model, mode).items()}, fold.weights)


def load_fold_model(spec: ModelSpec, fold_dir: Path, base: Classifier | None = None) -> nn.Module:
    """The fold's kept model as trained: a PeftModel (unmerged) for LoRA, else the Classifier with its weights.
    ``base``: the run's untrained classifier, already built; the fold starts from a copy of it (default: a new one,
    its weights read again)."""
    base, fold = (classifier_for(spec) if base is None else copy.deepcopy(base)), FoldFolder(fold_dir)
    if spec.mode == "lora":
        return PeftModel.from_pretrained(base, fold.adapter).eval()
    restore_learned_state(base, load_file(fold.weights))
    return base.eval()
