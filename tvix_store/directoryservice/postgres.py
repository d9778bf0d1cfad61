"""DirectoryService in PostgreSQL (`postgresql://…`): one row per Directory, plus its edges.

Tables (`tvix_store.remote.postgres`, which owns the schema and the pool): `directories`
(digest, size, canonical protobuf encoding) and `directory_children` (parent, child).

- `put_graph`: the whole graph validated first (`GraphCheck`, sizes of earlier Directories
  from the table), then inserted in ONE transaction (`ON CONFLICT DO NOTHING`): other readers
  see all of it or none of it.
- `get`: the row, re-hashed and parsed (IntegrityError if either fails).
- `get_recursive`: the closure in one recursive query, then yielded breadth-first from it.
- Every call has the store's deadline; a database that is down is an UnavailableError.
Not a cache, no deletes of referenced rows are checked (like every DirectoryService).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest, check_digest
from tvix_store.core.errors import IntegrityError, NotFoundError, ValidationError
from tvix_store.directoryservice import DirectoryService, GraphCheck
from tvix_store.protocol import wire
from tvix_store.remote.postgres import Database

_CLOSURE = """
WITH RECURSIVE closure(digest) AS (
    SELECT %s::bytea
    UNION
    SELECT c.child FROM directory_children c JOIN closure ON c.parent = closure.digest
)
SELECT d.digest, d.data FROM directories d JOIN closure USING (digest)
"""


class PostgresDirectoryService(DirectoryService):
    """Directories in PostgreSQL (see the module docstring). Thread-safe."""

    capabilities = Capabilities(is_remote=True, can_list=True)

    def __init__(self, db: Database) -> None:
        self.db = db.retain()

    def _decode(self, digest: bytes, raw: bytes) -> Directory:
        d = B3Digest(digest)
        check_digest("directory", d, raw)
        try:
            out = wire.directory_from_bytes(raw)
        except ValidationError as e:
            raise IntegrityError(f"directory {d.hex()} in the database does not parse: {e}") from None
        if out.digest != d:
            raise IntegrityError(f"directory {d.hex()} in the database is not canonical")
        return out

    def get(self, digest: B3Digest) -> Directory | None:
        digest = B3Digest(digest)

        def q(cur: Any) -> bytes | None:
            cur.execute("SELECT data FROM directories WHERE digest = %s", (bytes(digest),))
            row = cur.fetchone()
            return None if row is None else bytes(row[0])

        raw = self.db.run(f"directory get {digest.hex()}", q)
        return None if raw is None else self._decode(digest, raw)

    def has(self, digest: B3Digest) -> bool:
        return self.known_size(digest) is not None

    def known_size(self, digest: B3Digest) -> int | None:
        def q(cur: Any) -> int | None:
            cur.execute("SELECT size FROM directories WHERE digest = %s", (bytes(digest),))
            row = cur.fetchone()
            return None if row is None else int(row[0])

        return self.db.run(f"directory size {B3Digest(digest).hex()}", q)

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        digest = B3Digest(digest)

        def q(cur: Any) -> list[tuple[bytes, bytes]]:
            cur.execute(_CLOSURE, (bytes(digest),))
            return [(bytes(a), bytes(b)) for a, b in cur.fetchall()]

        rows = self.db.run(f"directory closure {digest.hex()}", q)
        known = {B3Digest(k): self._decode(k, v) for k, v in rows}
        if digest not in known:
            return
        seen = {digest}
        queue: deque[Directory] = deque([known[digest]])
        while queue:
            d = queue.popleft()
            yield d
            for child in d.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                c = known.get(child.digest)
                if c is None:
                    raise NotFoundError(f"directory {child.digest.hex()} (referenced by {d.digest.hex()}) is missing")
                queue.append(c)

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        dirs = list(directories)
        check = GraphCheck(self.known_size)
        order = [d for d in dirs if check.add(d)]
        root = check.finish()
        rows = [(bytes(d.digest), d.size, d.encoded) for d in order]
        edges = sorted({(bytes(d.digest), bytes(c.digest)) for d in order for c in d.directories})

        def q(cur: Any) -> None:
            cur.executemany(
                "INSERT INTO directories (digest, size, data) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", rows
            )
            if edges:
                cur.executemany(
                    "INSERT INTO directory_children (parent, child) VALUES (%s, %s) ON CONFLICT DO NOTHING", edges
                )

        self.db.run(f"directory put of {len(rows)}", q, write=True)
        return root

    def _store(self, directory: Directory) -> None:
        self.put_graph([directory])

    def keep(self, directory: Directory) -> None:
        raise ValidationError("a PostgreSQL directory service is not a cache's near side")

    def delete(self, digest: B3Digest) -> None:
        def q(cur: Any) -> None:
            cur.execute("DELETE FROM directory_children WHERE parent = %s", (bytes(digest),))
            cur.execute("DELETE FROM directories WHERE digest = %s", (bytes(digest),))

        self.db.run(f"directory delete {B3Digest(digest).hex()}", q, write=True)

    def iter_digests(self) -> Iterator[B3Digest]:
        def q(cur: Any) -> list[bytes]:
            cur.execute("SELECT digest FROM directories")
            return [bytes(r[0]) for r in cur.fetchall()]

        for d in self.db.run("directory list", q):
            yield B3Digest(d)

    def close(self) -> None:
        self.db.release()
