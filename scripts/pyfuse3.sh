#!/bin/sh
# Build pyfuse3 with shiftfs' patch series into .venv (called by scripts/setup.sh).
#
# pyfuse3 PYFUSE3_VERSION's released sdist is fetched from PyPI with pip, checked against
# its pinned sha256, unpacked under build/, patched with patches/pyfuse3/*.patch (in
# order) and installed with pip. The patches change the Cython source, so the C file
# the sdist ships is removed and pip's build environment regenerates it (pip fetches
# Cython, setuptools and setuptools_scm from PyPI as pyfuse3's build dependencies).
# The installed version is PYFUSE3_VERSION+shiftfs.N (N = number of patches).
# A stamp in .venv records the sdist and patch hashes: a second run does nothing
# unless a patch changed. Details: docs/pyfuse3-patches.md.
set -eu
cd "$(dirname "$0")/.."

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCHES=patches/pyfuse3
PIP=.venv/bin/pip

n=0
for p in "$PATCHES"/*.patch; do n=$((n + 1)); done
want=$( (echo "$PYFUSE3_VERSION $PYFUSE3_SHA256"; cat "$PATCHES"/*.patch) | sha256sum | cut -d' ' -f1)
stamp=.venv/.shiftfs-pyfuse3
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3, "ConnectionInfo"))' 2>/dev/null; then
    exit 0
fi

echo "setup: building pyfuse3 $PYFUSE3_VERSION with shiftfs' $n patches ($PATCHES)"
work=build/pyfuse3
rm -rf "$work"
mkdir -p "$work"
sdist="$work/pyfuse3-$PYFUSE3_VERSION.tar.gz"
if ! $PIP download -q --no-deps --no-binary pyfuse3 -d "$work" "pyfuse3==$PYFUSE3_VERSION" >"$work/download.log" 2>&1 \
    || [ ! -f "$sdist" ]; then
    cat "$work/download.log" >&2
    echo "setup: could not download pyfuse3 $PYFUSE3_VERSION's sdist from PyPI (see above); check the network or pip's index" >&2
    exit 1
fi
got=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$got" != "$PYFUSE3_SHA256" ]; then
    echo "setup: $sdist has sha256 $got, not the pinned $PYFUSE3_SHA256; delete it and run 'make setup' again" >&2
    exit 1
fi
tar -xzf "$sdist" -C "$work"
src="$work/pyfuse3-$PYFUSE3_VERSION"
for p in "$PATCHES"/*.patch; do
    if ! patch -d "$src" -p1 --batch --quiet <"$p"; then
        echo "setup: $p does not apply to pyfuse3 $PYFUSE3_VERSION; fix the patch (docs/pyfuse3-patches.md says how to rebuild the series)" >&2
        exit 1
    fi
done
# the shipped C file is generated from the unpatched .pyx: make the build regenerate it
rm -f "$src/src/pyfuse3/__init__.c"
SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_VERSION+shiftfs.$n" $PIP install -q --force-reinstall --no-deps "./$src"
$PIP install -q "trio>=0.15"
echo "$want" >"$stamp"
