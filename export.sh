#!/usr/bin/env bash
# Package for Grand Challenge: the container image (docker save | gzip) and model/ as model.tar.gz for the
# separate model upload (the platform extracts it to /opt/ml/model, which process.py prefers when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

IMAGE=${IMAGE:-midog25-track2}

if [ ! -f model/manifest.json ]; then
    echo "export.sh: model/manifest.json missing: export a model first (python -m training export RUN --output model)" >&2
    exit 1
fi

docker build --tag "$IMAGE" .
docker save "$IMAGE" | gzip -c > "$IMAGE.tar.gz"
tar --create --gzip --file model.tar.gz --directory model --exclude README.md .
echo "wrote $IMAGE.tar.gz (container image) and model.tar.gz (model tarball)"
