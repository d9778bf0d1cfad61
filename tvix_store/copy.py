"""Copying store paths between two stores (`tvix-store copy --from URL --to URL STORE_PATH…`).

For each store path: its PathInfo from the source, then the closure of its root node (the
Directories under it, the blobs its files name), of which only what the destination lacks is
sent, then the PathInfo, last (a destination that admits writes as this project's daemon does
accepts a PathInfo only over a complete closure).

What "lacks" means, asked before anything is sent:
- Directories, top down: a Directory the destination has is not descended into (a store holds
  a Directory only after its children and their blobs: the admission rule of our daemon and
  the order every tvix importer writes in). `has` of the Directories of one level run together.
- Blobs: `has_many` in batches (a remote keeps them in flight together).

What is sent: small blobs (up to `SMALL` bytes) in batches, read with `read_many` and written
with `put_many` (a remote keeps each batch's calls in flight), big blobs streamed chunk by chunk
(`open_read` → `open_write`), `workers` batches or big blobs at once; then the missing
Directories as one leaves-first graph (`put_graph`); then the PathInfo. Verified: every byte
read from the source is checked against its BLAKE3 digest (the backends do), the digest the
destination answers for every blob written must be the one asked for, and the root digest of
the Directory graph too. A PathInfo the destination already has unchanged is skipped.

Not here: closures of store path references (each path named is copied with its own tree, as
`nix copy --no-recursive` would; name the others too), argument handling (`cli/copy.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.gc import writing
from tvix_store.store import Store
from tvix_store.util.progress import Progress

#: blobs up to this size go in batches (`read_many`/`put_many`); bigger ones are streamed
SMALL = 1 << 20
#: a batch of small blobs holds at most this many blobs / bytes
BATCH_BLOBS = 64
BATCH_BYTES = 4 << 20
#: blobs asked about in one `has_many`
HAS_BATCH = 512
#: bytes moved per step of a streamed blob
PIECE = 1 << 20
DEFAULT_WORKERS = 8


@dataclass
class CopyReport:
    """What one copy did (per kind: sent, or already at the destination)."""

    paths_copied: list[StorePath] = field(default_factory=list)
    paths_present: list[StorePath] = field(default_factory=list)
    blobs_sent: int = 0
    blobs_present: int = 0
    bytes_sent: int = 0
    bytes_present: int = 0
    directories_sent: int = 0
    directories_present: int = 0


def _closure(src: Store, dst: Store, root: Node, workers: int) -> tuple[list[Directory], dict[B3Digest, int], int]:
    """The Directories of `root`'s tree the destination lacks (leaves first), the blobs they
    (or a file root) name with their sizes, and how many Directories it already had."""
    blobs: dict[B3Digest, int] = {}
    if isinstance(root, FileNode):
        blobs[root.digest] = root.size
        return [], blobs, 0
    if not isinstance(root, DirectoryNode):
        return [], blobs, 0
    missing: list[Directory] = []
    present = 0
    seen: set[B3Digest] = set()
    level = [root.digest]
    with ThreadPoolExecutor(min(workers, 16), thread_name_prefix="copy-has") as pool:
        while level:
            level = [d for d in dict.fromkeys(level) if d not in seen]
            seen.update(level)
            have = list(pool.map(dst.directories.has, level))
            wanted = [d for d, h in zip(level, have, strict=True) if not h]
            present += len(level) - len(wanted)
            got = list(pool.map(src.directories.get, wanted))
            level = []
            for digest, d in zip(wanted, got, strict=True):
                if d is None:
                    raise NotFoundError(f"directory {digest.hex()} is missing from the source store")
                if d.digest != digest:
                    raise IntegrityError(f"directory {digest.hex()}: the source answered another directory")
                missing.append(d)
                for f in d.files:
                    blobs[f.digest] = f.size
                level.extend(c.digest for c in d.directories)
    return _leaves_first(missing), blobs, present


def _leaves_first(dirs: list[Directory]) -> list[Directory]:
    """`dirs` ordered so that every Directory comes after all its children among them (a
    post-order walk, iterative: a Directory reached at several depths is placed once, below
    the first parent that needs it)."""
    by_digest = {d.digest: d for d in dirs}
    out: list[Directory] = []
    placed: set[B3Digest] = set()
    for start in dirs:
        if start.digest in placed:
            continue
        stack: list[tuple[Directory, int]] = [(start, 0)]
        while stack:
            d, i = stack.pop()
            children = d.directories
            while i < len(children) and (children[i].digest in placed or children[i].digest not in by_digest):
                i += 1
            if i < len(children):
                stack.append((d, i + 1))
                stack.append((by_digest[children[i].digest], 0))
                continue
            if d.digest not in placed:
                placed.add(d.digest)
                out.append(d)
    return out


def _batches(items: Sequence[tuple[B3Digest, int]]) -> Iterator[list[tuple[B3Digest, int]]]:
    batch: list[tuple[B3Digest, int]] = []
    size = 0
    for digest, n in items:
        if batch and (len(batch) >= BATCH_BLOBS or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((digest, n))
        size += n
    if batch:
        yield batch


def _read_whole(src: Store, digest: B3Digest) -> bytes:
    r = src.blobs.open_read(digest)
    if r is None:
        raise NotFoundError(f"blob {digest.hex()} is missing from the source store")
    with r:
        return r.read()


def _send_small(src: Store, dst: Store, batch: list[tuple[B3Digest, int]], progress: Progress | None) -> None:
    """Read a batch of small blobs from the source (together) and write them (together)."""
    digests = [d for d, _ in batch]
    datas: dict[B3Digest, bytes] = {}
    for digest, data in src.blobs.read_many(digests):
        if isinstance(data, bytes) and B3Digest.of(data) == digest:
            datas[digest] = data
    for digest in digests:  # what `read_many` could not answer as one piece (a chunked blob)
        if digest not in datas:
            datas[digest] = _read_whole(src, digest)
    written = dst.blobs.put_many([datas[d] for d in digests])
    for (digest, size), got in zip(batch, written, strict=True):
        if got != digest:
            raise IntegrityError(f"blob {digest.hex()}: the destination stored it as {got.hex()}")
        if progress is not None:
            progress.add(size)


def _send_big(src: Store, dst: Store, digest: B3Digest, progress: Progress | None) -> None:
    """Stream one big blob from the source into the destination."""
    r = src.blobs.open_read(digest)
    if r is None:
        raise NotFoundError(f"blob {digest.hex()} is missing from the source store")
    with r, dst.blobs.open_write() as w:
        while piece := r.read(PIECE):
            w.write(piece)
            if progress is not None:
                progress.add(len(piece))
        got = w.close()
    if got != digest:
        raise IntegrityError(f"blob {digest.hex()}: the destination stored it as {got.hex()}")


def _send_blobs(
    src: Store, dst: Store, blobs: dict[B3Digest, int], report: CopyReport, workers: int, progress: Progress | None
) -> None:
    items = list(blobs.items())
    missing: list[tuple[B3Digest, int]] = []
    for i in range(0, len(items), HAS_BATCH):
        part = items[i : i + HAS_BATCH]
        for item, have in zip(part, dst.blobs.has_many([d for d, _ in part]), strict=True):
            if have:
                report.blobs_present += 1
                report.bytes_present += item[1]
            else:
                missing.append(item)
    if progress is not None:
        progress.add_total(sum(n for _, n in missing))
    jobs: list[Callable[[], None]] = []
    small = [(d, n) for d, n in missing if n <= SMALL]
    for batch in _batches(small):
        jobs.append(lambda b=batch: _send_small(src, dst, b, progress))  # type: ignore[misc]
    for digest, n in missing:
        if n > SMALL:
            jobs.append(lambda d=digest: _send_big(src, dst, d, progress))  # type: ignore[misc]
    _run_all(jobs, workers)
    report.blobs_sent += len(missing)
    report.bytes_sent += sum(n for _, n in missing)


def _run_all(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run `jobs` on up to `workers` threads; the first failure cancels the rest and is raised."""
    if not jobs:
        return
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="copy") as pool:
        futures: list[Future[None]] = [pool.submit(job) for job in jobs]
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for f in not_done:
                    f.cancel()
                raise fut.exception()  # type: ignore[misc]


def lookup(store: Store, sp: StorePath, where: str) -> PathInfo:
    """The PathInfo of `sp` in `store`; NotFoundError naming `where` if absent."""
    info = store.pathinfos.get(sp.digest)
    if info is None or info.node is None or info.node.name.decode("ascii", "replace") != sp.basename:
        raise NotFoundError(f"store path {sp} not found in {where}")
    return info


def _same(a: PathInfo, b: PathInfo) -> bool:
    """The same store path contents and metadata, signatures aside."""
    na, nb = a.narinfo, b.narinfo
    meta_a = None if na is None else (na.nar_size, na.nar_sha256, tuple(na.reference_names))
    meta_b = None if nb is None else (nb.nar_size, nb.nar_sha256, tuple(nb.reference_names))
    return a.node == b.node and a.references == b.references and meta_a == meta_b


def copy_paths(
    src: Store,
    dst: Store,
    paths: Sequence[StorePath],
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> CopyReport:
    """Copy `paths` (each with its tree) from `src` to `dst`; see the module docstring.
    NotFoundError if the source lacks one (nothing of that path is sent); UnavailableError and
    the destination's refusals (ConflictError for a store path it holds with other contents)
    pass through. Holds the GC lock of a local destination shared (`tvix_store.gc.writing`)."""
    with writing(dst):
        return _copy_paths(src, dst, paths, workers, progress, say)


def _copy_paths(
    src: Store,
    dst: Store,
    paths: Sequence[StorePath],
    workers: int,
    progress: Progress | None,
    say: Callable[[str], None] | None,
) -> CopyReport:
    report = CopyReport()
    infos = [(sp, lookup(src, sp, src.url or "the source store")) for sp in paths]
    for sp, info in infos:
        assert info.node is not None
        old = dst.pathinfos.get(sp.digest)
        if old is not None and old.node is not None and _same(old, info):
            report.paths_present.append(sp)
            if say is not None:
                say(sp.absolute)
            continue
        if progress is not None:
            progress.rename(f"comparing {sp.basename}")
        dirs, blobs, had = _closure(src, dst, info.node, workers)
        report.directories_present += had
        if progress is not None:
            progress.rename(f"copying {sp.basename}")
        _send_blobs(src, dst, blobs, report, workers, progress)
        if dirs:
            root = dst.directories.put_graph(dirs)
            if isinstance(info.node, DirectoryNode) and root != info.node.digest:
                raise IntegrityError(f"{sp}: the destination stored its tree as {root.hex()}")
            report.directories_sent += len(dirs)
        try:
            dst.pathinfos.put(info)
        except UnavailableError:
            raise
        except StoreError as e:
            raise type(e)(f"{sp}: {e}") from None
        report.paths_copied.append(sp)
        if say is not None:
            say(sp.absolute)
    return report
