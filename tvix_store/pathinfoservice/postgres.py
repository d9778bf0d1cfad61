"""PathInfoService in PostgreSQL (`postgresql://…`): one row per store path.

Table `pathinfos` (hash: the 20-byte store path hash, data: the PathInfo protobuf), owned by
`tvix_store.remote.postgres` with the pool. A put of an existing path replaces it (as the
object-store backend; the daemon's admission refuses real changes before they get here).
`get` parses, validates and checks the row is filed under its own hash (IntegrityError
otherwise). `iter_all` lists every path (`path list`, the mount's `store/`, nar-bridge) in hash
order, in pages. NARs are calculated by rendering from the given blob and directory services.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tvix_store import nar
from tvix_store.blobservice import BlobService
from tvix_store.core import nixbase32
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Node
from tvix_store.core.errors import IntegrityError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.directoryservice import DirectoryService
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.protocol import wire
from tvix_store.remote.postgres import Database

PAGE = 1000


class PostgresPathInfoService(PathInfoService):
    """PathInfos in PostgreSQL (see the module docstring). Thread-safe."""

    capabilities = Capabilities(is_remote=True, can_list=True)

    def __init__(self, db: Database, blobs: BlobService, directories: DirectoryService) -> None:
        self.db = db.retain()
        self._blobs = blobs
        self._dirs = directories

    def _decode(self, h: bytes, raw: bytes) -> PathInfo:
        name = nixbase32.encode(h)
        try:
            info = wire.pathinfo_from_bytes(raw)
        except Exception as e:  # noqa: BLE001 - any parse/validation failure means a damaged row
            raise IntegrityError(f"path info {name} in the database is damaged: {e}") from None
        if info.store_path.digest != h:
            raise IntegrityError(f"path info {name} in the database holds {info.store_path}, another store path")
        return info

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)

        def q(cur: Any) -> bytes | None:
            cur.execute("SELECT data FROM pathinfos WHERE hash = %s", (bytes(output_hash),))
            row = cur.fetchone()
            return None if row is None else bytes(row[0])

        raw = self.db.run(f"path info get {nixbase32.encode(output_hash)}", q)
        return None if raw is None else self._decode(bytes(output_hash), raw)

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        data = wire.pathinfo_to_bytes(info)

        def q(cur: Any) -> None:
            cur.execute(
                "INSERT INTO pathinfos (hash, data) VALUES (%s, %s) "
                "ON CONFLICT (hash) DO UPDATE SET data = EXCLUDED.data",
                (bytes(sp.digest), data),
            )

        self.db.run(f"path info put {sp.basename}", q, write=True)
        return info

    def delete(self, output_hash: bytes) -> None:
        check_output_hash(output_hash)
        self.db.run(
            "path info delete",
            lambda cur: cur.execute("DELETE FROM pathinfos WHERE hash = %s", (bytes(output_hash),)),
            write=True,
        )

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return nar.calculate(node, self._blobs, self._dirs)

    def iter_all(self) -> Iterator[PathInfo]:
        after = b""
        while True:

            def q(cur: Any, after: bytes = after) -> list[tuple[bytes, bytes]]:
                cur.execute("SELECT hash, data FROM pathinfos WHERE hash > %s ORDER BY hash LIMIT %s", (after, PAGE))
                return [(bytes(a), bytes(b)) for a, b in cur.fetchall()]

            rows = self.db.run("path info list", q)
            for h, raw in rows:
                try:
                    yield self._decode(h, raw)
                except IntegrityError:
                    continue
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    def close(self) -> None:
        self.db.release()
