"""The torch modules that training runs and export freezes into ONNX: the classifier and the fold ensemble."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from training.backbones import Pooling, backbone_spec, create_backbone
from training.preprocess import Preprocess, mean_over_views, model_input
from training.spec import ModelSpec


class Classifier(nn.Module):
    """Backbone features -> embedding -> linear -> one logit for 'atypical'; input is ``Preprocess``'s output.

    Pooling, as each backbone was published: ``cls+mean`` = concat(CLS token, mean of patch tokens), with prefix
    tokens (CLS and registers) excluded from the mean; ``cls`` = the CLS token; ``avg`` = global average of a CNN's
    last feature map.
    """

    def __init__(self, backbone: nn.Module, pooling: Pooling):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        dim = backbone.num_features * (2 if pooling == "cls+mean" else 1)
        # not "head": peft matches modules_to_save by name suffix, and timm backbones have a `head` of their own
        self.atypia_head = nn.Linear(dim, 1)

    @property
    def embedding_dim(self) -> int:
        return self.atypia_head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x)
        if self.pooling == "avg":  # the CNN's own head up to its classifier: pooling (and a final norm, if any)
            return self.backbone.forward_head(features, pre_logits=True)
        if self.pooling == "cls":
            return features[:, 0]
        return torch.cat([features[:, 0], features[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.atypia_head(self.embed(x)).squeeze(-1)


def build_classifier(
    backbone: str, weights: str | None = None, head_seed: int = 0, pooling: Pooling | None = None
) -> Classifier:
    """``pooling``: None = the backbone's published pooling (``backbones.BackboneSpec.pooling``); the head is
    initialized from ``head_seed`` without touching the global RNG."""
    model = Classifier(create_backbone(backbone, weights), pooling or backbone_spec(backbone).pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        model.atypia_head.reset_parameters()
    return model


def classifier_for(spec: ModelSpec, head_seed: int = 0) -> Classifier:
    """The untrained classifier ``spec`` describes (a fold's learned weights come from its files)."""
    return build_classifier(spec.backbone, spec.weights, head_seed, pooling=spec.pooling)


def preprocess_for(spec: ModelSpec, classifier: Classifier) -> Preprocess:
    """Pixels -> backbone input: the backbone's own data config + ``spec.standardize``."""
    return Preprocess.for_backbone(classifier.backbone, spec.standardize)


class Ensemble(nn.Module):
    """The exported graph: raw pixels uint8 [N, H, W, 3] -> P(atypical) [N], the mean over folds of sigmoid(logit).

    With ``tta`` each figure is also seen in its 8 D4 orientations (one batch of 8N through every fold) and the
    probabilities are averaged over folds and orientations: the folds were trained on all eight.
    """

    def __init__(self, preprocess: Preprocess, folds: Sequence[nn.Module], tta: bool = False):
        super().__init__()
        self.preprocess = preprocess
        self.folds = nn.ModuleList(folds)
        self.tta = tta

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = model_input(self.preprocess, pixels, self.tta)
        probs = torch.stack([torch.sigmoid(fold(x)) for fold in self.folds]).mean(dim=0)
        return mean_over_views(probs, 8 if self.tta else 1)


class CrossRunEnsemble(nn.Module):
    """Several runs' ensembles as one graph: raw pixels -> P(atypical) [N], the mean over every fold of every run.

    Each member keeps its own preprocessing (input size, normalization, standardization) and TTA; a member's
    mean is weighted by its fold count, so every fold weighs the same wherever it came from.
    """

    def __init__(self, members: Sequence[Ensemble]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = [len(m.folds) / sum(len(m.folds) for m in members) for m in members]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return sum(w * member(pixels) for w, member in zip(self.weights, self.members, strict=True))


def network_input(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last layout, which oneDNN and cuDNN convolve faster; embeddings pass unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def embed_all(classifier, preprocess, pixels: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the classifier's embeddings [N, D], float32."""
    classifier.eval()
    chunks = (torch.from_numpy(pixels[s : s + batch_size]).to(device) for s in range(0, len(pixels), batch_size))
    return np.concatenate([classifier.embed(preprocess(chunk)).float().cpu().numpy() for chunk in chunks])


@torch.no_grad()
def predict_probs(
    model, preprocess, pixels: np.ndarray, batch_size: int, device: torch.device, tta: bool = False
) -> np.ndarray:
    """P(atypical) [N] for uint8 [N, H, W, 3], in fp32, the precision the exported graph serves (the threshold is
    chosen on them); with ``tta``, the mean over the 8 D4 orientations, as the exported graph computes it."""
    model.eval()
    probs = []
    for start in range(0, len(pixels), batch_size):
        x = model_input(preprocess, torch.from_numpy(pixels[start : start + batch_size]).to(device), tta)
        p = torch.sigmoid(model(network_input(x)).float())
        probs.append(mean_over_views(p, 8 if tta else 1).cpu().numpy())
    return np.concatenate(probs)
