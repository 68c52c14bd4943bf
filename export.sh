#!/usr/bin/env bash
# Package for Grand Challenge: the container image (docker save | gzip) and model.tar.gz for the separate model
# upload (the platform extracts it to /opt/ml/model, which process.py prefers when present). Both hold upload/,
# what a GPU serves: model/'s CUDA graph (fp16 when its parity passed, else fp32) and a manifest listing exactly
# it, written by `python -m training upload` (PYTHON: an interpreter with the project's requirements). The tarball
# holds manifest.json and the files it lists as plain files owned by root (the platform refuses absolute symlinks
# and clears group/other write bits).
#   BASE_IMAGE=name ./export.sh      build on another base than the Dockerfile's CUDA image
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

IMAGE=${IMAGE:-midog25-track2}
IMAGE_ARCHIVE="${IMAGE//[\/:]/_}.tar.gz"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

SCRIPT=export.sh
# shellcheck source=preflight.sh
source ./preflight.sh
need_model
need_engine
need_base
"$PYTHON" -m training upload model --output upload
mapfile -t model_files < <(python3 -c 'import json; print("\n".join(["manifest.json", *json.load(open("upload/manifest.json"))["files"]]))')

docker build ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} --tag "$IMAGE" .
docker save "$IMAGE" | gzip -c > "$IMAGE_ARCHIVE"
tar --create --gzip --file model.tar.gz --directory upload --dereference --owner=0 --group=0 --numeric-owner \
    --mode=go-w "${model_files[@]}"
echo "wrote $IMAGE_ARCHIVE (container image) and model.tar.gz (model tarball: ${model_files[*]})"
