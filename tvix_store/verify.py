"""`verify_objects(objects)`: an fsck of a store's object layer — every object re-hashed and
parsed, every reference checked; `repair(objects, report, source)`: bad or missing objects
fetched again from another store, verified, and written.

Checks (one line per problem, naming the object):
- chunks hash to their names and are not empty;
- chunk lists parse, are well-formed for their blob (`check_chunk_list`) and list present
  chunks of the listed sizes (with `full`, the chunks also hash to the blob);
- Directories hash to their names, parse, are canonical, and reference present Directories of
  the declared sizes and present blobs of the declared sizes (files);
- PathInfos parse, validate, are filed under their own hash, and their root node is present
  (a Directory of the declared size, a blob of the declared size);
- every object of these kinds (`CHECKED`) has a name of its kind (a digest, a nixbase32
  hash); other kinds of the object layer (nar-bridge's records) are not looked at.

Reads go through the `ObjectStore` interface only (list, get, stat), so any backend can be
checked, while writers run: an object referenced but missing from the listing is looked up
again before it is reported (it may have been written since). Temp files are not objects
and are ignored. `verify_objects` is read-only; each problem it finds records which object a
good copy would repair (`Problem.fetch`), and `repair` does exactly that: it fetches those
objects (and whatever they need that is missing) from a source `Store` (any URL: a daemon,
another local store), verifies them like every read, writes them (replacing bad copies), and
says what it repaired and what it could not. Run `verify_objects` again to see the result.

Not here: deciding what is garbage (`tvix_store.gc`), the services' own read checks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tvix_store.blobservice.objects import ObjectBlobService
from tvix_store.core import nixbase32
from tvix_store.core.castore import Directory, DirectoryNode, FileNode
from tvix_store.core.chunks import check_chunk_list, decode_chunk_list
from tvix_store.core.digest import B3Digest, blake3_of, new_hasher
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.core.pathinfo import HASH_LEN
from tvix_store.objects import ObjectStore
from tvix_store.protocol import wire
from tvix_store.store import Store
from tvix_store.util.progress import Progress

#: the kinds checked here (other kinds of the object layer belong to others: nar-bridge records)
CHECKED = ("chunks", "blobs", "directories", "pathinfos")


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: its line, and the key of the object whose good copy would repair it
    (`blobs/<hex>` stands for the whole blob; None: no copy of one object repairs it)."""

    line: str
    fetch: str | None = None


@dataclass
class VerifyReport:
    """What `verify_objects` checked and the problems it found (one line each)."""

    chunks: int = 0
    blobs: int = 0
    directories: int = 0
    pathinfos: int = 0
    found: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p.line for p in self.found]

    @property
    def ok(self) -> bool:
        return not self.found

    def add(self, line: str, fetch: str | None = None) -> None:
        self.found.append(Problem(line, fetch))

    def wanted(self) -> list[str]:
        """The keys of the objects to fetch, each once, in the order found."""
        return list(dict.fromkeys(p.fetch for p in self.found if p.fetch is not None))


def _name(key: str) -> str:
    return key.split("/", 1)[1]


def _digest(name: str) -> B3Digest | None:
    if len(name) != 64:
        return None
    try:
        d = B3Digest.from_hex(name)
    except ValidationError:
        return None
    return d if d.hex() == name else None


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


class _Sizes:
    """Sizes of what the listing found, with a look-up of what was written after it."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.chunks: dict[bytes, int] = {}
        self.blobs: dict[bytes, int] = {}  # multi-chunk (and empty) blobs: their lists' totals
        self.dirs: dict[bytes, int] = {}
        #: objects found present but bad (reported once, where they are): references to them
        #: are not reported again as missing
        self.bad: set[bytes] = set()

    def chunk(self, d: bytes) -> int | None:
        size = self.chunks.get(d)
        if size is None:
            data = self.objects.get(f"chunks/{d.hex()}")
            if data is not None and blake3_of(data) == d:
                size = self.chunks[d] = len(data)
        return size

    def blob(self, d: bytes) -> int | None:
        size = self.blobs.get(d)
        if size is not None:
            return size
        size = self.chunk(d)
        if size is not None:
            return size
        raw = self.objects.get(f"blobs/{d.hex()}")
        if raw is None:
            return None
        try:
            size = self.blobs[d] = sum(c.size for c in decode_chunk_list(raw, d.hex()))
        except StoreError:
            return None
        return size

    def directory(self, d: bytes) -> int | None:
        size = self.dirs.get(d)
        if size is None:
            raw = self.objects.get(f"directories/{d.hex()}")
            if raw is not None and blake3_of(raw) == d:
                try:
                    size = self.dirs[d] = wire.directory_from_bytes(raw).size
                except (StoreError, ValueError):
                    return None
        return size


def verify_objects(
    objects: ObjectStore, full: bool = True, complete: bool = True, progress: Progress | None = None
) -> VerifyReport:
    """Check every visible object (see the module docstring). `complete` False: a cache, which
    holds parts of closures, so a missing chunk, child Directory, blob or root is not a problem
    (a present one must still be right). `progress` (for a display): the bytes of chunks
    re-hashed of all there are, then the phase of the remaining checks."""
    rep = VerifyReport()
    sizes = _Sizes(objects)
    if progress is not None:
        progress.phase("checking names")
    _check_names(objects, rep)
    if progress is not None:
        progress.phase("re-hashing chunks", sum(o.size for o in objects.list("chunks/")))
    _check_chunks(objects, rep, sizes, progress)
    if progress is not None:
        progress.rename("checking blobs")
    _check_blobs(objects, rep, sizes, full, complete)
    if progress is not None:
        progress.rename("checking directories")
    parsed = _check_directories(objects, rep, sizes)
    _check_directory_references(objects, rep, sizes, parsed, complete)
    if progress is not None:
        progress.rename("checking path infos")
    _check_pathinfos(objects, rep, sizes, complete)
    return rep


def _check_names(objects: ObjectStore, rep: VerifyReport) -> None:
    for kind in CHECKED:
        for o in objects.list(kind + "/"):
            name = _name(o.key)
            if kind == "pathinfos":
                try:
                    nixbase32.decode(name, HASH_LEN)
                except (ValidationError, ValueError):
                    rep.add(f"object {o.key}: not named by a store path hash")
            elif _digest(name) is None:
                rep.add(f"object {o.key}: not named by a digest")


def _check_chunks(objects: ObjectStore, rep: VerifyReport, sizes: _Sizes, progress: Progress | None = None) -> None:
    for o in objects.list("chunks/"):
        if progress is not None:
            progress.add(o.size)
        d = _digest(_name(o.key))
        if d is None:
            continue
        rep.chunks += 1
        data = objects.get(o.key)
        if data is None:
            continue  # deleted since the listing
        got = blake3_of(data)
        if got != d:
            rep.add(f"chunk {d.hex()} is corrupt: its {len(data)} bytes hash to {got.hex()}", o.key)
            sizes.bad.add(d)
        elif not data:
            rep.add(f"chunk {d.hex()} is empty")
            sizes.bad.add(d)
        else:
            sizes.chunks[d] = len(data)


def _check_blobs(objects: ObjectStore, rep: VerifyReport, sizes: _Sizes, full: bool, complete: bool) -> None:
    for o in objects.list("blobs/"):
        d = _digest(_name(o.key))
        if d is None:
            continue
        rep.blobs += 1
        raw = objects.get(o.key)
        if raw is None:
            continue
        name = d.hex()
        try:
            entries = decode_chunk_list(raw, name)
            check_chunk_list(d, entries)
        except StoreError as e:
            rep.add(f"blob {name}: {e}", o.key)
            sizes.bad.add(d)
            continue
        sizes.blobs[d] = sum(c.size for c in entries)
        whole = True
        for c in entries:
            have = sizes.chunk(c.digest)
            if have is None:
                whole = False
                if complete and c.digest not in sizes.bad:
                    rep.add(f"blob {name}: chunk {c.digest.hex()} is missing", f"chunks/{c.digest.hex()}")
            elif have != c.size:
                whole = False
                rep.add(f"blob {name}: chunk {c.digest.hex()} has {have} bytes, its list says {c.size}", o.key)
        if full and whole and len(entries) > 1:
            h = new_hasher(large=True)
            for c in entries:
                h.update(objects.get(f"chunks/{c.digest.hex()}") or b"")
            if h.digest() != d:
                rep.add(f"blob {name}: its chunks hash to {h.digest().hex()}", o.key)


def _load_directory(objects: ObjectStore, d: B3Digest) -> tuple[Directory | None, str | None]:
    """(the Directory, None) or (None, what is wrong with it); (None, None) if absent."""
    raw = objects.get(f"directories/{d.hex()}")
    if raw is None:
        return None, None
    got = blake3_of(raw)
    if got != d:
        return None, f"directory {d.hex()} is corrupt: its {len(raw)} bytes hash to {got.hex()}"
    try:
        directory = wire.directory_from_bytes(raw)
    except (StoreError, ValueError) as e:
        return None, f"directory {d.hex()} does not parse: {e}"
    if directory.digest != d:
        return None, f"directory {d.hex()} is not canonical (it re-encodes to {directory.digest.hex()})"
    return directory, None


def _check_directories(objects: ObjectStore, rep: VerifyReport, sizes: _Sizes) -> list[B3Digest]:
    """First pass: each Directory by itself (sizes recorded). Returns those that parsed."""
    ok: list[B3Digest] = []
    for o in objects.list("directories/"):
        d = _digest(_name(o.key))
        if d is None:
            continue
        rep.directories += 1
        directory, why = _load_directory(objects, d)
        if why is not None:
            rep.add(why, o.key)
            sizes.bad.add(d)
        elif directory is not None:
            sizes.dirs[d] = directory.size
            ok.append(d)
    return ok


def _check_directory_references(
    objects: ObjectStore, rep: VerifyReport, sizes: _Sizes, parsed: list[B3Digest], complete: bool
) -> None:
    """Second pass (read again: memory stays one Directory): children and files."""
    for d in parsed:
        directory, _ = _load_directory(objects, d)
        if directory is None:
            continue
        name = d.hex()
        for child in directory.directories:
            have = sizes.directory(child.digest)
            if have is None:
                if complete and child.digest not in sizes.bad:
                    rep.add(
                        f"directory {name}: child {_show(child.name)} (directory {child.digest.hex()}) is missing",
                        f"directories/{child.digest.hex()}",
                    )
            elif have != child.size:
                rep.add(
                    f"directory {name}: child {_show(child.name)} declares size {child.size}, "
                    f"directory {child.digest.hex()} has {have}"
                )
        for f in directory.files:
            have = sizes.blob(f.digest)
            if have is None:
                if complete and f.digest not in sizes.bad:
                    rep.add(
                        f"directory {name}: file {_show(f.name)} refers to blob {f.digest.hex()}, which is missing",
                        f"blobs/{f.digest.hex()}",
                    )
            elif have != f.size:
                rep.add(f"directory {name}: file {_show(f.name)} has size {f.size}, blob {f.digest.hex()} has {have}")


def _check_pathinfos(objects: ObjectStore, rep: VerifyReport, sizes: _Sizes, complete: bool) -> None:
    for o in objects.list("pathinfos/"):
        name = _name(o.key)
        try:
            nixbase32.decode(name, HASH_LEN)
        except (ValidationError, ValueError):
            continue  # reported by name
        rep.pathinfos += 1
        raw = objects.get(o.key)
        if raw is None:
            continue
        try:
            info = wire.pathinfo_from_bytes(raw)
            sp = info.validate()
        except (StoreError, ValueError) as e:
            rep.add(f"path info {name} is damaged: {e}", o.key)
            continue
        if nixbase32.encode(sp.digest) != name:
            rep.add(f"path info {name} is filed under the wrong name (it holds {sp})", o.key)
            continue
        node = info.node
        if isinstance(node, DirectoryNode):
            have = sizes.directory(node.digest)
            if have is None:
                if complete and node.digest not in sizes.bad:
                    rep.add(
                        f"path info {name} ({sp}): root directory {node.digest.hex()} is missing",
                        f"directories/{node.digest.hex()}",
                    )
            elif have != node.size:
                rep.add(f"path info {name} ({sp}): root declares size {node.size}, its directory has {have}")
        elif isinstance(node, FileNode):
            have = sizes.blob(node.digest)
            if have is None:
                if complete and node.digest not in sizes.bad:
                    rep.add(
                        f"path info {name} ({sp}): root blob {node.digest.hex()} is missing",
                        f"blobs/{node.digest.hex()}",
                    )
            elif have != node.size:
                rep.add(f"path info {name} ({sp}): root file has size {node.size}, its blob has {have}")


# --- repair -----------------------------------------------------------------------------------


@dataclass
class RepairReport:
    """One line per object repaired and per object that could not be."""

    repaired: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class _Repair:
    def __init__(self, objects: ObjectStore, source: Store, say: Callable[[str], None] | None) -> None:
        self.objects = objects
        self.source = source
        self.rep = RepairReport()
        self.say = say
        self.done: set[str] = set()
        self.queue: deque[str] = deque()
        self.src_name = source.url or "the source"

    def ok(self, line: str) -> None:
        self.rep.repaired.append(line)
        if self.say is not None:
            self.say(line)

    def fail(self, line: str) -> None:
        self.rep.failed.append(line)
        if self.say is not None:
            self.say(line)

    def want(self, key: str) -> None:
        if key not in self.done:
            self.queue.append(key)

    def run(self) -> RepairReport:
        while self.queue:
            key = self.queue.popleft()
            if key in self.done:
                continue
            self.done.add(key)
            kind, name = key.split("/", 1)
            try:
                if kind == "chunks":
                    self.chunk(B3Digest.from_hex(name))
                elif kind == "blobs":
                    self.blob(B3Digest.from_hex(name))
                elif kind == "directories":
                    self.directory(B3Digest.from_hex(name))
                else:
                    self.pathinfo(name)
            except StoreError as e:
                self.fail(f"cannot repair {key}: {' '.join(str(e).split())}")
        return self.rep

    # each returns after writing the object, or fails with StoreError saying why not
    def chunk(self, d: B3Digest) -> None:
        data = self.source.blobs.read_chunk(d)
        if data is None:
            raise StoreError(f"{self.src_name} does not have it")
        if blake3_of(data) != d:
            raise StoreError(f"the copy from {self.src_name} does not verify either")
        self.objects.put(f"chunks/{d.hex()}", data, replace=True)
        self.ok(f"repaired chunks/{d.hex()} from {self.src_name}")

    def blob(self, d: B3Digest) -> None:
        """A whole blob: streamed from the source into this store's writer (chunked here,
        verified against `d`); a damaged chunk list of it is replaced."""
        reader = self.source.blobs.open_read(d)
        if reader is None:
            raise StoreError(f"{self.src_name} does not have it")
        key = f"blobs/{d.hex()}"
        old = self.objects.get(key)
        local = ObjectBlobService(self.objects)
        with reader, local.open_write() as w:
            while buf := reader.read(1 << 20):
                w.write(buf)
            # the writer keeps an existing list: a damaged one must go first
            if old is not None:
                self.objects.delete(key)
            got = w.close()
        if got != d:
            raise StoreError(f"the copy from {self.src_name} hashes to {got.hex()}")
        self._repair_chunks_of(d)
        self.ok(f"repaired blob {d.hex()} from {self.src_name}")

    def _repair_chunks_of(self, d: B3Digest) -> None:
        """Chunks the (new) list names that this store has in a bad copy: fetch them too."""
        raw = self.objects.get(f"blobs/{d.hex()}")
        if raw is None:
            return
        for c in decode_chunk_list(raw, d.hex()):
            data = self.objects.get(f"chunks/{c.digest.hex()}")
            if data is None or blake3_of(data) != c.digest:
                self.want(f"chunks/{c.digest.hex()}")

    def directory(self, d: B3Digest) -> None:
        got = self.source.directories.get(d)
        if got is None:
            raise StoreError(f"{self.src_name} does not have it")
        if got.digest != d:
            raise StoreError(f"the copy from {self.src_name} hashes to {got.digest.hex()}")
        for child in got.directories:
            if self.objects.stat(f"directories/{child.digest.hex()}") is None:
                self.want(f"directories/{child.digest.hex()}")
        for f in got.files:
            if (
                self.objects.stat(f"chunks/{f.digest.hex()}") is None
                and self.objects.stat(f"blobs/{f.digest.hex()}") is None
            ):
                self.want(f"blobs/{f.digest.hex()}")
        self.objects.put(f"directories/{d.hex()}", got.encoded, replace=True)
        self.ok(f"repaired directories/{d.hex()} from {self.src_name}")

    def _has_blob(self, d: B3Digest) -> bool:
        return self.objects.stat(f"chunks/{d.hex()}") is not None or self.objects.stat(f"blobs/{d.hex()}") is not None

    def pathinfo(self, name: str) -> None:
        try:
            h = nixbase32.decode(name, HASH_LEN)
        except (ValidationError, ValueError):
            raise StoreError("not a store path hash") from None
        info = self.source.pathinfos.get(h)
        if info is None:
            raise StoreError(f"{self.src_name} does not have it")
        sp = info.validate()
        if sp.digest != h:
            raise StoreError(f"{self.src_name} answered with {sp}")
        node = info.node
        if isinstance(node, DirectoryNode) and self.objects.stat(f"directories/{node.digest.hex()}") is None:
            self.want(f"directories/{node.digest.hex()}")
        if isinstance(node, FileNode) and not self._has_blob(node.digest):
            self.want(f"blobs/{node.digest.hex()}")
        self.objects.put(f"pathinfos/{name}", wire.pathinfo_to_bytes(info), replace=True)
        self.ok(f"repaired pathinfos/{name} ({sp}) from {self.src_name}")


def repair(
    objects: ObjectStore, report: VerifyReport, source: Store, say: Callable[[str], None] | None = None
) -> RepairReport:
    """Fetch from `source` a good copy of every object `report` wants (and of what those
    need that this store lacks), verify it, and write it (module docstring). `say` is called
    with each line as it happens."""
    r = _Repair(objects, source, say)
    for key in report.wanted():
        r.want(key)
    return r.run()


__all__ = ["Problem", "RepairReport", "VerifyReport", "repair", "verify_objects"]
