#!/usr/bin/env bash
# Build the image and run it on test/input the way Grand Challenge runs an algorithm (no network, GPU, read-only
# /input, /output open to the image's non-root user); fail unless the answer matches EXPECTED (classes exact,
# confidence within TOLERANCE).
#   ./test.sh            GPU host: the image's own device (cuda), so a silent CPU fallback fails the test
#   GPUS= ./test.sh      no GPU on this host: run the image with MIDOG_DEVICE=cpu instead
#   BASE_IMAGE=name ./test.sh        build on another base than the Dockerfile's CUDA image
#   EXPECTED=answer.json ./test.sh   the golden answer of the image's model (default test/expected_output.json)
# The image holds upload/, what a GPU platform is handed: model/'s CUDA graph (fp16 when its parity passed) and its
# manifest, written here by `python -m training upload` (PYTHON: an interpreter with the project's requirements).
# Without a GPU that same graph runs on ONNX Runtime's CPU provider: the GPU's answers within the fp16 parity.
set -euo pipefail
EXPECTED=${EXPECTED:+$(realpath "$EXPECTED")}  # relative to where it was called from
cd "$(dirname "${BASH_SOURCE[0]}")"

IMAGE=${IMAGE:-midog25-track2}
GPUS=${GPUS-all}
TOLERANCE=${TOLERANCE:-0.02}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
EXPECTED=${EXPECTED:-test/expected_output.json}
OUTPUT_JSON=multiple-mitotic-figure-classification.json

SCRIPT=test.sh
# shellcheck source=preflight.sh
source ./preflight.sh
need_model
need_engine
[ -z "$GPUS" ] || need_gpu_runtime
need_base

"$PYTHON" -m training upload model --output upload
docker build ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} --tag "$IMAGE" .

output_dir=$(mktemp -d)
trap 'rm -rf "$output_dir"' EXIT
chmod 777 "$output_dir"  # the container runs as a non-root user

# stricter than Grand Challenge on one point: a read-only root file system, so a write outside /output and /tmp
# (a cache, a log file) fails here instead of on the platform
run_flags=(--rm --network none --shm-size 1024m --read-only --tmpfs /tmp
    --volume "$PWD/test/input:/input:ro" --volume "$output_dir:/output")
if [ -n "$GPUS" ]; then
    run_flags+=(--gpus "$GPUS")
else
    run_flags+=(--env MIDOG_DEVICE=cpu)
fi
docker run "${run_flags[@]}" "$IMAGE"

# classes exact, but for pages within TOLERANCE of the model's threshold (fp16 and int8 may carry them across)
threshold=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["threshold"])' upload/manifest.json)
python3 test/compare_answer.py "$output_dir/$OUTPUT_JSON" "$EXPECTED" --tolerance "$TOLERANCE" --threshold "$threshold"
