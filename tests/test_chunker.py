"""Content-defined chunking (`tvix_store.chunking`): the C extension against the pure-Python
reference, size bounds, determinism, resynchronisation after an edit, streaming."""

from __future__ import annotations

import random

import pytest

from tvix_store import chunking as chunker
from tvix_store.chunking import (
    DEFAULT,
    Chunker,
    ChunkParams,
    _cdc,  # the C extension, built by pip install
    _py_scan,
    chunk_lengths,
)

SMALL = ChunkParams(256, 1024, 4096)  # many boundaries in little data, so the Python reference stays fast


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def cuts_of(lengths: list[int]) -> list[int]:
    out, off = [], 0
    for n in lengths:
        off += n
        out.append(off)
    return out


def test_extension_is_built_and_used() -> None:
    assert chunker.c_scan is _cdc.scan
    assert Chunker()._scan is _cdc.scan


def test_gear_tables_identical() -> None:
    assert _cdc.gear_table() == chunker.GEAR
    assert len(set(chunker.GEAR)) == 256


@pytest.mark.parametrize(
    "params", [SMALL, ChunkParams(64, 64, 64), ChunkParams(100, 128, 1000), ChunkParams(1, 16, 16)]
)
@pytest.mark.parametrize("seed", [1, 2])
def test_c_equals_python_reference(params: ChunkParams, seed: int) -> None:
    data = rand(200_000, seed)
    ref = chunk_lengths(data, params, _py_scan)
    assert chunk_lengths(data, params, _cdc.scan) == ref
    assert sum(ref) == len(data)
    assert len(ref) > 40


def test_c_equals_python_reference_default_params() -> None:
    data = rand(3 << 20, 7)
    ref = chunk_lengths(data, DEFAULT, _py_scan)
    assert chunk_lengths(data, DEFAULT, _cdc.scan) == ref
    assert len(ref) >= 5


def test_c_equals_python_on_low_entropy_data() -> None:
    # zeros and a short repeating pattern never satisfy the mask: only forced cuts at max
    for data in (bytes(20_000), b"abc" * 7000):
        ref = chunk_lengths(data, SMALL, _py_scan)
        assert chunk_lengths(data, SMALL, _cdc.scan) == ref
        assert all(n == SMALL.max_size for n in ref[:-1])


@pytest.mark.parametrize("params", [SMALL, DEFAULT])
def test_bounds(params: ChunkParams) -> None:
    data = rand(6 << 20 if params is DEFAULT else 1 << 20, 3)
    lengths = chunk_lengths(data, params)
    assert all(params.min_size <= n <= params.max_size for n in lengths[:-1])
    assert 0 < lengths[-1] <= params.max_size
    # the mean lands between min and max, near the normal size
    mean = sum(lengths) / len(lengths)
    assert params.min_size < mean < params.max_size / 2


def test_deterministic() -> None:
    data = rand(2 << 20, 4)
    assert chunk_lengths(data) == chunk_lengths(bytes(data)) == chunk_lengths(bytearray(data))


def test_empty_and_tiny_inputs() -> None:
    assert chunk_lengths(b"") == []
    assert chunk_lengths(b"x") == [1]
    assert chunk_lengths(bytes(DEFAULT.min_size)) == [DEFAULT.min_size]


def test_boundaries_resynchronise_after_insertion() -> None:
    data = rand(4 << 20, 5)
    edited = data[: 1 << 20] + b"inserted bytes!" + data[1 << 20 :]
    a = cuts_of(chunk_lengths(data))
    b = cuts_of(chunk_lengths(edited))
    # every cut after the edit (past one chunk of resynchronisation) is shifted by exactly the insertion
    after_a = {c + 15 for c in a if c > (1 << 20) + DEFAULT.max_size}
    after_b = {c for c in b if c > (1 << 20) + DEFAULT.max_size + 15}
    assert after_a and after_a == after_b
    # and before it nothing changed
    assert [c for c in a if c < 1 << 20] == [c for c in b if c < 1 << 20]


@pytest.mark.parametrize("scan", [_cdc.scan, _py_scan], ids=["c", "python"])
def test_streaming_in_odd_pieces_equals_one_buffer(scan: chunker.ScanFn) -> None:
    data = rand(300_000, 6)
    whole = cuts_of(chunk_lengths(data, SMALL, scan))
    rng = random.Random(9)
    c = Chunker(SMALL, scan)
    off = 0
    got: list[int] = []
    while off < len(data):
        n = rng.choice([1, 2, 3, 17, 255, 256, 1000, 4095, 4096, 4097, 50_000])
        piece = memoryview(data)[off : off + n]
        got += [off + x for x in c.feed(piece)]
        off += len(piece)
    if c.pending:
        got.append(len(data))
    assert got == whole


def test_streaming_with_default_params_and_1mib_pieces() -> None:
    data = rand(5 << 20, 8)
    c = Chunker()
    got = []
    for off in range(0, len(data), 1 << 20):
        got += [off + x for x in c.feed(data[off : off + (1 << 20)])]
    if c.pending:
        got.append(len(data))
    assert got == cuts_of(chunk_lengths(data))


def test_invalid_params_rejected() -> None:
    with pytest.raises(ValueError):
        ChunkParams(10, 8, 16)
    with pytest.raises(ValueError):
        ChunkParams(8, 1000, 2000)  # normal not a power of two
    with pytest.raises(ValueError):
        _cdc.scan(b"abc", 0, 0, 0, 16, 16, 1, 1)  # min 0
    with pytest.raises(ValueError):
        _cdc.scan(b"abc", 16, 0, 1, 16, 16, 1, 1)  # pos at max: state not from a previous scan


def test_pure_python_fallback_gives_same_chunks() -> None:
    """`TVIX_CDC=python` (what runs when the extension is missing) cuts the same chunks."""
    import os
    import subprocess
    import sys

    code = (
        "import random; from tvix_store import chunking as c; "
        "assert c.c_scan is None; "
        "print(c.chunk_lengths(random.Random(11).randbytes(100_000), c.ChunkParams(256, 1024, 4096)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "TVIX_CDC": "python"}, capture_output=True, check=True
    ).stdout.decode()
    assert out.strip() == str(chunk_lengths(rand(100_000, 11), SMALL, _cdc.scan))
