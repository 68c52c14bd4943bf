"""The contracts shared by the exporter (``training.export``) and the container (``process.py``).

One owner per contract: the answer Grand Challenge scores, the manifest that describes an exported model folder,
and the one preprocessing step outside the graph (resampling a page to the model's pixel size). The container
image copies this module next to ``process.py``; it imports nothing from ``training``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INPUT_INTERFACE = "stacked-histopathology-roi-cropouts"
ANSWER_FILENAME = "multiple-mitotic-figure-classification.json"
MANIFEST_FILENAME = "manifest.json"
# 3: each graph names its external-data files; a folder may hold only what it serves. 4: the runs it averages
MANIFEST_FORMAT_VERSION = 4
ONNX_INPUT = "pixels"  # uint8 [N, H, W, 3], RGB, any H and W: the graph resizes and normalizes
ONNX_OUTPUT = "prob_atypical"  # float32 [N], mean over folds of sigmoid(logit)
MAX_PAGES = 16  # the challenge stacks 1..16 figures per case
# A recorded resolution outside this range (um per pixel) is not a microscope scan's (a 72 dpi default, a missing
# unit): such pages are served as they are. 0.1-1.0 spans 40x (~0.25) and 20x (~0.5) scans.
PLAUSIBLE_PIXEL_SIZE_UM = (0.1, 1.0)

Label = Literal["normal", "atypical"]
Precision = Literal["fp32", "fp16", "int8"]  # int8: MatMul weights; activations quantized per run (one page)
Device = Literal["cuda", "cpu"]


class ContractError(ValueError):
    """A model folder or an answer that breaks its contract."""


class FigureAnswer(BaseModel):
    """One page's answer. ``confidence`` is always P(atypical), whatever the class."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    label: Label = Field(alias="class")
    confidence: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("confidence", mode="before")
    @classmethod
    def _a_json_float(cls, value: object) -> object:
        # the scorer rejects an integer confidence (0 or 1 written without a decimal point)
        if type(value) is not float:
            raise ValueError(f"confidence must be a float, got {type(value).__name__} {value!r}")
        return value


def classify(prob_atypical: float | np.ndarray | Sequence[float], threshold: float) -> np.ndarray:
    """The decision rule, where the threshold is chosen (training) and where it is applied (serving): True
    (atypical) where P(atypical) >= ``threshold``. Any shape in, bool of that shape out, compared in float64."""
    return np.asarray(prob_atypical, dtype=np.float64) >= threshold


def label_of(atypical: bool | np.bool_) -> Label:
    return "atypical" if atypical else "normal"


def resample_to_pixel_size(pixels: np.ndarray, source_um: float, target_um: float) -> np.ndarray:
    """Pages scanned at ``source_um`` micrometres per pixel, resampled to ``target_um`` about their centre, size
    unchanged: a figure covers as many pixels as it did in training. uint8 [..., H, W, 3] in and out.

    Bilinear; zooming out reflects the borders. Training (each scanner's known pixel size) and serving (each page's
    recorded resolution) both call this, so the model never sees a figure resampled another way.
    """
    zoom = source_um / target_um  # > 1: the page's pixels are larger than the model's, so magnify
    if abs(zoom - 1) < 1e-3:
        return pixels
    h, w = pixels.shape[-3:-1]

    def taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if n < 2:  # a side of one pixel has nothing to interpolate between
            return np.zeros(n, int), np.zeros(n, int), np.zeros(n, np.float32)
        centre = (n - 1) / 2
        at = (np.arange(n) - centre) / zoom + centre
        period = 2 * (n - 1)
        at = np.abs(at) % period
        at = np.where(at > n - 1, period - at, at)  # reflect about the first and last pixel
        low = np.minimum(np.floor(at).astype(int), n - 2)
        return low, low + 1, (at - low).astype(np.float32)

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    x = pixels.astype(np.float32)
    rows = x[..., y0, :, :] * (1 - fy)[:, None, None] + x[..., y1, :, :] * fy[:, None, None]
    out = rows[..., :, x0, :] * (1 - fx)[:, None] + rows[..., :, x1, :] * fx[:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def build_answer(probs: Sequence[float], threshold: float) -> list[dict[str, Any]]:
    """One ``{"class", "confidence"}`` entry per page, in page order, ready for ``json.dump``."""
    answer = []
    for p in probs:
        p = float(p)
        if not math.isfinite(p):
            raise ContractError(f"model produced a non-finite probability ({p})")
        entry = FigureAnswer(label=label_of(classify(p, threshold)), confidence=p)
        answer.append(entry.model_dump(by_alias=True))
    return answer


def validate_answer(answer: Any, n_pages: int) -> None:
    """Reject anything the official scorer would reject: wrong length, missing keys, non-float confidences."""
    if not isinstance(answer, list) or len(answer) != n_pages:
        got = len(answer) if isinstance(answer, list) else type(answer).__name__
        raise ContractError(f"answer must be a list of {n_pages} entries, got {got}")
    for i, entry in enumerate(answer):
        try:
            FigureAnswer.model_validate(entry)
        except ValidationError as err:
            raise ContractError(f"answer entry {i} is invalid: {err.errors()[0]['msg']}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ParityCheck(BaseModel):
    """A reduced-precision graph against the fp32 one, on real patches; ``accepted`` = within the limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_abs_dp: float = Field(ge=0.0, description="largest |P(atypical) - P_fp32(atypical)|")
    class_agreement: float = Field(ge=0.0, le=1.0, description="share of patches given the fp32 graph's class")
    patches: int = Field(ge=1)
    provider: str = Field(description="the ONNX Runtime provider that ran both graphs")
    accepted: bool


class GraphFiles(BaseModel):
    """One ONNX graph of a model folder: its protobuf and the external-data files holding its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="the ONNX protobuf, relative to the model folder")
    external_data: list[str] = Field([], description="the files its tensors' external-data locations name")

    @property
    def names(self) -> list[str]:
        return [self.file, *self.external_data]


class EnsembleMember(BaseModel):
    """One training run whose folds the ensemble averages: its folder's name, backbone, fold count, resolved
    config and its own out-of-fold figures (at its own threshold)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    backbone: str
    folds: int = Field(ge=1)
    training_config: dict[str, Any]
    oof_metrics: dict[str, float | None] = Field(description="None where undefined, e.g. AUC with one class")


class ModelManifest(BaseModel):
    """``model/manifest.json``: what the exported ensemble is, how to call it, and where it came from.

    ``graphs`` names one ONNX graph per precision held in the folder: an export holds fp32 (the reference) and
    the reduced precisions that passed parity; an upload (``training upload``) holds only the graph one device
    serves. ``serve`` says which graph each device runs; ``parity`` records every reduced-precision graph's check
    against fp32, refused ones included. ``files`` lists exactly the graphs' files, each with its sha256 (an
    upload holds nothing else besides the manifest); a run verifies only the files of the graph it loads
    (``verify_graph``). ``members`` are the runs whose folds the graph averages, every fold weighing the same;
    ``backbone`` and ``folds`` sum them up, ``oof_metrics`` are the combined out-of-fold figures at ``threshold``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[4] = MANIFEST_FORMAT_VERSION
    backbone: str = Field(description="the members' backbones, ' + ' between them")
    folds: int = Field(ge=1, description="every member's folds together")
    threshold: float = Field(ge=0.0, le=1.0)
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="the micrometres per pixel it was trained at: pages that record another "
        "resolution are resampled to it; None: every page is served as it is",
    )
    graphs: dict[Precision, GraphFiles] = Field(min_length=1, description="precision -> the graph's files")
    serve: dict[Device, Precision] = {"cuda": "fp32", "cpu": "fp32"}
    parity: dict[Precision, ParityCheck] = {}
    input_name: Literal["pixels"] = ONNX_INPUT
    output_name: Literal["prob_atypical"] = ONNX_OUTPUT
    files: dict[str, str] = Field(description="file name relative to the model folder -> sha256")
    members: list[EnsembleMember] = Field(min_length=1)
    oof_metrics: dict[str, float | None] = Field(description="None where undefined, e.g. AUC with one class")
    created_utc: str

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if missing := sorted({"cuda", "cpu"} - set(self.serve)):
            raise ValueError(f"serve names no graph for {', '.join(missing)}")
        for device, precision in self.serve.items():
            if precision not in self.graphs:
                raise ValueError(f"serve.{device} is {precision}, which graphs does not name")
            if precision != "fp32" and not (precision in self.parity and self.parity[precision].accepted):
                raise ValueError(f"serve.{device} is {precision}, which has no accepted parity check")
        named = {name for graph in self.graphs.values() for name in graph.names}
        outside = sorted(n for n in named | set(self.files) if Path(n).name != n or n in ("", ".", ".."))
        if outside:  # a model folder serves its own files, never another folder's
            raise ValueError(f"file name(s) {outside} are not plain names inside the model folder")
        if unlisted := sorted(named - set(self.files)):
            raise ValueError(f"graph file(s) {unlisted} have no checksum in files")
        if orphans := sorted(set(self.files) - named):
            raise ValueError(f"files {orphans} belong to no graph")
        if self.folds != sum(m.folds for m in self.members):
            raise ValueError(f"folds is {self.folds}, the members' add up to {sum(m.folds for m in self.members)}")
        return self

    def graph_for(self, device: Device) -> tuple[Precision, GraphFiles]:
        """The precision and files of the graph ``device`` serves."""
        precision = self.serve[device]
        return precision, self.graphs[precision]

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / MANIFEST_FILENAME
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise ContractError(
                f"{path}: no manifest; export a model there first (python -m training export RUN --output "
                f"{model_dir}; make demo writes model/)"
            ) from None
        except OSError as err:
            raise ContractError(f"{path}: cannot read the manifest ({err.strerror})") from None
        except UnicodeDecodeError as err:
            raise ContractError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ContractError(f"{path}: invalid manifest at '{where}': {first['msg']}") from None

    def verify_graph(self, model_dir: Path, precision: Precision) -> None:
        """The files of the ``precision`` graph exist with their recorded sha256: what a run checks before it
        loads that graph, and nothing else (a Virchow-size folder holds gigabytes the run never reads)."""
        self._verify(model_dir, self.graphs[precision].names)

    def verify_files(self, model_dir: Path) -> None:
        """Every file the manifest lists exists with its recorded sha256 (an export or upload checks its own)."""
        self._verify(model_dir, list(self.files))

    def _verify(self, model_dir: Path, names: list[str]) -> None:
        for name in names:
            path = model_dir / name
            if not path.is_file():
                raise ContractError(f"{path}: missing (named in the manifest)")
            if sha256_of(path) != self.files[name]:
                raise ContractError(f"{path}: sha256 does not match the manifest")

    def size_bytes(self, model_dir: Path, precision: Precision) -> int:
        """Bytes on disk of the ``precision`` graph: protobuf and external data."""
        return sum((model_dir / name).stat().st_size for name in self.graphs[precision].names)
