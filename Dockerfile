# MIDOG 2025 Track 2 inference container (Grand Challenge algorithm).
# CUDA 12.8 + cuDNN 9 runtime: what onnxruntime-gpu 1.26.0, the last CUDA 12 build on PyPI, is built against.
# Host driver: >= 570 for CUDA 12.8, or >= 525 under CUDA minor-version compatibility (e.g. a T4 on driver 535).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system user \
    && useradd --system --create-home --no-log-init --gid user user

WORKDIR /opt/app

# dependencies before code: a code or model change does not reinstall them
COPY requirements.txt /opt/app/
RUN pip install --requirement /opt/app/requirements.txt

COPY contracts.py process.py /opt/app/
COPY model/ /opt/app/model/

USER user
ENTRYPOINT ["python", "/opt/app/process.py", "--device", "cuda"]
