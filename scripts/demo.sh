#!/bin/sh
# `make demo`: mount a small sample tree with an id map and show the same
# files from the disk side and the view side, then the same in xattr mode.
set -eu
cd "$(dirname "$0")/.."
SHIFTFS="$(pwd)/.venv/bin/shiftfs"
work=$(mktemp -d /tmp/shiftfs-demo.XXXXXX)
cleanup() {
    for m in "$work/view" "$work/xview"; do
        mountpoint -q "$m" 2>/dev/null && { "$SHIFTFS" umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
src="$work/disk"; view="$work/view"
mkdir -p "$src/etc" "$src/home/alice" "$src/usr/bin" "$view"
echo "root:x:0:0::/root:/bin/sh" > "$src/etc/passwd"
echo "hello from alice" > "$src/home/alice/notes.txt"
printf '#!/bin/sh\necho hi\n' > "$src/usr/bin/tool"
ln -s ../usr/bin/tool "$src/etc/tool-link"
# On disk the tree is shifted by 100000, as a container runtime stores it.
chown -R 100000:100000 "$src"
chown -R 101000:101000 "$src/home/alice"
chmod 4755 "$src/usr/bin/tool"
echo "== the map: disk ids 100000..165535 are view ids 0..65535 (--map b:100000:0:65536)"
echo "== disk side (SOURCE), ls -lnR:"
(cd "$src" && ls -lnR .)
"$SHIFTFS" mount --map b:100000:0:65536 "$src" "$view"
echo
echo "== view side (mounted with: shiftfs mount --map b:100000:0:65536 SOURCE MOUNTPOINT), ls -lnR:"
(cd "$view" && ls -lnR .)
echo
echo "== creating a file as view root (uid 0) and chown 1000 through the view:"
echo new > "$view/home/alice/from-view"
chown 1000:1000 "$view/home/alice/from-view"
printf '   view: '; stat -c '%U:%G (%u:%g) %n' "$view/home/alice/from-view"
printf '   disk: '; stat -c '%u:%g %n' "$src/home/alice/from-view"
echo "== chown to a view id outside the map fails like an idmapped mount:"
chown 70000 "$view/etc/passwd" 2>&1 | sed 's/^/   /' || true
"$SHIFTFS" umount "$view"

echo
echo "== xattr mode: the backing tree stays owned by one user; ownership lives in user.containers.override_stat"
xsrc="$work/xdisk"; xview="$work/xview"
mkdir -p "$xsrc" "$xview"
as_user=""
if [ "$(id -u)" = 0 ]; then
    # Run the xattr-mode daemon as an unprivileged user, as a rootless user would.
    chown 65534:65534 "$xsrc" "$xview"; chmod 755 "$work"
    as_user="setpriv --reuid 65534 --regid 65534 --clear-groups"
    echo "   (daemon runs as uid 65534 with -o allow_other; we write through the view as root)"
fi
$as_user "$SHIFTFS" mount --xattr -o allow_other "$xsrc" "$xview"
mkdir -p "$xview/home/bob"
echo data > "$xview/home/bob/file"
chown -R 1000:1000 "$xview/home/bob"
cp "$view/../disk/usr/bin/tool" "$xview/tool" 2>/dev/null || printf '#!/bin/sh\n' > "$xview/tool"
chmod 4755 "$xview/tool"
echo "   view:"; (cd "$xview" && ls -lnR . | sed 's/^/     /')
echo "   disk (owner stays the daemon's user $(stat -c %u "$xsrc"); no setuid bit on disk):"; (cd "$xsrc" && ls -lnR --ignore=.shiftfs . | sed 's/^/     /')
echo "   records:"; (cd "$xsrc" && getfattr -R -n user.containers.override_stat --absolute-names home tool 2>/dev/null | grep -v '^$' | sed 's/^/     /')
$as_user "$SHIFTFS" umount "$xview"
echo
echo "demo done (sample tree in $work, removed on exit)"
