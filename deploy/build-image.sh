#!/bin/sh
# Build the pyproxy image with podman from deploy/Dockerfile, on a base made by debootstrap (no
# registry needed). The Debian root is cached in deploy/.cache; the image is tagged with a hash
# of everything that goes into it, so an unchanged tree is not rebuilt.
#   deploy/build-image.sh            -> prints the image reference (pyproxy:build-<hash>)
# Environment: PYPROXY_IMAGE_TAG (also tag it so, default pyproxy:0.1.0), DEBIAN_MIRROR.
set -eu
cd "$(dirname "$0")/.."
CACHE=deploy/.cache
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/pyproxy-base:$SUITE
TAG=${PYPROXY_IMAGE_TAG:-pyproxy:0.1.0}
# podman here: runc (crun refuses hybrid cgroups), ulimits under the host's hard limits.
PODMAN_OPTS="--runtime runc"
LIMITS="--ulimit nofile=16384:16384 --ulimit nproc=8192:8192"

log() { echo "build-image: $*" >&2; }

if ! podman image exists "$BASE"; then
    if [ ! -d "$CACHE/$SUITE-rootfs" ]; then
        log "debootstrap $SUITE (minbase) into $CACHE/$SUITE-rootfs"
        rm -rf "$CACHE/$SUITE-rootfs.tmp"
        mkdir -p "$CACHE"
        debootstrap --variant=minbase "$SUITE" "$CACHE/$SUITE-rootfs.tmp" "$MIRROR" >&2
        mv "$CACHE/$SUITE-rootfs.tmp" "$CACHE/$SUITE-rootfs"
    fi
    log "importing $BASE"
    # Trimmed as Debian's slim images are: no docs, manuals, translations or apt lists.
    tar -C "$CACHE/$SUITE-rootfs" --numeric-owner \
        --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/info \
        --exclude=./usr/share/locale --exclude='./var/lib/apt/lists/*' \
        --exclude='./var/cache/apt/*' -c . \
        | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >&2
fi

# Content hash: the base, the Dockerfile and every source file it copies, as they are now.
HASH=$( {
    podman image inspect --format '{{.Id}}' "$BASE"
    git ls-files -z --cached --others --exclude-standard -- \
        deploy/Dockerfile pyproject.toml setup.py README.md pyproxy filters native iptables bench \
        | sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)
IMAGE=localhost/pyproxy:build-$HASH
# The host's CA bundle, for pip behind a TLS-inspecting proxy.
TRUST=""
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then
    TRUST="--volume $HOST_CA:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt"
fi
if ! podman image exists "$IMAGE"; then
    log "building $IMAGE"
    # shellcheck disable=SC2086
    podman $PODMAN_OPTS build $LIMITS $TRUST --build-arg BASE="$BASE" \
        -f deploy/Dockerfile -t "$IMAGE" . >&2
    # Only this script's own leftovers: older builds and both stages' intermediate layers.
    podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/pyproxy:build-' \
        | grep -vx "$IMAGE" | xargs -r podman rmi >&2 || true
    podman image prune --force --filter label=io.pyproxy.build=pyproxy >&2 || true
fi
podman tag "$IMAGE" "$TAG"
echo "$IMAGE"
