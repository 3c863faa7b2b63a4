#!/usr/bin/env bash
# The README's test command on a newer Python and JAX than this machine kind has.
#
# JAX 0.11 needs Python >= 3.12; this machine kind has Python 3.11 only (Debian bookworm),
# and the lent GPU machines run JAX 0.11 on Python 3.12. So this builds a Debian trixie root
# (Python 3.13) with debootstrap, installs the project there with the newest JAX that
# setup.cfg allows, and runs the README's pytest command inside it. Not part of .ci/run:
# it downloads ~6 GB (PyPI's torch for Python 3.13 is a CUDA build), and its test run took 13-14 min
# on the 2-core machine (15 min in all with the root and pip cache already there).
#
#   sudo .ci/newer_jax.sh [ROOT]          # ROOT: where the trixie root goes (default
#                                         # /tmp/gfn-jax-trixie; reused when it exists)
#   JAX_SPEC="jax==0.11.*" PYTEST_ARGS="tests/test_train.py" sudo -E .ci/newer_jax.sh
#
# Needs root (debootstrap, chroot, mounts), Debian's and PyPI's registries, and the shared
# data beside the repository (../shared), which is bound read-only into the root.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ROOT=${1:-/tmp/gfn-jax-trixie}
JAX_SPEC=${JAX_SPEC:-"jax==0.11.*"}
PYTEST_ARGS=${PYTEST_ARGS:-"-n 2 --dist loadfile"}
SUITE=${SUITE:-trixie}
[ "$(id -u)" = 0 ] || { echo "newer_jax.sh: needs root (debootstrap, chroot, mount)" >&2; exit 2; }

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,gcc,git,ca-certificates \
        "$SUITE" "$ROOT" http://deb.debian.org/debian
fi
# the host's resolver, hosts file (gloo resolves this host's name for jax.distributed) and
# CA bundle (a proxy's certificate may be in it), not its pip config
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/hosts "$ROOT/etc/hosts"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$ROOT/work/shared"
cleanup() {
    for m in "$ROOT/work/shared" "$ROOT/dev" "$ROOT/proc"; do
        mountpoint -q "$m" && umount "$m" || true
    done
}
trap cleanup EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
if [ -d "$REPO/../shared" ]; then
    mountpoint -q "$ROOT/work/shared" || mount --bind -o ro "$REPO/../shared" "$ROOT/work/shared"
fi
# a clean clone of this repository's HEAD (what CI tests), plus uncommitted changes
rm -rf "$ROOT/work/main"
git clone -q "$REPO" "$ROOT/work/main"
git -C "$REPO" diff HEAD | (cd "$ROOT/work/main" && git apply --allow-empty)
chroot "$ROOT" env -i HOME=/root PATH=/usr/bin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    bash -c "set -euo pipefail
        cd /work
        [ -x venv/bin/python ] || python3 -m venv venv
        cd main
        ../venv/bin/python -m pip install -q '$JAX_SPEC' torch==2.13.0 -e '.[test,data]'
        ../venv/bin/python -c 'import sys, jax, flax, optax; print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__)'
        ../venv/bin/python -m pytest -q $PYTEST_ARGS"
