"""DirectoryService in the tvix/snix bucket layout (`objectstore+…` URLs), over any `ObjectStore`.

An object `dirs/b3/<d>` holds the whole closure of Directory `d`, root first (encoding:
`tvix_store.protocol.bucket`). snix writes one such object per root it is given, so in its
buckets only roots are addressable; here a put graph writes one object for EVERY Directory
in it (each with its own complete closure), so `get` of any Directory put here works, and
each object is still exactly what snix would write for that root (snix reads them all).
The price is bytes: a Directory is stored once per ancestor (depth × the tree's metadata).

- `get(d)`: the first frame of `dirs/b3/<d>`, which must hash to `d`.
- `get_recursive(d)`: one GET; every frame must hash to the root or to a digest referenced by
  an earlier frame and be a valid, canonically encoded Directory (IntegrityError otherwise),
  as snix's reader checks. Yielded breadth-first (this interface's order, not the stored
  one); a child missing from an object (an incomplete closure) is looked up under its own key.
- `put_graph`: validated whole first (`GraphCheck`); children stored earlier are read back
  (one recursive get each) to complete the closures; objects are written with put-if-absent,
  leaves first, several in flight. A reader never sees a partial object.
- Not a cache's near side (`keep` would need a root's closure), never deletes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest, blake3_of
from tvix_store.core.errors import IntegrityError, NotFoundError, ValidationError
from tvix_store.directoryservice import DirectoryService, GraphCheck
from tvix_store.objects import ObjectStore
from tvix_store.protocol import bucket, wire

INFLIGHT = 8


class BucketDirectoryService(DirectoryService):
    """Directories in the tvix/snix bucket layout (see the module docstring). Thread-safe."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        oc = objects.capabilities
        self.capabilities = Capabilities(is_remote=oc.is_remote, can_list=oc.can_list)
        self._pool = ThreadPoolExecutor(max_workers=INFLIGHT, thread_name_prefix="tvix-bucket-dirs")

    def _load(self, digest: B3Digest) -> list[Directory] | None:
        """The stored closure of `digest`, each frame checked, in stored order; None if absent."""
        raw = self.objects.get(bucket.dir_key(digest))
        if raw is None:
            return None
        allowed = {digest}
        out = []
        for frame in bucket.decode_closure(raw, digest.hex()):
            dg = B3Digest(blake3_of(frame))
            if dg not in allowed:
                raise IntegrityError(f"directory closure {digest.hex()}: unexpected directory {dg.hex()}")
            try:
                d = wire.directory_from_bytes(frame)
            except ValidationError as e:
                raise IntegrityError(f"directory closure {digest.hex()}: {dg.hex()} is invalid: {e}") from None
            if d.digest != dg:
                raise IntegrityError(f"directory closure {digest.hex()}: directory {dg.hex()} is not canonical")
            allowed.update(c.digest for c in d.directories)
            out.append(d)
        return out

    def get(self, digest: B3Digest) -> Directory | None:
        closure = self._load(B3Digest(digest))
        return None if closure is None else closure[0]

    def has(self, digest: B3Digest) -> bool:
        return self.objects.has(bucket.dir_key(digest))

    def _closure_map(self, digest: B3Digest) -> dict[B3Digest, Directory] | None:
        closure = self._load(digest)
        return None if closure is None else {d.digest: d for d in closure}

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        digest = B3Digest(digest)
        known = self._closure_map(digest)
        if known is None:
            return
        yield from self._bfs(digest, known)

    def _bfs(self, root: B3Digest, known: dict[B3Digest, Directory]) -> Iterator[Directory]:
        seen = {root}
        queue: deque[Directory] = deque([known[root]])
        while queue:
            d = queue.popleft()
            yield d
            for child in d.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                if child.digest not in known:
                    more = self._closure_map(child.digest)
                    if more is None:
                        raise NotFoundError(
                            f"directory {child.digest.hex()} (referenced by {d.digest.hex()}) is missing"
                        )
                    known.update(more)
                queue.append(known[child.digest])

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        dirs = list(directories)
        check = GraphCheck(self.known_size)
        order = [d for d in dirs if check.add(d)]
        root = check.finish()
        known = {d.digest: d for d in order}
        for d in order:  # children stored before: their closures complete ours
            for c in d.directories:
                if c.digest not in known:
                    more = self._closure_map(c.digest)
                    if more is None:
                        raise NotFoundError(f"directory {c.digest.hex()} vanished while a graph was put")
                    known.update(more)

        def write(d: Directory) -> None:  # put-if-absent: an object already there stays
            self.objects.put(
                bucket.dir_key(d.digest), bucket.encode_closure(x.encoded for x in self._bfs(d.digest, known))
            )

        for _ in self._pool.map(write, order):  # leaves first, INFLIGHT at a time
            pass
        return root

    def _store(self, directory: Directory) -> None:
        self.put_graph([directory])

    def keep(self, directory: Directory) -> None:
        raise ValidationError("a bucket directory service keeps whole closures only; it cannot be a cache's near side")

    def iter_digests(self) -> Iterator[B3Digest]:
        for o in self.objects.list("dirs/b3/"):
            d = bucket.digest_of_key(o.key)
            if d is not None:
                yield d

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.objects.close()
