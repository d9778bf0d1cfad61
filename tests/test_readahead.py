"""The read-ahead policy (`tvix_store.readahead`), by itself: sequential runs of one blob, and
the walk-order read-ahead of a tree's small files (what it hints, where it stops, how it
starts over)."""

from __future__ import annotations

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.readahead import INITIAL_WINDOW, MAX_WINDOW, SEQUENTIAL_MIN_BYTES, ReadAhead, WalkAhead, walk_files

CHUNK = 64 << 10


def chunks(n: int) -> list[ChunkMeta]:
    return [ChunkMeta(B3Digest.of(b"%d" % i), CHUNK) for i in range(n)]


def test_a_run_from_the_start_is_sequential_and_its_window_grows_to_the_maximum() -> None:
    ra = ReadAhead(chunks(400))
    a = ra.after(0, CHUNK)
    assert a.sequential and a.start == 1 and (a.stop - 1) * CHUNK == INITIAL_WINDOW
    furthest = a.stop
    for off in range(CHUNK, 200 * CHUNK, CHUNK):
        a = ra.after(off, off + CHUNK)
        assert a.sequential
        if a:
            assert a.start == furthest  # each chunk handed out once
            furthest = a.stop
        assert furthest * CHUNK <= off + CHUNK + MAX_WINDOW
    assert furthest * CHUNK == 200 * CHUNK + MAX_WINDOW  # and it did grow to the maximum


def test_a_seek_starts_a_new_run_that_must_prove_itself_sequential() -> None:
    ra = ReadAhead(chunks(400))
    ra.after(0, CHUNK)
    start = 100 * CHUNK + 123
    off = start
    while off + 128 * 1024 - start < SEQUENTIAL_MIN_BYTES:  # one large read split into requests
        assert not ra.after(off, off + 128 * 1024).sequential
        off += 128 * 1024
    assert ra.after(off, off + 128 * 1024)  # covered 2 MiB: now it is a run


def test_the_end_of_the_blob_stops_it() -> None:
    ra = ReadAhead(chunks(10))
    a = ra.after(0, 9 * CHUNK)
    assert a.stop == 10
    assert not ra.after(9 * CHUNK, 10 * CHUNK)


def f(name: str, size: int = 1000) -> FileNode:
    return FileNode(name.encode(), B3Digest.of(name.encode()), size)


def tree() -> tuple[Directory, dict[B3Digest, list[Node]]]:
    """top: a, b/ (c, d/ (e), f), g, h(big)"""
    d = Directory(files=(f("e"),))
    b = Directory.from_nodes([f("c"), d.as_node(b"d"), f("f")])
    top = Directory.from_nodes([f("a"), b.as_node(b"b"), f("g"), f("h", 10 << 20)])
    return top, {x.digest: x.nodes() for x in (top, b, d)}


def test_walk_files_follows_find_order_from_any_position() -> None:
    top, dirs = tree()
    b = next(n for n in top.nodes() if n.name == b"b")
    assert isinstance(b, DirectoryNode)
    names = [n.name for _, n in walk_files([(top.digest, top.nodes(), 0)], dirs.get)]
    assert names == [b"a", b"c", b"e", b"f", b"g", b"h"]
    # right after "c" in b: the rest of b (d/e, f), then the rest of top
    after_c = [(top.digest, top.nodes(), 2), (b.digest, dirs[b.digest], 1)]
    walked = list(walk_files(after_c, dirs.get))
    assert [n.name for _, n in walked] == [b"e", b"f", b"g", b"h"]
    assert walked[1][0] == (b.digest, b"f")  # positions name the containing Directory


def test_walk_ahead_hints_within_its_budget_and_skips_big_files() -> None:
    files = [f(f"{i:04}", 10_000) for i in range(500)] + [f("big", 10 << 20)]
    d = Directory.from_nodes(files)
    nodes = d.nodes()
    w = WalkAhead(budget=100_000, max_files=1000)

    def from_(i: int):  # noqa: ANN202
        return lambda: walk_files([(d.digest, nodes, i + 1)], {}.get)

    first = w.after((d.digest, nodes[0].name), from_(0))
    assert [n.name for n in first] == [n.name for n in nodes[1:11]]  # 10 × 10 kB = the budget
    assert w.after((d.digest, nodes[1].name), from_(1)) == []  # still more than half ahead
    more = w.after((d.digest, nodes[6].name), from_(6))  # half consumed: refill
    assert [n.name for n in more] == [n.name for n in nodes[11:17]]
    # the reader jumps elsewhere: start over from there
    jump = w.after((d.digest, nodes[300].name), from_(300))
    assert [n.name for n in jump] == [n.name for n in nodes[301:311]]
    # to the end: the big file is never hinted
    tail = w.after((d.digest, nodes[495].name), from_(495))
    assert [n.name for n in tail] == [n.name for n in nodes[496:500]]
