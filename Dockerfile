# MIDOG 2025 Track 2 inference container: a Grand Challenge algorithm, and the image the organizers re-run.
# BASE_IMAGE: CUDA 12.8 + cuDNN 9 runtime, what onnxruntime-gpu 1.26.0, the last CUDA 12 build on PyPI, is built
# against (host driver >= 570, or >= 525 under CUDA minor-version compatibility, e.g. a T4 on driver 535). Any
# Debian or Ubuntu image with python3 builds a CPU-only image (the test suite's base, test/container/engine.sh).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system user \
    && useradd --system --create-home --no-log-init --gid user user

WORKDIR /opt/app

# dependencies before code: a code or model change does not reinstall them
COPY requirements.txt /opt/app/
RUN pip install --requirement /opt/app/requirements.txt

COPY contracts.py declared.py reader.py process.py inference.py /opt/app/
# upload/: the graph a GPU serves and its manifest, nothing else (test.sh and export.sh write it from model/)
COPY upload/ /opt/app/model/

USER user
# the device the entry point demands: a GPU platform must not answer from a silent CPU fallback
ENV MIDOG_DEVICE=cuda
# the organizers' harness times /opt/app/inference.py, mounted over this one, with no arguments after the image
ENTRYPOINT ["python", "/opt/app/inference.py"]
