"""The run folder (nnU-Net style): one type names every path of a run, and says when a fold or the run is done.

::

    RUN/config.yaml            the resolved config; a rerun with another config is refused
    RUN/provenance.json        data roots, git commit, library versions
    RUN/splits.json            validation image ids per fold
    RUN/fold_<k>/adapter/      the kept epoch's peft adapter + head (lora), or
    RUN/fold_<k>/weights.safetensors   its learned weights (linear, full)
    RUN/fold_<k>/checkpoint.pt the end of the last epoch, to resume after a kill
    RUN/fold_<k>/log.csv       one row per epoch, written as it goes (the same in fold_<k>/tensorboard/)
    RUN/fold_<k>/val.csv       the kept epoch's predictions on the held-out fold (training.metrics' CSV shape)
    RUN/fold_<k>/best.json     the kept epoch and its validation figures; written last, it marks the fold finished
    RUN/oof.csv                every fold's held-out predictions (training.metrics' CSV shape)
    RUN/summary.json           the threshold chosen on oof.csv and its figures; it marks the run finished
                               (``external``: the figures on labs never trained on, added after it)
    RUN/external/<name>.csv    the run's ensemble, as served, on the external set <name> (train --external)
    RUN/external/<name>/       its report.html and plots (training.pages)
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FoldFolder:
    """``RUN/fold_<k>/``: one fold's files."""

    path: Path

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def weights(self) -> Path:
        return self.path / "weights.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def log(self) -> Path:
        return self.path / "log.csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def val(self) -> Path:
        return self.path / "val.csv"

    @property
    def best(self) -> Path:
        return self.path / "best.json"

    @property
    def finished(self) -> bool:
        return self.best.is_file()

    def read_best(self) -> dict:
        return json.loads(self.best.read_text())

    def write_best(self, best: dict) -> None:
        """Written whole and last (a rename): its presence marks the fold finished."""
        tmp = self.path / f".{self.best.name}.tmp"
        tmp.write_text(json.dumps(best, indent=1))
        os.replace(tmp, self.best)


@dataclass(frozen=True)
class RunFolder:
    """``RUN/``: a run's files; nothing is created until training writes it."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.path / "provenance.json"

    @property
    def splits(self) -> Path:
        return self.path / "splits.json"

    @property
    def oof(self) -> Path:
        return self.path / "oof.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def external(self, name: str) -> Path:
        return self.path / "external" / f"{name}.csv"

    def external_report(self, name: str) -> Path:
        return self.path / "external" / name

    def fold(self, k: int) -> FoldFolder:
        return FoldFolder(self.path / f"fold_{k}")

    def unfinished_folds(self, n_folds: int) -> list[int]:
        return [k for k in range(n_folds) if not self.fold(k).finished]

    @property
    def finished(self) -> bool:
        """Every fold trained and the out-of-fold predictions pooled."""
        return self.summary.is_file()

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def read_val_ids(self) -> list[list[str]]:
        return json.loads(self.splits.read_text())["val_ids"]

    def data_roots(self) -> list[Path]:
        return [Path(r) for r in json.loads(self.provenance.read_text())["data_roots"]]

    def commit(self) -> str | None:
        """The git commit that trained the run (``-dirty`` with uncommitted changes), as provenance.json records it."""
        return json.loads(self.provenance.read_text()).get("git") if self.provenance.is_file() else None


def library_versions() -> dict[str, str]:
    import peft
    import timm
    import torch

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
