"""What builds a fold's network, and nothing more: backbone, weights, pooling, standardization and adaptation.

The model, its preprocessing and its adaptation (``training.model``, ``training.adapt``) are built from a
``ModelSpec``, never from the whole training config: the config is read at the edges (``TrainConfig.spec()`` in
train and export), as timm builds a model from the few values it needs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.backbones import Pooling
from training.preprocess import Standardize

Mode = Literal["lora", "linear", "full"]  # how a fold learns: training.adapt

# peft matches this against full module names: only the attention projections of the transformer blocks.
# A bare "proj" would also catch patch_embed.proj, the patch-embedding convolution.
ATTENTION_TARGETS = r"backbone\.blocks\.\d+\.attn\.(qkv|proj)"


class Strict(BaseModel):
    """Unknown keys refused, values frozen: every config of the training package is read this way."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: str = ATTENTION_TARGETS


class ModelSpec(Strict):
    """``backbone``: a name in ``training.backbones``; ``weights``: hf-hub:<repo> or local-dir:<path> (None: the
    backbone's default); ``pooling``: None = the backbone's published pooling; ``standardize``: what
    ``training.preprocess.Preprocess`` does after the backbone's normalization; ``mode`` and ``lora``: how a fold
    learns and what of it is saved (``training.adapt``)."""

    backbone: str
    weights: str | None = None
    pooling: Pooling | None = None
    standardize: Standardize = "none"
    mode: Mode = "lora"
    lora: LoraSettings = LoraSettings()
