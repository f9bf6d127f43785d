#!/bin/sh
# Install what tests/container needs: podman (builds and runs the image without a Docker engine),
# runc (crun, podman's default runtime, fails on CI machines: setrlimit and cgroups "hybrid mode")
# and debootstrap (makes the local Debian base image, since no image registry can be reached).
#
# Idempotent. Never fails the CI: when something cannot be installed it says why and exits 0;
# tests/container then skips with a reason of its own.
set -u

log() { echo "install-podman: $*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        log "not root and no sudo; cannot install anything"
        exit 0
    fi
fi

missing=""
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done

if [ -n "$missing" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing:$missing, and apt-get is not available; the container test will skip"
        exit 0
    fi
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get update -q; then
        log "apt-get update failed; the container test will skip"
        exit 0
    fi
    # shellcheck disable=SC2086  # word splitting of $missing is intended
    if ! $SUDO apt-get install -y -q --no-install-recommends $missing uidmap slirp4netns fuse-overlayfs; then
        # The extras are nice to have; retry with only what is essential.
        # shellcheck disable=SC2086
        if ! $SUDO apt-get install -y -q $missing; then
            log "apt-get install$missing failed; the container test will skip"
            exit 0
        fi
    fi
else
    log "podman, runc and debootstrap already installed"
fi

# crun's setrlimit failure also hits runc when podman passes its default ulimits; an empty list avoids it.
CONF=/etc/containers/containers.conf
if [ -f "$CONF" ] && grep -q '^[[:space:]]*default_ulimits[[:space:]]*=[[:space:]]*\[\]' "$CONF"; then
    log "$CONF already has default_ulimits = []"
elif [ -f "$CONF" ] && grep -q '^[[:space:]]*default_ulimits' "$CONF"; then
    log "$CONF sets default_ulimits already; leaving it alone"
else
    $SUDO mkdir -p /etc/containers
    if [ -f "$CONF" ] && grep -q '^\[containers\]' "$CONF"; then
        # Add the key right under the existing [containers] table.
        $SUDO sed -i '/^\[containers\]/a default_ulimits = []' "$CONF" && log "added default_ulimits = [] to $CONF"
    else
        printf '[containers]\ndefault_ulimits = []\n' | $SUDO tee -a "$CONF" >/dev/null && log "wrote $CONF"
    fi
fi

for tool in podman runc debootstrap; do
    if command -v "$tool" >/dev/null 2>&1; then
        log "$tool: $(command -v "$tool")"
    else
        log "$tool: still missing"
    fi
done
exit 0
