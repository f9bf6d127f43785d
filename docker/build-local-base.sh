#!/bin/sh
# Make a minimal local Debian base image for machines that cannot pull from an image registry
# (CI, air-gapped hosts). The Dockerfile installs python3 with apt when its base has none, so
#
#   podman --runtime runc build --build-arg BASE_IMAGE=localhost/debian-min:bookworm ...
#
# works where `FROM python:3.11-slim` cannot be pulled.
#
# Usage: docker/build-local-base.sh [IMAGE [SUITE [MIRROR]]]
#   IMAGE   defaults to localhost/debian-min:bookworm
#   SUITE   defaults to bookworm
#   MIRROR  defaults to the first Debian mirror found in /etc/apt/sources.list*, else deb.debian.org
# Needs root, debootstrap and podman (.ci/install-podman.sh installs both). Takes about 30 s.
set -eu

IMAGE=${1:-localhost/debian-min:bookworm}
SUITE=${2:-bookworm}
MIRROR=${3:-}
PODMAN=${PODMAN:-podman --runtime runc}

if $PODMAN image exists "$IMAGE"; then
    echo "build-local-base: $IMAGE already exists"
    exit 0
fi

if [ -z "$MIRROR" ]; then
    # One-line format ("deb http://... bookworm main") and deb822 format ("URIs: http://...").
    # Skip security and third-party repositories: debootstrap needs the main archive.
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        sed -n -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(https\?:[^[:space:]]*\).*/\2/p' \
               -e 's/^URIs:[[:space:]]*\(https\?:[^[:space:]]*\).*/\1/p' |
        grep -E '/debian/?$' | grep -v -- '-security' | head -n 1)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

ROOTFS=$(mktemp -d /tmp/debian-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "build-local-base: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"
# Keep the image small: apt lists and caches are fetched again by whoever installs packages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | $PODMAN import - "$IMAGE"
echo "build-local-base: imported $IMAGE"
