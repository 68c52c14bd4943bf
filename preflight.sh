# Sourced by test.sh and export.sh: each check a first-time user can fail, before anything is written or built, as
# one line that says what to do. SCRIPT: the calling script's name, for the messages.

fail() {
    echo "$SCRIPT: $*" >&2
    exit 1
}

need_model() {
    [ -f model/manifest.json ] ||
        fail "model/manifest.json missing: make demo writes the demo model; a trained run: python -m training export RUN --output model"
}

need_engine() {
    docker info >/dev/null 2>&1 ||
        fail "no Docker engine answers (docker info failed): start dockerd (on a Debian test machine: bash test/container/engine.sh, as root)"
}

# the base the Dockerfile builds on, pulled here unless present, so that a registry out of reach is named as such
need_base() {
    local base=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)}
    docker image inspect "$base" >/dev/null 2>&1 || docker pull --quiet "$base" >/dev/null 2>&1 ||
        fail "cannot pull the base image $base: with no registry in reach, BASE_IMAGE=<a local Debian or Ubuntu image with python3> ./$SCRIPT"
}

# docker run --gpus needs NVIDIA's container toolkit on the host: its runtime registered, or its CLI installed
need_gpu_runtime() {
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia || command -v nvidia-container-cli >/dev/null ||
        fail "no GPU runtime on this Docker host (NVIDIA container toolkit): GPUS= ./$SCRIPT runs the image on the CPU"
}
