#!/usr/bin/env bash
# Bring up what the container tests need, each step only when it is missing: Debian's docker.io and debootstrap,
# a running dockerd, the test base image, and the image's dependency layers built on it. No registry is reachable
# from the test machines, so the CUDA base cannot be pulled; a Debian bookworm root with python3 (debootstrap +
# docker import) stands in for it. It trusts the host's CA bundle (PIP_CERT) so that pip reaches the package index
# from inside a build: test scaffolding, not part of the Dockerfile.
#   bash test/container/engine.sh                         (as root; .ci/run calls it)
#   TEST_BASE_IMAGE=name bash test/container/engine.sh    another tag for the base (default midog25-test-base)
set -euo pipefail

TEST_BASE_IMAGE=${TEST_BASE_IMAGE:-midog25-test-base}
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install --yes -qq --no-install-recommends docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    # no systemd on these machines: start the daemon by hand, detached, with its log beside its state
    mkdir -p /var/log
    setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "engine.sh: dockerd did not start (see /var/log/dockerd.log)" >&2; exit 1; }
fi

if ! docker image inspect "$TEST_BASE_IMAGE" >/dev/null 2>&1; then
    # the machine's own Debian mirror, the one apt-get uses
    mirror=$(sed -n 's/^URIs: *\(\S*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
    cp "$HOST_CA_BUNDLE" "$root/etc/ssl/certs/host-ca-bundle.crt"
    tar -C "$root" -c . | docker import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$TEST_BASE_IMAGE" >/dev/null
fi

# The Dockerfile down to its last dependency layer (everything above the first COPY of our code), built here on the
# test base, so that the suite's image builds (test.sh, export.sh) find those layers in the engine's cache, as a
# developer's second build does. Their instructions and requirements.txt are the Dockerfile's own: an edit to
# either is a cache miss, never a stale layer.
deps=$(mktemp -d)
sed '/^COPY contracts.py/,$d' "$REPO/Dockerfile" >"$deps/Dockerfile"
cp "$REPO/requirements.txt" "$deps/"
docker build --quiet --build-arg "BASE_IMAGE=$TEST_BASE_IMAGE" --tag "$TEST_BASE_IMAGE-deps" "$deps" >/dev/null
rm -rf "$deps"
echo "engine.sh: dockerd up, base image $TEST_BASE_IMAGE and the image's dependency layers ready"
