"""The DirectoryService interface: Directory messages of the Merkle DAG, by digest.

Backends are sibling modules (`memory`, `objects`, `grpc`, `cached`). Contract:
- `get(d)` is None when absent; a stored Directory always hashes to its digest
  (backends that read from disk or a network check it, raising IntegrityError).
- `put(dir)` validates the Directory and requires every child Directory to be stored
  already (ValidationError otherwise), with matching sizes.
- `put_graph(dirs)` takes a graph leaves-first (each Directory only references ones
  before it or already stored), validates all of it before storing any of it (`GraphCheck`), and
  returns the root (last) digest; a graph with more than one root is rejected.
- `get_recursive(d)` yields the closure breadth-first, each Directory once, each after
  one that references it; it yields nothing if `d` is absent, and raises NotFoundError
  if a referenced child is missing.
- `capabilities` declares what callers may rely on (`tvix_store.core.capabilities`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from tvix_store.core.capabilities import LOCAL, Capabilities
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import NotFoundError, StoreError, ValidationError

KnownSize = Callable[[B3Digest], int | None]


class DirectoryService(ABC):
    capabilities: Capabilities = LOCAL

    @abstractmethod
    def get(self, digest: B3Digest) -> Directory | None:
        """The Directory with this digest, or None."""

    @abstractmethod
    def _store(self, directory: Directory) -> None:
        """Store an already validated Directory (idempotent, atomic per Directory)."""

    def has(self, digest: B3Digest) -> bool:
        return self.get(digest) is not None

    def put(self, directory: Directory) -> B3Digest:
        """Validate and store one Directory whose children are all stored already."""
        return self.put_graph([directory])

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        """Validate a leaves-first graph completely, then store it; returns the root digest.

        A re-iterable `directories` (a list, a spool) is read twice, checked in memory
        proportional to its count; a one-shot iterator is held in a list first."""
        if iter(directories) is directories:
            directories = list(directories)
        check = GraphCheck(self.known_size)
        for d in directories:
            check.add(d)
        root = check.finish()
        for d in directories:
            self._store(d)
        return root

    def known_size(self, digest: B3Digest) -> int | None:
        """The size of a stored Directory, or None."""
        d = self.get(digest)
        return None if d is None else d.size

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        """The closure of `digest`, breadth-first, each once (see module docstring)."""
        root = self.get(digest)
        if root is None:
            return
        seen = {digest}
        queue: deque[Directory] = deque([root])
        while queue:
            d = queue.popleft()
            yield d
            for child in d.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                c = self.get(child.digest)
                if c is None:
                    raise NotFoundError(f"directory {child.digest.hex()} (referenced by {d.digest.hex()}) is missing")
                queue.append(c)

    def keep(self, directory: Directory) -> None:
        """Keep a Directory fetched and verified elsewhere, without asking for its children
        (a cache's near side holds parts of closures)."""
        self._store(directory)

    def delete(self, digest: B3Digest) -> None:
        """Forget one Directory (whoever references it is not checked)."""
        raise StoreError(f"{type(self).__name__} cannot delete")

    def available(self) -> bool:
        """False while the backend is known to be unreachable (a remote that is down)."""
        return True

    def iter_digests(self) -> Iterator[B3Digest]:
        """The Directories this backend can enumerate cheaply (may be none)."""
        return iter(())

    def close(self) -> None:
        """Release resources."""


class GraphCheck:
    """Incremental check of a leaves-first stream of Directories (the rules of `validate_graph`),
    keeping only each Directory's digest and size: a stream of any length is checked in memory
    proportional to its count, not its bytes."""

    def __init__(self, known_size: KnownSize) -> None:
        self._known_size = known_size
        self._sizes: dict[B3Digest, int] = {}
        self._unreferenced: set[B3Digest] = set()
        self._last: B3Digest | None = None

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, d: Directory) -> bool:
        """Check one more Directory; False if it was sent before (resending one is harmless)."""
        d.validate()
        dg = d.digest
        if dg in self._sizes:
            return False
        for child in d.directories:
            size = self._sizes.get(child.digest)
            if size is None:
                size = self._known_size(child.digest)
                if size is None:
                    raise ValidationError(
                        f"directory {dg.hex()} references unknown directory {child.digest.hex()} "
                        f"(name {child.name.decode('utf-8', 'backslashreplace')!r})"
                    )
            if size != child.size:
                raise ValidationError(
                    f"directory {dg.hex()}: entry {child.name.decode('utf-8', 'backslashreplace')!r} has size "
                    f"{child.size}, but directory {child.digest.hex()} has size {size}"
                )
            self._unreferenced.discard(child.digest)
        self._sizes[dg] = d.size
        self._unreferenced.add(dg)
        self._last = dg
        return True

    def finish(self) -> B3Digest:
        """The root's digest, once the whole stream was added; ValidationError if it is no graph."""
        if self._last is None:
            raise ValidationError("no directories sent")
        if len(self._unreferenced) > 1:
            raise ValidationError(f"directory graph has {len(self._unreferenced)} roots, expected one")
        if self._last not in self._unreferenced:
            raise ValidationError("the last directory sent must be the root of the graph")
        return self._last


def validate_graph(directories: Iterable[Directory], known_size: KnownSize) -> list[Directory]:
    """Check a leaves-first stream of Directories; return it (deduplicated) or raise ValidationError.

    Each Directory must validate; each child reference must be to a Directory earlier in
    the stream or already stored (`known_size(d)` not None) with the same size; exactly
    one Directory (the last) may be unreferenced within the stream.
    """
    check = GraphCheck(known_size)
    order = [d for d in directories if check.add(d)]
    check.finish()
    return order
