"""The torch modules that training runs and export freezes into ONNX.

``Preprocess`` is the single definition of how raw pixels become backbone input: training applies it to its
batches and export puts it in front of the folds, so training and serving cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from training.backbones import Pooling, backbone_spec, create_backbone
from training.config import TrainConfig

_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


class Preprocess(nn.Module):
    """uint8 RGB [N, H, W, 3], any H and W -> normalized float [N, 3, S, S] at the backbone's input size."""

    def __init__(self, input_size: Sequence[int], interpolation: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if interpolation not in _TORCH_MODES:
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        self.size = (int(input_size[-2]), int(input_size[-1]))
        self.mode = _TORCH_MODES[interpolation]
        # (x / 255 - mean) / std, folded into one multiply-add
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    @classmethod
    def for_backbone(cls, backbone: nn.Module) -> Preprocess:
        cfg = resolve_data_config(pretrained_cfg=backbone.pretrained_cfg)
        return cls(cfg["input_size"], cfg["interpolation"], cfg["mean"], cfg["std"])

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 255] -> [N, 3, S, S].

        Always resamples, even at the target size (an exact identity then): a shape test would freeze into the
        exported graph. align_corners=False matches ONNX Resize's half_pixel mode.
        """
        kwargs = {} if self.mode == "nearest" else {"align_corners": False}
        return F.interpolate(x, size=self.size, mode=self.mode, **kwargs)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.resize(pixels.permute(0, 3, 1, 2).float()))


BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # a Gaussian of sigma ~1 px, normalized
# The detail band's RMS that standardize_detail gives every figure: the breast subset's scanners have 0.13-0.20
# after channel standardization (python -m training describe), 0.17 over all its figures.
DETAIL_RMS = 0.17
# The ceiling that detail_ceiling lowers sharper figures to: the breast subset's softest scanner's level (Hamamatsu
# S360, 0.126). Softness can be matched by blurring; sharpness cannot be restored without inventing detail.
DETAIL_RMS_CEILING = 0.126
# The mid band's RMS that standardize_mid_band gives every figure: about the softest scanner's level. Once colour and
# detail are standardized at 0.23 um/px, the breast subset's scanners have 0.258 (Hamamatsu S360), 0.269
# (Hamamatsu XR) and 0.289 (Aperio CS2): python -m training describe --pixel-size-um 0.23.
MID_BAND_RMS = 0.26
# Mid band and detail band are set in turn, twice: setting one moves the other a little (their blurs overlap);
# after two rounds the detail band is exact and the mid band within a few percent of its target.
BAND_ROUNDS = 2


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] smoothed by the 5x5 binomial kernel, borders reflected."""
    kernel = (BINOMIAL_5[:, None] * BINOMIAL_5[None, :]).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def standardize_channels(x: torch.Tensor) -> torch.Tensor:
    """Each image's channels of float [N, C, H, W] to mean 0 and standard deviation 1."""
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    return centred / centred.square().mean(dim=(2, 3), keepdim=True).add(1e-4).sqrt()


def fine_band(x: torch.Tensor) -> torch.Tensor:
    """The detail band of float [N, C, H, W]: the image minus its binomial blur (structure finer than ~1 px)."""
    return x - binomial_blur(x)


MID_BAND_BLURS = 6  # the mid band's lower edge: 6 more binomial blurs, a Gaussian of sigma ~2.4 px


def mid_band(x: torch.Tensor) -> torch.Tensor:
    """The band below the detail band: the blurred image minus its further ``MID_BAND_BLURS`` blurs (structure of
    ~1-3 px, 0.25-0.7 um at 0.23 um/px: chromatin texture and the edges of a figure's arms)."""
    smooth = binomial_blur(x)
    coarse = smooth
    for _ in range(MID_BAND_BLURS):
        coarse = binomial_blur(coarse)
    return smooth - coarse


def band_rms(x: torch.Tensor, band: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """float [N, C, H, W] -> [N]: the RMS of each image's ``band``."""
    return band(x).square().mean(dim=(1, 2, 3)).sqrt()


def detail_rms(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] -> [N]: the RMS of each image's detail band (the image minus its binomial blur)."""
    return band_rms(x, fine_band)


def equalize_band(x: torch.Tensor, band: Callable[[torch.Tensor], torch.Tensor], target: float,
                  only_down: bool = False) -> torch.Tensor:  # fmt: skip
    """float [N, C, H, W] -> ``x + (s - 1) * band(x)``, with each image's ``s >= 0`` chosen so that the result's
    own ``band`` has RMS exactly ``target``; with ``only_down``, ``s <= 1``: an image whose band is below
    ``target`` is kept as it is. ``band`` is linear (a difference of blurs).

    Scaling the band by ``target / band_rms(x)`` would not do: a difference of blurs is not a projection, so the
    result's band also holds the residue of the rest of the image. The result's band is
    ``band(x) + (s - 1) band(band(x)) = a + s b`` with ``b = band(band(x))`` and ``a = band(x) - b``, and
    ``mean((a + s b)^2) = target^2`` is a quadratic in ``s``: its larger root. (Where even ``s = 0`` leaves
    more than ``target``, as for noise, ``s`` is 0; every figure of the breast subset reaches it exactly.)
    """
    part = band(x)
    b = band(part)
    a = part - b
    dims = (1, 2, 3)
    bb, ab = b.square().mean(dims), (a * b).mean(dims)
    aa_minus_target = a.square().mean(dims) - target**2
    s = (ab.square() - bb * aa_minus_target).clamp_min(0).sqrt().sub(ab).div(bb.add(1e-8)).clamp_min(0)
    if only_down:
        s = s.clamp_max(1)
    return x + part * (s - 1).view(-1, 1, 1, 1)


def equalize_detail(x: torch.Tensor, target: float = DETAIL_RMS, only_down: bool = False) -> torch.Tensor:
    """Each image's detail band (``fine_band``) brought to RMS ``target`` (see ``equalize_band``), its blur kept."""
    return equalize_band(x, fine_band, target, only_down)


class Classifier(nn.Module):
    """Backbone features -> embedding -> linear -> one logit for 'atypical'.

    Pooling, as each backbone was published: ``cls+mean`` = concat(CLS token, mean of patch tokens), with prefix
    tokens (CLS and registers) excluded from the mean; ``cls`` = the CLS token; ``avg`` = global average of a CNN's
    last feature map.

    With ``standardize``, each image's channels are brought to mean 0 and standard deviation 1 before the
    backbone (a Reinhard-style normalization in RGB): what differs between scanners and labs as a global gain and
    offset per channel never reaches the network. For models trained from scratch; a pretrained backbone expects
    its own normalization.

    With ``standardize_detail`` as well, each image's detail band (what a 5x5 binomial blur removes) is scaled to
    the same RMS, ``DETAIL_RMS``: scanners differ most in sharpness, which scales this band (1.6x between the
    breast subset's sharpest and softest scanner), while atypical and normal figures of one scanner differ in it
    by about 5%. With ``detail_ceiling``, only a detail band above ``DETAIL_RMS_CEILING`` is scaled, down to it:
    sharper scanners are softened to the softest one's level, softer figures are not sharpened.

    With ``standardize_mid_band`` as well, the band below the detail band (``mid_band``, structure of 1-3 px) is
    brought to ``MID_BAND_RMS`` too: after the detail band is equalized, scanners still differ in it by up to
    1.12x (Aperio CS2 against Hamamatsu S360).
    """

    def __init__(self, backbone: nn.Module, pooling: Pooling, standardize: bool = False,
                 standardize_detail: bool = False, detail_ceiling: bool = False,
                 standardize_mid_band: bool = False):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.standardize = standardize
        self.standardize_detail = standardize_detail
        self.detail_ceiling = detail_ceiling
        self.standardize_mid_band = standardize_mid_band
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        dim = backbone.num_features * (2 if pooling == "cls+mean" else 1)
        # not "head": peft matches modules_to_save by name suffix, and timm backbones have a `head` of their own
        self.atypia_head = nn.Linear(dim, 1)

    @property
    def embedding_dim(self) -> int:
        return self.atypia_head.in_features

    def _standardized(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            x = standardize_channels(x)
        if self.standardize_mid_band:
            for _ in range(BAND_ROUNDS):
                x = equalize_detail(equalize_band(x, mid_band, MID_BAND_RMS))
        elif self.standardize_detail and self.detail_ceiling:
            x = equalize_detail(x, DETAIL_RMS_CEILING, only_down=True)
        elif self.standardize_detail:
            x = equalize_detail(x)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # image statistics in fp32, also under bf16 training
            with torch.autocast(x.device.type, enabled=False):
                x = self._standardized(x.float())
        else:
            x = self._standardized(x)
        features = self.backbone.forward_features(x)
        if self.pooling == "avg":  # the CNN's own head up to its classifier: pooling (and a final norm, if any)
            return self.backbone.forward_head(features, pre_logits=True)
        if self.pooling == "cls":
            return features[:, 0]
        return torch.cat([features[:, 0], features[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.atypia_head(self.embed(x)).squeeze(-1)


def build_classifier(backbone: str, weights: str | None = None, head_seed: int = 0, standardize: bool = False,
                     standardize_detail: bool = False, detail_ceiling: bool = False,
                     standardize_mid_band: bool = False, pooling: Pooling | None = None) -> Classifier:  # fmt: skip
    """``pooling``: None = the backbone's published pooling (``backbones.BackboneSpec.pooling``)."""
    model = Classifier(create_backbone(backbone, weights), pooling or backbone_spec(backbone).pooling, standardize,
                       standardize_detail, detail_ceiling, standardize_mid_band)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        model.atypia_head.reset_parameters()
    return model


def d4_views(x: torch.Tensor, *, h: int, w: int) -> list[torch.Tensor]:
    """The 8 flips and quarter turns (the dihedral group D4) of images with spatial dims ``h`` and ``w``: the four
    flips of ``x``, then the four of its transpose (every quarter turn is a transpose and a flip)."""
    t = x.transpose(h, w)
    return [v for y in (x, t) for v in (y, y.flip(w), y.flip(h), y.flip((h, w)))]


def model_input(preprocess: Preprocess, pixels: torch.Tensor, tta: bool) -> torch.Tensor:
    """uint8 pages [N, H, W, 3] -> backbone input; with ``tta``, their 8 D4 views, view-major [8N, 3, S, S].

    The pages are turned before the resize, as uint8 NHWC: a page need not be square, so the upright and the
    transposed views are resized apart. (Turning the resized tensor instead exports a Transpose that ONNX
    Runtime's layout optimizer pushes into the bicubic Resize, which it then cannot run.) Validation and the
    exported graph both come through here."""
    if not tta:
        return preprocess(pixels)
    views = d4_views(pixels, h=1, w=2)
    return torch.cat([preprocess(torch.cat(views[:4])), preprocess(torch.cat(views[4:]))])


def mean_over_views(probs: torch.Tensor, views: int) -> torch.Tensor:
    """[views * N] view-major -> [N], the mean over views."""
    return probs.reshape(views, -1).mean(dim=0)


def classifier_for(cfg: TrainConfig, head_seed: int = 0) -> Classifier:
    """The untrained classifier a run's config describes (its weights come from the fold's files)."""
    return build_classifier(cfg.backbone, cfg.weights, head_seed, standardize=cfg.standardize_input,
                            standardize_detail=cfg.standardize_detail, detail_ceiling=cfg.detail_ceiling,
                            standardize_mid_band=cfg.standardize_mid_band, pooling=cfg.pooling)  # fmt: skip


class Ensemble(nn.Module):
    """The exported graph: raw pixels -> P(atypical), the mean over folds of sigmoid(logit).

    With ``tta`` each figure is also seen in its 8 D4 orientations (one batch of 8N through every fold) and the
    probabilities are averaged over folds and orientations: a mitotic figure has no canonical orientation, and
    the folds were trained on all eight.
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
