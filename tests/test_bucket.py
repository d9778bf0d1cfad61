"""The tvix/snix bucket layout (`objectstore+…`): fixed vectors computed by hand from the layout
(keys, chunk index bytes, Directory closure bytes; zstd decoded with `zstandard` directly, not
with the writer's code), objects written the way snix writes them (chunks without a content
size in the frame) read back, corruption detected, FastCDC 2020 checked against its reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard
from fixtures import random_bytes

from tvix_store.chunking import v2020
from tvix_store.compose import open_store
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, ValidationError
from tvix_store.store import Store

HELLO_WORLD = "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"
EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
BLOB_B = bytes(range(255)) * 4096
BLOB_B_CHUNKS = [
    (524288, "79445f0f1420045f8be59af5f7915cfd9182c978ece11a21913641e457fa9794"),
    (520192, "832c7fbdbe9a537273cfe0299195a09ba7d08b6da842ab25fea373d739e9c5ac"),
]


def unzstd(raw: bytes) -> bytes:
    """One zstd frame, decoded independently of the code under test."""
    assert raw[:4] == bytes.fromhex("28b52ffd")
    return zstandard.ZstdDecompressor().decompressobj().decompress(raw)


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[Store, Path]:
    root = tmp_path / "bucket"
    s = open_store(f"objectstore+file://{root}", pathinfo_url="memory://")
    yield s, root
    s.close()


def test_fastcdc2020_gear_masks_and_c_equals_reference() -> None:
    assert v2020.GEAR[0] == 0x3B5D3C7D207E37DC and v2020.GEAR[255] == 0xAABD2B2A451504E1  # the crate's table
    assert v2020.BUCKET.masks == (0x0000D91707537000, 0x0000D90703537000)
    data = random_bytes(1 << 20, seed=7)
    small = v2020.Params2020(256, 1024, 4096)
    for i in range(300):
        piece = data[i * 997 : i * 997 + 5000 - i % 7]  # odd and even tails
        assert v2020.cut(piece, small) == v2020.py_cut(piece, small), i
    assert v2020.chunk_lengths(BLOB_B) == [n for n, _ in BLOB_B_CHUNKS]


def test_layout_vectors(bucket: tuple[Store, Path]) -> None:
    s, root = bucket
    # a one-chunk blob: its chunk (zstd) and an EMPTY index, both under the 4-hex-digit shard
    assert s.blobs.put(b"Hello World").hex() == HELLO_WORLD
    assert (root / "blobs/b3/41f8" / HELLO_WORLD).read_bytes() == b""
    assert unzstd((root / "chunks/b3/41f8" / HELLO_WORLD).read_bytes()) == b"Hello World"
    # the empty blob: only its empty index, no chunk
    assert s.blobs.put(b"").hex() == EMPTY
    assert (root / "blobs/b3/af13" / EMPTY).read_bytes() == b""
    assert not (root / "chunks/b3/af13" / EMPTY).exists()
    # two chunks: StatBlobResponse {2: ChunkMeta {1: digest, 2: size}} by hand
    d = s.blobs.put(BLOB_B)
    (n1, c1), (n2, c2) = BLOB_B_CHUNKS
    assert n1 == 0x80000 and n2 == 0x7F000
    expected = bytes.fromhex("12260a20" + c1 + "10808020" + "12260a20" + c2 + "1080e01f")
    assert (root / "blobs/b3" / d.hex()[:4] / d.hex()).read_bytes() == expected
    assert unzstd((root / "chunks/b3" / c1[:4] / c1).read_bytes()) == BLOB_B[:n1]
    assert unzstd((root / "chunks/b3" / c2[:4] / c2).read_bytes()) == BLOB_B[n1:]
    # a Directory closure: {a: Dir()}: u32 BE length + canonical protobuf, root first, one frame
    a = Directory()
    b = Directory(directories=(a.as_node(b"a"),))
    s.directories.put_graph([a, b])
    key = "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc"
    assert b.digest.hex() == key
    payload = unzstd((root / "dirs/b3/8701" / key).read_bytes())
    assert payload == bytes.fromhex("000000270a250a01611220" + EMPTY + "00000000")
    # here every Directory of a put graph is also a root of its own object
    assert unzstd((root / "dirs/b3/af13" / EMPTY).read_bytes()) == bytes(4)


def test_reads_what_snix_writes(bucket: tuple[Store, Path]) -> None:
    """Chunks without a content size in their frame (snix's streaming encoder), an index written
    by hand, a closure in snix's sibling order: all read back, every chunk verified."""
    s, root = bucket
    no_size = zstandard.ZstdCompressor(level=3, write_content_size=False)
    parts = [random_bytes(200_000, seed=1), random_bytes(150_000, seed=2)]
    whole = b"".join(parts)
    index = b""
    for p in parts:
        h = B3Digest.of(p).hex()
        (root / "chunks/b3" / h[:4]).mkdir(parents=True, exist_ok=True)
        (root / "chunks/b3" / h[:4] / h).write_bytes(no_size.compress(p))
        meta = (
            bytes.fromhex("0a20" + h)
            + b"\x10"
            + bytes([0x80 | (len(p) & 0x7F), 0x80 | (len(p) >> 7 & 0x7F), len(p) >> 14])
        )
        index += bytes([0x12, len(meta)]) + meta
    d = B3Digest.of(whole).hex()
    (root / "blobs/b3" / d[:4]).mkdir(parents=True, exist_ok=True)
    (root / "blobs/b3" / d[:4] / d).write_bytes(index)
    cs = s.blobs.chunks(B3Digest.from_hex(d))
    assert [c.size for c in cs] == [len(p) for p in parts]
    assert s.blobs.open_read(B3Digest.from_hex(d)).read() == whole
    one = B3Digest.of(parts[0])
    assert s.blobs.chunks(one)[0].size == len(parts[0])  # size from the chunk itself (no header field)
    # a closure whose children come in reverse name order (snix's BFS)
    x, y = Directory(symlinks=()), Directory(directories=(Directory().as_node(b"e"),))
    top = Directory(directories=(x.as_node(b"a"), y.as_node(b"b")))
    frames = [top.encoded, y.encoded, Directory().encoded]  # x == Directory(): the same digest as e
    body = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    h = top.digest.hex()
    (root / "dirs/b3" / h[:4]).mkdir(parents=True, exist_ok=True)
    (root / "dirs/b3" / h[:4] / h).write_bytes(no_size.compress(body))
    assert list(s.directories.get_recursive(top.digest)) == [top, Directory(), y]  # our breadth-first order


def test_corruption_is_an_integrity_error(bucket: tuple[Store, Path]) -> None:
    s, root = bucket
    d = s.blobs.put(b"Hello World")
    (root / "chunks/b3/41f8" / HELLO_WORLD).write_bytes(zstandard.ZstdCompressor().compress(b"Hello Wurld"))
    with pytest.raises(IntegrityError):
        s.blobs.read_chunk(d)
    (root / "chunks/b3/41f8" / HELLO_WORLD).write_bytes(b"not zstd at all")
    with pytest.raises(IntegrityError):
        s.blobs.read_chunk(d)
    b = Directory(directories=(Directory().as_node(b"a"),))
    s.directories.put_graph([Directory(), b])
    h = b.digest.hex()
    bad = Directory(directories=(Directory().as_node(b"z"),)).encoded
    (root / "dirs/b3" / h[:4] / h).write_bytes(zstandard.ZstdCompressor().compress(len(bad).to_bytes(4, "big") + bad))
    with pytest.raises(IntegrityError):
        s.directories.get(b.digest)


@pytest.mark.parametrize(
    "url",
    [
        "objectstore+s3://",
        "objectstore+s3://b/p?aws_no_such_option=1",
        "objectstore+file://relative",
        "objectstore+memory:///x",
        "objectstore+ftp://host/x",
    ],
)
def test_bad_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(ValidationError) as e:
        open_store(url, pathinfo_url="memory://")
    assert "objectstore+" in str(e.value)


def test_bucket_alone_has_no_pathinfos(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--pathinfo-store"):
        open_store(f"objectstore+file://{tmp_path}")
    assert os.path.isdir(tmp_path)


def test_secrets_in_urls_are_never_shown(tmp_path: Path) -> None:
    """A secret key in the query (the form snix's own tests use) or a password stays out of the
    store's name (logged by the daemon) and out of error messages."""
    url = "objectstore+s3://b/p?aws_access_key_id=AK&aws_secret_access_key=SEKRIT&aws_endpoint_url=http%3A%2F%2Fx%3A1"
    with open_store(url, pathinfo_url="memory://") as s:
        assert "SEKRIT" not in s.url and "aws_secret_access_key=***" in s.url
    with pytest.raises(ValidationError) as e:
        open_store(url + "&aws_bogus=1", pathinfo_url="memory://")
    assert "SEKRIT" not in str(e.value)
    with pytest.raises(ValidationError) as e:
        open_store("objectstore+nope://b?aws_secret_access_key=SEKRIT")
    assert "SEKRIT" not in str(e.value)
    with open_store("objectstore+memory:///", pathinfo_url="postgresql://u:SEKRIT@127.0.0.1:1/db") as s:
        assert "SEKRIT" not in s.url
