"""Fast unit tests: no mount, no root, no subprocess (``pytest -m "not mount"``)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import types

import pytest
from records import RECORD

from shiftfs.errors import UsageError
from shiftfs.fs.options import parse_options
from shiftfs.offline.export import export_tree
from shiftfs.offline.members import mtime_ns, ns_to_pax, pax_to_ns, xattrs_of
from shiftfs.offline.walk import walk
from shiftfs.ownership import acl
from shiftfs.ownership.idmap import IdMap, IdMapError, Range, parse_map_args
from shiftfs.ownership.names import (
    ESCAPE_PREFIX,
    RESERVED_PREFIX,
    STORE_DIR,
    backing_name,
    is_temp_name,
    temp_name,
    view_name,
)
from shiftfs.ownership.record import Record, decode, encode, type_fits
from shiftfs.ownership.trust import backing_perm
from shiftfs.ownership.view import View, ViewRule

# -- record codec ------------------------------------------------------------------


def test_record_round_trip_device_and_pipe():
    dev = Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert decode(encode(dev)) == dev
    pipe = decode(b"0:0:0644:pipe", stat.S_IFREG)
    assert pipe.type == stat.S_IFIFO and stat.S_IMODE(pipe.mode) == 0o644


# -- id maps -----------------------------------------------------------------------


def test_idmap_translates_both_ways_and_overflows():
    m = IdMap([Range(100000, 0, 65536)], overflow=65534)
    assert m.to_view(100000) == 0 and m.to_disk(0) == 100000
    assert m.to_view(5) == 65534 and m.to_disk(70000) is None


def test_parse_map_args_rejects_overlap():
    with pytest.raises(IdMapError, match="overlap"):
        parse_map_args(["u:0:0:10", "u:5:100:10"])


# -- mount options -----------------------------------------------------------------


def test_options_parse_and_refuse():
    cfg = parse_options(["xattr,cache=never,default_owner=0:0"], ["b:100000:0:65536"], False, "s", "m")
    assert cfg.xattr and cfg.cache == "never" and cfg.default_owner == (0, 0)
    assert cfg.writeback is False  # cache=never turns the writeback cache off
    assert cfg.uids.to_disk(0) == 100000
    with pytest.raises(UsageError, match="unknown -o option"):
        parse_options(["bogus"], [], False, "s", "m")
    assert parse_options([], ["b:0:0:1"], False, "s", "m").spin_us == 100
    assert parse_options(["spin=0"], ["b:0:0:1"], False, "s", "m").spin_us == 0
    with pytest.raises(UsageError, match="bad -o spin=-5: give microseconds"):
        parse_options(["spin=-5"], [], False, "s", "m")
    assert parse_options([], ["b:0:0:1"], False, "s", "m").closer is False
    assert parse_options(["closer=on"], ["b:0:0:1"], False, "s", "m").closer is True


# -- the view rule -----------------------------------------------------------------


@pytest.mark.parametrize("view_type", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK])
def test_regular_file_stands_in_for_special_files(view_type):
    assert type_fits(view_type, stat.S_IFREG)
    assert not type_fits(view_type, stat.S_IFDIR)
    assert not type_fits(stat.S_IFREG, stat.S_IFLNK)


def test_record_view_is_a_named_view():
    st = types.SimpleNamespace(st_mode=stat.S_IFREG | 0o600)
    ident = IdMap()
    v = ViewRule(ident, ident, 0).recorded(Record(1, 2, stat.S_IFIFO | 0o644), st)
    assert isinstance(v, View) and v.placeholder and v.has_record
    assert (v.mode, v.uid, v.gid, v.rdev) == (stat.S_IFIFO | 0o644, 1, 2, 0)


def test_backing_perm_never_special():
    assert backing_perm(stat.S_IFREG | 0o4755) == 0o755
    assert backing_perm(stat.S_IFDIR | 0o1000) == 0o700
    assert backing_perm(stat.S_IFIFO | 0o644) == 0o644


# -- the name codec ----------------------------------------------------------------


def test_names_escape_and_hide():
    assert backing_name(b"a", True) == b"a"
    assert view_name(backing_name(RESERVED_PREFIX + b"x", False), False) == RESERVED_PREFIX + b"x"
    assert view_name(backing_name(STORE_DIR.encode(), True), True) == STORE_DIR.encode()
    assert view_name(STORE_DIR.encode(), True) is None
    t = temp_name()
    assert is_temp_name(t) and view_name(t, False) is None
    assert not is_temp_name(ESCAPE_PREFIX + b"x")


# -- ACLs --------------------------------------------------------------------------


def test_acl_text_round_trip_and_id_map():
    raw = acl.from_text("user::rw-\nuser:1000:r--\ngroup::r--\nmask::r--\nother::---\n")
    assert acl.to_text(raw).splitlines()[1] == "user:1000:r--"
    mapped = acl.map_ids(raw, lambda i: i + 1, lambda i: i)
    assert "user:1001:r--" in acl.to_text(mapped)
    with pytest.raises(acl.UnmappedAclId):
        acl.map_ids(raw, lambda i: None, lambda i: i)


# -- archive members ---------------------------------------------------------------


def test_pax_times_round_trip():
    for ns in (0, 1_500_000_000_123456789, -1_000_000_001):
        assert pax_to_ns(ns_to_pax(ns)) == ns
    ti = tarfile.TarInfo("x")
    ti.mtime = 5
    ti.pax_headers["mtime"] = "5.25"
    assert mtime_ns(ti) == 5_250_000_000


def test_xattrs_of_reads_the_three_spellings():
    ti = tarfile.TarInfo("x")
    ti.pax_headers = {"SCHILY.xattr.user.a": "1", "LIBARCHIVE.xattr.user.b": "Mg", "RHT.security.selinux": "l"}
    assert xattrs_of(ti) == {"user.a": b"1", "user.b": b"2", "security.selinux": b"l\0"}


# -- one view rule: offline export accepts what the mount shows ------------------------


def test_pipe_record_on_regular_file_exports_as_fifo(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "fifo").write_bytes(b"")
    os.setxattr(root / "fifo", RECORD, b"0:0:0644:pipe")
    out = io.BytesIO()
    assert export_tree(str(root), out) == []
    out.seek(0)
    with tarfile.open(fileobj=out) as tf:
        member = tf.getmember("./fifo")
    assert member.isfifo() and member.mode == 0o644


def test_walk_hides_temporaries_and_reports_them(tmp_path):
    (tmp_path / os.fsdecode(temp_name("7"))).write_bytes(b"")
    (tmp_path / "kept").write_bytes(b"")
    seen = []
    names = [
        e.rel
        for e in walk(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), None, lambda dirfd, name: seen.append(name))
    ]
    assert names == ["", "kept"] and seen == [os.fsdecode(temp_name("7"))]


def test_namespace_maps_use_the_one_range_type():
    """A user namespace's map line INSIDE OUTSIDE COUNT is a Range(disk=OUTSIDE, view=INSIDE)."""
    from shiftfs.container import userns
    from shiftfs.ownership.idmap import Range

    m = userns.NamespaceMaps("full", userns._block_map(1000, 524288), userns._subid_map(1000, [(100000, 65536)]))
    assert m.uid_map == (Range(1000, 0, 1), Range(524289, 1, 65535))
    assert m.gid_map == (Range(1000, 0, 1), Range(100000, 1, 65536))
    assert m.maps_uid(0) and m.maps_uid(65535) and not m.maps_uid(65536)
    assert m.describe() == "uid 0->1000, 1-65535->524289; gid 0->1000, 1-65536->100000"


def test_acl_check_valid_mirrors_the_kernel():
    U, UO, G, GO, M, OT = acl.USER, acl.USER_OBJ, acl.GROUP, acl.GROUP_OBJ, acl.MASK, acl.OTHER
    base = [(UO, 6, 0xFFFFFFFF), (GO, 4, 0xFFFFFFFF), (OT, 4, 0xFFFFFFFF)]
    acl.check_valid(base)
    acl.check_valid(acl.parse(acl.pack([*base, (G, 5, 4), (M, 5, 0xFFFFFFFF)])))
    assert acl.named_ids([*base, (U, 7, 5), (G, 5, 4)]) == ({5}, {4})
    bad = [
        [*base, (G, 5, 4)],  # named entry without a mask
        [(UO, 6, 0), (GO, 4, 0)],  # no other entry
        [*base[:2], (G, 5, 4), (G, 4, 4), (M, 5, 0), base[2]],  # an id named twice
        [(GO, 4, 0), (UO, 6, 0), (OT, 4, 0)],  # out of order
        [(UO, 0o17, 0), (GO, 4, 0), (OT, 4, 0)],  # permission beyond rwx
        [(UO, 6, 0), (0x40, 4, 0), (GO, 4, 0), (OT, 4, 0)],  # unknown tag
    ]
    for entries in bad:
        with pytest.raises(acl.AclError):
            acl.check_valid(entries)


def test_closer_closes_only_the_descriptors_it_was_handed():
    """shiftfs.fs.closer: a handed-over descriptor is closed once; a new descriptor that takes
    its number afterwards is never touched by the worker."""
    from shiftfs.fs.closer import Closer

    closer = Closer()
    r, w = os.pipe()
    closer.close(r)
    closer.drain()
    with pytest.raises(OSError):
        os.fstat(r)
    r2, w2 = os.pipe()  # the lowest free numbers: r's number again
    assert r2 == r
    for _ in range(50):
        a, b = os.pipe()
        closer.close(a)
        closer.close(b)
    closer.drain()
    os.write(w2, b"still open")
    assert os.read(r2, 64) == b"still open"
    assert closer.handed == closer.closed == 101
    for fd in (w, r2, w2):
        os.close(fd)


def test_forget_hands_removed_inodes_to_the_closer_within_bounds(tmp_path):
    """With ``-o closer=on`` a removed inode's descriptor goes to the closer; with MAX_PENDING already queued (a worker
    that fell behind) the loop closes it itself, so queued descriptors never eat the fd budget."""
    from shiftfs.fs.closer import MAX_PENDING
    from shiftfs.fs.inodes import InodeTable

    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    table = InodeTable(os.open(tmp_path, os.O_PATH | os.O_CLOEXEC))
    table.defer_closes = True  # -o closer=on
    fds = []
    for name, queued in ((b"a", 0), (b"b", MAX_PENDING)):
        node, _ = table.child(table.root, name)
        table.count_lookup(node)
        held = table.open_before_unlink(node.key, table.root, name)
        os.unlink(tmp_path / os.fsdecode(name))
        table.name_removed(held)
        table.closer.handed = table.closer.closed + queued
        before = table.closer.handed
        fd = node._fd
        table.forget(node.id, 1)
        fds.append((fd, table.closer.handed - before))
    (fd_a, handed_a), (fd_b, handed_b) = fds
    assert handed_a == 1 and handed_b == 0
    with pytest.raises(OSError):
        os.fstat(fd_b)  # closed on the loop, at once
    table.close()  # drains the closer
    with pytest.raises(OSError):
        os.fstat(fd_a)
