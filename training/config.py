"""Run configuration: one pydantic model, loaded from YAML, unknown keys rejected, saved resolved in the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from training.backbones import Pooling, backbone_spec
from training.data import normalize_scanner
from training.preprocess import Standardize
from training.run import RunFolder
from training.spec import LoraSettings, Mode, ModelSpec, Strict

Validated = TypeVar("Validated", bound=BaseModel)


# the training-time augmentations set by a strength (0 = off), in the order training.augment applies them
AUGMENT_STRENGTHS = ("stain_jitter", "color_jitter", "grayscale", "shift_scale", "sharpness_jitter")


class TrainConfig(Strict):
    name: str = "virchow-lora"
    backbone: str = "virchow"
    weights: str | None = Field(None, description="hf-hub:<repo> (local cache) or local-dir:<path>; None = default")
    mode: Mode = "lora"
    pooling: Pooling | None = Field(
        None,
        description="the head's input: None = the backbone's published pooling (Virchow: cls+mean); cls = the class "
        "token alone, as timm's own one-logit head (reset_classifier(1)) reads it",
    )
    lora: LoraSettings = LoraSettings()
    folds: int = Field(3, ge=2, description="for split: domain, the number of domains")
    split: Literal["slide", "random", "domain"] = "slide"
    domain: Literal["tumor", "scanner"] = Field("tumor", description="the domain that split: domain leaves out")
    seed: int = 42
    epochs: int | None = Field(10, ge=1, description="passes over each fold's training figures (or set steps)")
    steps: int | None = Field(
        None,
        ge=1,
        description="the training length in optimizer steps instead, rounded up to whole epochs: a fold with fewer "
        "figures (a scanner held out, a data fraction) takes more passes and trains as long, not for fewer steps",
    )
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-3, gt=0, description="the freshly initialized head learns faster than the adapters")
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    selection: Literal["best", "last"] = Field(
        "best", description="keep the epoch with the best validation BA, or the last epoch (no validation peeking)"
    )
    train_fraction: float = Field(1.0, gt=0, le=1, description="train on this share of each class (data scaling)")
    soft_labels: bool = Field(False, description="targets = fraction of experts voting atypical")
    augment: bool = Field(True, description="random flips and quarter turns")
    shift_scale: float = Field(0.0, ge=0, lt=0.5, description="random shift and zoom, as a fraction of the patch")
    stain_jitter: float = Field(0.0, ge=0, lt=1, description="HED stain jitter strength (0 = off), for scanner shift")
    sharpness_jitter: float = Field(0.0, ge=0, le=2, description="blur (k < 0) or sharpen (k > 0) by |k| <= this")
    color_jitter: float = Field(0.0, ge=0, lt=1, description="brightness, contrast, saturation jitter (0 = off)")
    grayscale: float = Field(0.0, ge=0, le=1, description="share of training figures turned to gray (shape, not hue)")
    tta: bool = Field(
        False,
        description="D4 test-time augmentation: the fold's final validation predictions and the exported graph "
        "average the 8 flips and quarter turns",
    )
    standardize: Standardize = Field(
        "none",
        description="after the backbone's normalization: channels = each image's channels to mean 0, std 1; "
        "channels+detail = and its detail band to one RMS (training.preprocess.Preprocess)",
    )
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="train at this many micrometres per pixel: each figure resampled from its scanner's "
        "(training.data.SCANNER_PIXEL_SIZE_UM); the served model resamples each page from its recorded resolution",
    )
    validate_every: int = Field(1, ge=1, description="validate after every this many epochs and after the last")
    eval_batch_size: int = Field(64, ge=1)
    cpu_bf16: bool = Field(
        False,
        description="training steps under bf16 autocast on a CPU too (always on CUDA), where the CPU runs bf16 "
        "natively (AMX or AVX512-BF16); fp32 elsewhere, where emulated bf16 is slower (training.train.autocast_bf16)",
    )
    grad_checkpointing: bool = Field(False, description="on CUDA: recompute activations, trading time for memory")
    hold_out_scanners: list[str] = Field(
        [], description="figures of these scanners are left out of every fold: a later test on scanners never seen"
    )

    def spec(self) -> ModelSpec:
        """What builds a fold's network, and nothing else of this config."""
        keys = ("backbone", "weights", "pooling", "standardize", "mode", "lora")
        return ModelSpec(**{key: getattr(self, key) for key in keys})

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_the_default_epochs(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("steps") is not None and "epochs" not in raw:
            return {**raw, "epochs": None}
        return raw

    @model_validator(mode="after")
    def _one_training_length(self) -> TrainConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("state the training length once: epochs or steps")
        return self

    @model_validator(mode="after")
    def _pooling_fits_the_backbone(self) -> TrainConfig:
        tokens = backbone_spec(self.backbone).pooling != "avg"
        if self.pooling is not None and (self.pooling != "avg") != tokens:
            kind = "a ViT's tokens" if tokens else "a CNN's feature map"
            raise ValueError(f"pooling {self.pooling!r} does not fit {self.backbone} ({kind})")
        return self

    @field_validator("hold_out_scanners")
    @classmethod
    def _one_spelling_per_scanner(cls, scanners: list[str]) -> list[str]:
        return sorted({normalize_scanner(s) for s in scanners})

    @model_validator(mode="after")
    def _linear_probe_is_unaugmented(self) -> TrainConfig:
        augmented = self.augment or any(getattr(self, strength) for strength in AUGMENT_STRENGTHS)
        if self.mode == "linear" and (augmented or self.tta):
            raise ValueError(
                f"mode linear embeds each figure once: set augment and tta false and {', '.join(AUGMENT_STRENGTHS)} 0"
            )
        return self


TRAINING_LENGTH = ("epochs", "steps")  # two ways to state one thing: a layer that states either replaces both


def layered(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper``'s keys over ``lower``'s; a training length that ``upper`` states, in epochs or in steps, replaces
    ``lower``'s whichever way that was stated (``--epochs 3`` on a config in steps trains 3 epochs)."""
    if any(key in upper for key in TRAINING_LENGTH):
        lower = {k: v for k, v in lower.items() if k not in TRAINING_LENGTH}
    return {**lower, **upper}


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config's keys over those of the config its ``base:`` names (relative to it; bases may chain), so a
    variant states only what it changes and cannot drift from what it varies."""
    path = Path(path).resolve()
    if path in seen:
        raise ValueError(f"{path}: 'base' loops back to a config that bases on it")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of keys to values")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ValueError(f"{path}: 'base' names another config file, relative to this one")
    return layered(_read_with_bases(path.parent / base, (*seen, path)), raw)


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return validated(TrainConfig, layered(_read_with_bases(path), overrides or {}), path)


# Options measured, not adopted and removed (their figures: docs/results.md), each with the value that is now the
# only behaviour: a run saved before the removal that left them there still loads.
RETIRED = {
    "patience": None,
    "ema_decay": None,
    "train_per_class": None,
    "loss": "weighted-bce",
    "mixup": 0.0,
    "threshold": "pooled",
}


def _without_retired(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("loss", "weighted-bce") == "weighted-bce":
        raw = {k: v for k, v in raw.items() if k != "focal_gamma"}  # meant nothing without the focal loss
    return {k: v for k, v in raw.items() if k not in RETIRED or v != RETIRED[k]}


def load_run_config(run: RunFolder) -> TrainConfig:
    """A run folder's resolved config. One saved by code whose options have changed since (``RETIRED`` set to
    anything but today's behaviour, or other removed options) is refused in one line that names the commit that
    trained it, which loads it."""
    try:
        return validated(TrainConfig, _without_retired(_read_with_bases(run.config)), run.config)
    except ValueError as err:
        commit = run.commit() or "unknown"
        raise ValueError(f"{err}; the run was trained at commit {commit} (provenance.json)") from None


def validated(model: type[Validated], raw: Any, path: Path) -> Validated:
    """``model`` validated from ``raw`` (read from ``path``); a violation is one line that names the file, the
    field and what is wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{path}: '{where}': {first['msg']}") from None


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
