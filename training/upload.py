"""The upload for a GPU platform: the one graph CUDA serves, and a manifest that lists exactly its files.

An export keeps every graph (fp32, the reference; fp16 for CUDA; int8 for the CPU) for local use and comparison.
A GPU platform is handed only what it serves (``export.sh``'s model tarball, and the model ``test.sh`` and
``export.sh`` bake into the image): the CUDA graph (fp16 when its parity passed, else fp32), served on every
device, so the same image run on a host without a GPU (``GPUS= ./test.sh``) answers from the very graph the GPU
would, on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from contracts import MANIFEST_FILENAME, Device, ModelManifest

log = logging.getLogger(__name__)


def _place(source: Path, target: Path) -> None:
    """A copy readable by the image's user. Not a hard link: onnx refuses external data with several links."""
    shutil.copyfile(source, target)
    target.chmod(0o644)


def _check_replaceable(output_dir: Path) -> None:
    """An earlier upload (its manifest and the files it lists) or an empty folder may be replaced; else refuse."""
    if not output_dir.exists():
        return
    entries = sorted(p.name for p in output_dir.iterdir())
    if not entries:
        return
    if MANIFEST_FILENAME not in entries:
        raise ValueError(f"{output_dir}: not empty and not a model folder; refusing to write the upload there")
    previous = ModelManifest.load(output_dir)
    if strays := sorted(set(entries) - {MANIFEST_FILENAME, *previous.files}):
        raise ValueError(f"{output_dir}: holds files its manifest does not list ({', '.join(strays)}); remove them")


def write_upload(model_dir: Path, output_dir: Path, device: Device = "cuda") -> ModelManifest:
    """``model_dir`` (an export) -> ``output_dir``: the graph ``device`` serves, its files verified, and a manifest
    naming only that graph, served on every device. Written beside ``output_dir`` and renamed into place, so an
    earlier upload there is replaced whole or kept."""
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{output_dir}: the upload must go to another folder than the export it comes from")
    manifest = ModelManifest.load(model_dir)
    precision, graph = manifest.graph_for(device)
    manifest.verify_graph(model_dir, precision)
    _check_replaceable(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    try:
        for name in graph.names:
            _place(model_dir / name, staged / name)
        upload = manifest.model_copy(
            update={
                "graphs": {precision: graph},
                "serve": {"cuda": precision, "cpu": precision},
                "files": {name: manifest.files[name] for name in graph.names},
            }
        )
        (staged / MANIFEST_FILENAME).write_text(upload.model_dump_json(indent=1) + "\n")
        (staged / MANIFEST_FILENAME).chmod(0o644)
        upload = ModelManifest.load(staged)  # validated as process.py will read it
        upload.verify_files(staged)
        staged.chmod(0o755)  # mkdtemp's 0700 would hide the folder from the image's user
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staged.rename(output_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    size = upload.size_bytes(output_dir, precision)
    log.info(
        "wrote %s: the %s graph (%.1f MB) and its manifest, what a GPU platform is handed",
        output_dir,
        precision,
        size / 1e6,
    )
    return upload


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder``: what a platform is handed when given it."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
