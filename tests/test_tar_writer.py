"""The shard tar writer writes exactly what the standard library's tarfile writes, and tarfile and
webdataset read it back."""

from __future__ import annotations

import io
import tarfile

import pytest

from engine.tar_writer import TarAppender, member_header

MEMBERS = [
    ("a" * 64 + ".jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("a" * 64 + ".json", b'{"key": "x"}'),
    ("big.bin", bytes(range(256)) * 300),  # past SMALL_MEMBER: header, data and padding written apart
    ("empty.txt", b""),
    ("exactly-one-block.bin", b"x" * 512),
    ("caf\u00e9/\u00fcml\u00e4ut.json", b"{}"),  # non-ASCII names: UTF-8, as tarfile writes them
    ("d/" * 60 + "long.jpg", b"long name"),  # over 100 bytes: tarfile's own prefix/name split
]


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _appender_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    writer = TarAppender(buffer)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    writer.close()  # idempotent: the end of the archive is written once
    return buffer.getvalue()


@pytest.mark.parametrize("count", [0, 1, 2, len(MEMBERS)])
def test_archives_are_byte_identical_to_tarfiles(count: int) -> None:
    assert _appender_bytes(MEMBERS[:count]) == _tarfile_bytes(MEMBERS[:count])


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8**11 - 1])
def test_headers_match_tarfile_at_the_edges_of_the_size_field(size: int) -> None:
    info = tarfile.TarInfo("k.jpg")
    info.size, info.mode, info.mtime = size, 0o444, 0
    assert member_header("k.jpg", size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_members_read_back_in_order_with_their_bytes() -> None:
    with tarfile.open(fileobj=io.BytesIO(_appender_bytes(MEMBERS)), mode="r:") as tar:
        read = [(m.name, tar.extractfile(m).read(), m.mode, m.mtime) for m in tar]  # type: ignore[union-attr]
    assert read == [(name, data, 0o444, 0) for name, data in MEMBERS]


def test_a_size_past_the_ustar_field_is_refused_like_tarfile_refuses_it() -> None:
    with pytest.raises(ValueError):
        member_header("big.bin", 8**11)
