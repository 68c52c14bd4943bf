"""The contracts shared by the exporter (``training.export``) and the container (``process.py``).

One owner per contract: the answer Grand Challenge scores, and the manifest that describes an exported model
folder. The container image copies this module next to ``process.py``; it imports nothing from ``training``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INPUT_INTERFACE = "stacked-histopathology-roi-cropouts"
ANSWER_FILENAME = "multiple-mitotic-figure-classification.json"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 2  # 2: one graph per precision, chosen per device
ONNX_INPUT = "pixels"  # uint8 [N, H, W, 3], RGB, any H and W: the graph resizes and normalizes
ONNX_OUTPUT = "prob_atypical"  # float32 [N], mean over folds of sigmoid(logit)
MAX_PAGES = 16  # the challenge stacks 1..16 figures per case

Label = Literal["normal", "atypical"]
Precision = Literal["fp32", "fp16", "int8"]  # int8: MatMul weights, activations quantized per batch
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


def classify(prob_atypical: float, threshold: float) -> Label:
    """The decision rule, used when the threshold is chosen (training) and when it is applied (serving)."""
    return "atypical" if prob_atypical >= threshold else "normal"


def build_answer(probs: Sequence[float], threshold: float) -> list[dict[str, Any]]:
    """One ``{"class", "confidence"}`` entry per page, in page order, ready for ``json.dump``."""
    answer = []
    for p in probs:
        p = float(p)
        if not math.isfinite(p):
            raise ContractError(f"model produced a non-finite probability ({p})")
        entry = FigureAnswer(label=classify(p, threshold), confidence=p)
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


class ModelManifest(BaseModel):
    """``model/manifest.json``: what the exported ensemble is, how to call it, and where it came from.

    ``graphs`` names one ONNX file per precision (fp32 always, the reference); ``serve`` says which one each
    device runs; ``parity`` records every reduced-precision graph's check against fp32, refused ones included.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[2] = MANIFEST_FORMAT_VERSION
    backbone: str
    folds: int = Field(ge=1)
    threshold: float = Field(ge=0.0, le=1.0)
    graphs: dict[Precision, str] = Field(description="precision -> ONNX file name in the model folder")
    serve: dict[Device, Precision] = {"cuda": "fp32", "cpu": "fp32"}
    parity: dict[Precision, ParityCheck] = {}
    input_name: Literal["pixels"] = ONNX_INPUT
    output_name: Literal["prob_atypical"] = ONNX_OUTPUT
    files: dict[str, str] = Field(description="file name relative to the model folder -> sha256")
    training_config: dict[str, Any]
    oof_metrics: dict[str, float | None] = Field(description="None where undefined, e.g. AUC with one class")
    created_utc: str

    @model_validator(mode="after")
    def _served_graphs_exist(self) -> ModelManifest:
        if "fp32" not in self.graphs:
            raise ValueError("graphs must include fp32, the reference graph")
        for device, precision in self.serve.items():
            if precision not in self.graphs:
                raise ValueError(f"serve.{device} is {precision}, which graphs does not name")
            if precision != "fp32" and not (precision in self.parity and self.parity[precision].accepted):
                raise ValueError(f"serve.{device} is {precision}, which has no accepted parity check")
        return self

    def graph_for(self, device: Device) -> tuple[Precision, str]:
        precision = self.serve.get(device, "fp32")
        return precision, self.graphs[precision]

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / MANIFEST_FILENAME
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise ContractError(f"{path}: no manifest (export a model first)") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ContractError(f"{path}: invalid manifest at '{where}': {first['msg']}") from None

    def verify_files(self, model_dir: Path) -> None:
        """Every file the manifest names exists with the recorded sha256, and every graph is among them."""
        for precision, name in self.graphs.items():
            if name not in self.files:
                raise ContractError(f"{model_dir / MANIFEST_FILENAME}: the {precision} graph {name!r} has no checksum")
        for name, expected in self.files.items():
            path = model_dir / name
            if not path.is_file():
                raise ContractError(f"{path}: missing (named in the manifest)")
            if sha256_of(path) != expected:
                raise ContractError(f"{path}: sha256 does not match the manifest")
