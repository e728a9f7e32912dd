"""Tests for the record codec and the xattr name escaping."""

import os
import stat

import pytest

from shiftfs.ownership.names import escape_xattr_name, unescape_xattr_name
from shiftfs.ownership.record import (
    LEGACY_RECORD_NAME,
    MAX_ID,
    RECORD_NAME,
    Record,
    RecordError,
    decode,
    encode,
)

REG = stat.S_IFREG
DIR = stat.S_IFDIR


# -- what the peers write ----------------------------------------------------

PEER_VALUES = [
    # fuse-overlayfs in C: the whole st_mode
    (b"0:0:100644", REG, Record(0, 0, REG | 0o644)),
    (b"7:8:40755", DIR, Record(7, 8, DIR | 0o755)),
    (b"0:0:104755", REG, Record(0, 0, REG | 0o4755)),
    (b"0:0:41777", DIR, Record(0, 0, DIR | 0o1777)),
    # fuse-overlayfs Rust rewrite: permission bits only, type from backing
    (b"1000:1000:755", REG, Record(1000, 1000, REG | 0o755)),
    (b"1000:1000:755", DIR, Record(1000, 1000, DIR | 0o755)),
    (b"0:0:0", REG, Record(0, 0, REG)),
    # containers/storage before 2024-12: "0%o"
    (b"0:0:0755", DIR, Record(0, 0, DIR | 0o755)),
    (b"0:0:00", REG, Record(0, 0, REG)),
    (b"0:0:040755", DIR, Record(0, 0, DIR | 0o755)),
    # containers/storage since 2024-12: "%04o:type"
    (b"0:0:0644:file", REG, Record(0, 0, REG | 0o644)),
    (b"0:0:0755:dir", DIR, Record(0, 0, DIR | 0o755)),
    (b"0:0:4755:file", REG, Record(0, 0, REG | 0o4755)),
    (b"0:0:0777:symlink", REG, Record(0, 0, stat.S_IFLNK | 0o777)),
    (b"0:0:0644:pipe", REG, Record(0, 0, stat.S_IFIFO | 0o644)),
    (b"0:0:0755:socket", REG, Record(0, 0, stat.S_IFSOCK | 0o755)),
    (b"0:0:0666:char-1-3", REG, Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
    (b"0:6:0660:block-8-0", REG, Record(0, 6, stat.S_IFBLK | 0o660, os.makedev(8, 0))),
    (b"0:5:0620:char-136-4095", REG, Record(0, 5, stat.S_IFCHR | 0o620, os.makedev(136, 4095))),
    # spellings the fuse-overlayfs readers accept
    (b"0:0:666:char1-3", REG, Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
    (b"0:6:666:char1:3", REG, Record(0, 6, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
    (b"0:0:660:block8:0", REG, Record(0, 0, stat.S_IFBLK | 0o660, os.makedev(8, 0))),
    # a type field that agrees with type bits
    (b"0:0:20666:char-1-3", REG, Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
    # a C writer that stored the terminating NUL
    (b"0:0:100644\0", REG, Record(0, 0, REG | 0o644)),
    # large ids
    (f"{MAX_ID}:{MAX_ID}:644".encode(), REG, Record(MAX_ID, MAX_ID, REG | 0o644)),
    (b"2147352576:2147352576:40755", DIR, Record(2147352576, 2147352576, DIR | 0o755)),
]


@pytest.mark.parametrize("value,backing,expected", PEER_VALUES)
def test_decode_peer_values(value, backing, expected):
    assert decode(value, backing) == expected
    # and what we write for it decodes to the same thing
    assert decode(encode(expected), backing) == expected


def test_type_bits_win_over_fallback():
    assert decode(b"0:0:40755", REG) == Record(0, 0, DIR | 0o755)
    assert decode(b"0:0:0755:dir", REG).mode == DIR | 0o755


def test_decode_str_accepted():
    assert decode("1:2:100600") == Record(1, 2, REG | 0o600)


def test_decode_without_type_needs_fallback():
    with pytest.raises(RecordError, match="names no file type"):
        decode(b"0:0:644")
    assert decode(b"0:0:644", REG | 0o777).mode == REG | 0o644


# -- what we write -----------------------------------------------------------


@pytest.mark.parametrize(
    "rec,value",
    [
        (Record(0, 0, REG | 0o644), b"0:0:100644"),
        (Record(7, 8, DIR | 0o755), b"7:8:40755"),
        (Record(0, 0, REG | 0o4755), b"0:0:104755"),
        (Record(0, 0, DIR | 0o1777), b"0:0:41777"),
        (Record(0, 0, stat.S_IFLNK | 0o777), b"0:0:120777"),
        (Record(0, 0, stat.S_IFIFO | 0o600), b"0:0:10600"),
        (Record(0, 0, stat.S_IFSOCK | 0o755), b"0:0:140755"),
        (Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)), b"0:0:0666:char-1-3"),
        (Record(0, 6, stat.S_IFBLK | 0o660, os.makedev(8, 1)), b"0:6:0660:block-8-1"),
        (Record(0, 0, stat.S_IFCHR | 0o600, os.makedev(4095, 1048575)), b"0:0:0600:char-4095-1048575"),
        (Record(MAX_ID, 0, REG), f"{MAX_ID}:0:100000".encode()),
    ],
)
def test_encode_exact(rec, value):
    assert encode(rec) == value
    assert decode(value) == rec
    # whatever the backing type, a record we wrote decodes the same
    assert decode(value, stat.S_IFREG) == rec


def test_encode_round_trip_many():
    for ftype in (REG, DIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK):
        for perm in (0, 0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777):
            for ids in ((0, 0), (1, 65534), (100000, 100000), (MAX_ID, 3)):
                rec = Record(ids[0], ids[1], ftype | perm)
                assert decode(encode(rec)) == rec
    for ftype in (stat.S_IFCHR, stat.S_IFBLK):
        for dev in ((0, 0), (1, 3), (8, 17), (259, 65536)):
            rec = Record(0, 6, ftype | 0o660, os.makedev(*dev))
            assert decode(encode(rec), REG) == rec


def test_fuse_overlayfs_110_reads_device_as_regular_file():
    # 1.10 parses "%d:%d:%o" and ORs in the backing type; the device form must
    # leave the type bits out of the mode so that it stays a regular file.
    value = encode(Record(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    mode_field = int(value.split(b":")[2], 8)
    assert stat.S_IFMT(mode_field) == 0


@pytest.mark.parametrize(
    "rec",
    [
        Record(-1, 0, REG | 0o644),
        Record(0, -5, REG | 0o644),
        Record(2**32 - 1, 0, REG | 0o644),
        Record(0, 2**40, REG | 0o644),
        Record(0, 0, 0o644),  # no type bits
        Record(0, 0, 0o170644),  # invalid type
        Record(0, 0, REG | 0o644 | 0o1000000),  # bits beyond st_mode
        Record(0, 0, REG | 0o644, os.makedev(1, 3)),  # rdev on a non-device
    ],
)
def test_encode_rejects(rec):
    with pytest.raises(RecordError):
        encode(rec)


# -- malformed input -----------------------------------------------------------


@pytest.mark.parametrize(
    "value,msg",
    [
        (b"", "empty"),
        (b"\0", "empty"),
        (b"garbage", "fields"),
        (b"0:0", "fields"),
        (b"0", "fields"),
        (b"-1:0:644", "uid"),
        (b"0:-1:644", "gid"),
        (b"4294967295:0:644", "larger"),
        (b"0:4294967296:644", "larger"),
        (b"99999999999999999999:0:644", "larger"),
        (b"+1:0:644", "uid"),
        (b" 1:0:644", "uid"),
        (b"a:0:644", "uid"),
        (b":0:644", "uid"),
        (b"0::644", "gid"),
        (b"0:0:", "octal"),
        (b"0:0:648", "octal"),
        (b"0:0:0x1ff", "octal"),
        (b"0:0:-644", "octal"),
        (b"0:0:644 ", "octal"),
        (b"0:0:644\n", "octal"),
        (b"0:0:1644644", "beyond"),
        (b"0:0:170644", "unknown file type"),
        (b"0:0:644:", "unknown type"),
        (b"0:0:644:bogus", "unknown type"),
        (b"0:0:644:files", "unknown type"),
        (b"0:0:644:file:extra", "unknown type"),
        (b"0:0:644:dir ", "unknown type"),
        (b"0:0:644:char", "minor"),
        (b"0:0:644:char-1", "minor"),
        (b"0:0:644:char-1-", "device number"),
        (b"0:0:644:char-x-3", "device number"),
        (b"0:0:644:char-1-3-junk", "device number"),
        (b"0:0:644:char-1-3 ", "device number"),
        (b"0:0:644:block-1-3:4", "device number"),
        (b"0:0:644:char-4294967296-0", "too large"),
        (b"0:0:40755:file", "disagree"),
        (b"0:0:100644:char-1-3", "disagree"),
        ("0:0:6\u0664\u0664".encode(), "ASCII"),
        (b"\xff\xfe", "ASCII"),
        (b"0:0:100644\0junk", "octal"),
    ],
)
def test_decode_rejects(value, msg):
    with pytest.raises(RecordError, match=msg):
        decode(value, REG)


def test_record_error_is_value_error():
    assert issubclass(RecordError, ValueError)


def test_record_names():
    assert RECORD_NAME == "user.containers.override_stat"
    assert LEGACY_RECORD_NAME == "user.fuseoverlayfs.override_stat"


# -- xattr name escaping ---------------------------------------------------------

ESCAPED = [
    "security.capability",
    "security.selinux",
    "security.ima",
    "security.fuseoverlayfs.override_stat",
    "trusted.overlay.opaque",
    "trusted.foo",
    "system.posix_acl_access",
    "system.posix_acl_default",
    "user.containers.override_stat",
    "user.containers.override_security.capability",
    "user.containers.anything",
    "user.fuseoverlayfs.override_stat",
    "user.fuseoverlayfs.opaque",
]
PLAIN = [
    "user.foo",
    "user.overlay.opaque",
    "user.mime_type",
    "user.containers",  # no trailing dot: not under the prefix
    "user.containersX.y",
    "user.fuseoverlayfs",
    "system.nfs4_acl",
    "user.\u00e9t\u00e9",
]


@pytest.mark.parametrize("name", ESCAPED)
def test_escaped_names(name):
    backing = escape_xattr_name(name)
    assert backing == "user.containers.override_" + name
    assert backing != RECORD_NAME and backing != LEGACY_RECORD_NAME
    assert unescape_xattr_name(backing) == name


@pytest.mark.parametrize("name", PLAIN)
def test_plain_names(name):
    assert escape_xattr_name(name) == name
    assert unescape_xattr_name(name) == name


@pytest.mark.parametrize(
    "backing",
    [
        RECORD_NAME,
        LEGACY_RECORD_NAME,
        "user.fuseoverlayfs.opaque",
        "user.fuseoverlayfs.origin",
        "user.containers.foo",
        "user.containers.override_",
        "user.containers.override_foo",
        "user.containers.override_user.foo",
        "user.containers.override_user.overlay.opaque",
        # the backing inode's own privileged xattrs belong to the host
        "security.capability",
        "security.selinux",
        "trusted.overlay.opaque",
        "system.posix_acl_access",
        "system.posix_acl_default",
    ],
)
def test_hidden_backing_names(backing):
    assert unescape_xattr_name(backing) is None


def test_no_view_name_writes_a_record():
    candidates = (
        ESCAPED
        + PLAIN
        + [
            RECORD_NAME,
            LEGACY_RECORD_NAME,
            "user.containers.override_stat",
            "user.containers.override_",
            "user.containers.",
            "user.fuseoverlayfs.",
            "stat",
        ]
    )
    for name in candidates:
        assert escape_xattr_name(name) not in (RECORD_NAME, LEGACY_RECORD_NAME)
        assert not escape_xattr_name(name).startswith("user.fuseoverlayfs.")


def test_escape_is_injective_and_unescape_inverts_it():
    names = ESCAPED + PLAIN
    # nest a few levels
    names += ["user.containers.override_" + n for n in ESCAPED]
    backings = [escape_xattr_name(n) for n in names]
    assert len(set(backings)) == len(set(names))
    for n, b in zip(names, backings):
        assert unescape_xattr_name(b) == n
