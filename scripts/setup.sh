#!/bin/sh
# Idempotent machine + project setup for shiftfs (run as root on Debian 12).
# A second run is fast and changes nothing.
set -eu
cd "$(dirname "$0")/.."

PKGS="fuse3 libfuse3-dev pkg-config gcc patch python3-venv python3-dev attr acl uidmap libcap2-bin util-linux bindfs fuse-overlayfs fio stress-ng dbench mmdebstrap cpio libarchive-tools zstd xz-utils python3-seccomp podman runc systemd-container"
[ "${SHIFTFS_SETUP_EXTRA:-}" ] && PKGS="$PKGS $SHIFTFS_SETUP_EXTRA"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages:$missing; run 'make setup' as root or 'apt-get install$missing'" >&2
        exit 1
    fi
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# mkosi (tests/test_mkosi.py, the README's mkosi recipe): Debian 12's mkosi 14 cannot build in a
# user namespace; bookworm-backports has 24.3 (it pulls systemd 254 from there too). The backports
# source is added if no apt source names it; without it (or offline) the mkosi test skips, saying so.
if [ "$(id -u)" = 0 ] && [ -z "${SHIFTFS_SETUP_NO_MKOSI:-}" ] \
    && ! dpkg-query -W -f='${Version}' mkosi 2>/dev/null | grep -q '^2[4-9]'; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "setup: adding the bookworm-backports apt source (for mkosi 24)"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            > /etc/apt/sources.list.d/bookworm-backports.sources
        apt-get update -qq || true
    fi
    echo "setup: installing mkosi from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports mkosi >/dev/null \
        || echo "setup: warning: mkosi from bookworm-backports could not be installed; tests/test_mkosi.py will skip" >&2
fi

# /dev/fuse: distributions ship it 0666 through udev rules; this machine has no udev.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ] && [ "$(id -u)" = 0 ]; then
    echo "setup: making /dev/fuse mode 0666, as udev does on distributions (it was $(stat -c %a /dev/fuse))"
    chmod 0666 /dev/fuse
fi
# Let unprivileged mounters ask for allow_other (needed by 'shiftfs run' for users).
if [ -f /etc/fuse.conf ] && ! grep -q '^user_allow_other' /etc/fuse.conf && [ "$(id -u)" = 0 ]; then
    echo "setup: enabling user_allow_other in /etc/fuse.conf"
    echo user_allow_other >> /etc/fuse.conf
fi

# The venv uses Debian's /usr/bin/python3 so every user can run it (not a pyenv under /root).
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    $PY -m venv .venv
fi
# SHIFTFS_CACHE_DIR (CI sets it to an empty directory) also moves pip's cache, so a
# run with it set downloads and builds everything as a fresh machine does.
if [ -n "${SHIFTFS_CACHE_DIR:-}" ]; then
    export PIP_CACHE_DIR="$SHIFTFS_CACHE_DIR/pip"
fi
# pyfuse3 is built from its released sdist with shiftfs' patch series (patches/pyfuse3/,
# docs/pyfuse3-patches.md) before shiftfs is installed, so pip keeps that build.
./scripts/pyfuse3.sh
stamp=.venv/.shiftfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing shiftfs and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test,bench,lint]'
    touch "$stamp"
fi
# libseccomp's Python binding (shiftfs run/exec in a single-id namespace trap chown and mknod
# with it) comes from Debian's python3-seccomp; the venv gets that one module, not all of
# dist-packages. The link is remade if the venv or the package moved.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
for so in /usr/lib/python3/dist-packages/seccomp.cpython-*.so; do
    [ -e "$so" ] || continue
    if [ "$(readlink "$site/${so##*/}" 2>/dev/null)" != "$so" ]; then
        echo "setup: linking libseccomp's Python binding into .venv ($so)"
        ln -sfn "$so" "$site/${so##*/}"
    fi
done
# Make the checkout and venv reachable for other users (tests run commands as them).
chmod -R a+rX .venv shiftfs 2>/dev/null || true
# mount(8) -t fuse.shiftfs runs mount.fuse3, which runs `shiftfs` from PATH.
if [ "$(id -u)" = 0 ]; then
    target="$(pwd)/.venv/bin/shiftfs"
    if [ "$(readlink /usr/local/bin/shiftfs 2>/dev/null)" != "$target" ]; then
        echo "setup: linking /usr/local/bin/shiftfs -> $target (for mount -t fuse.shiftfs and fstab)"
        ln -sfn "$target" /usr/local/bin/shiftfs
    fi
fi
# Unprivileged users (shiftfs run/exec) need to reach the venv and the package.
d=$(pwd -P)
while [ "$d" != / ]; do
    # the last mode letter is x, or t for a sticky directory that others may search (/tmp)
    case "$(stat -c %A "$d" | cut -c10)" in x|t) ;; *)
        echo "setup: warning: $d (mode $(stat -c %a "$d")) is not searchable by other users, so they cannot run shiftfs from this checkout; move it (e.g. to /opt/shiftfs) or 'chmod o+x $d'" >&2
        break ;;
    esac
    d=$(dirname "$d")
done
