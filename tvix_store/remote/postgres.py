"""`Database`: a PostgreSQL connection pool with deadlines, the schema, and the error map.

Used by the `postgresql://` Directory and PathInfo services
(`directoryservice.postgres`, `pathinfoservice.postgres`); one `Database` per URL, shared by
both (reference counted: the last service to close closes the pool).

- URLs are libpq connection URIs, including a unix socket directory:
  `postgresql://USER@/DB?host=/run/postgresql&port=5432`, or `postgresql://USER:PW@HOST:PORT/DB`.
  Messages name the URL without its password.
- Deadlines: `connect_timeout`, the pool's wait for a connection, and `statement_timeout` on
  every session are all the store's `--timeout`; a database that is down, unreachable or
  too slow is an UnavailableError within about that time. Connections are checked when
  taken from the pool, so a restarted server is used again without a restart here.
- Schema: created on first use, versioned (`tvix_schema.version`, `SCHEMA_VERSION`) under an
  advisory lock (several daemons may start at once); a newer schema than this code knows is
  refused, an older one upgraded in one transaction.

Not here: what the tables mean (the services), caching.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from tvix_store.core.errors import StoreError, UnavailableError, ValidationError
from tvix_store.util.urls import redact

T = TypeVar("T")


# the pool logs each failed reconnection as a warning with libpq's multi-line text; the caller
# gets one UnavailableError naming the database and the reason instead (the CLI prints one line)
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
_names = itertools.count()

SCHEMA_VERSION = 1
_LOCK = 0x74766978  # "tvix": the advisory lock of schema changes

#: version → statements that bring the schema from version-1 to it
MIGRATIONS: dict[int, list[str]] = {
    1: [
        # a Directory by digest: its canonical protobuf encoding and its size (for graph checks)
        "CREATE TABLE directories (digest bytea PRIMARY KEY, size bigint NOT NULL, data bytea NOT NULL)",
        # parent → child Directory references: a closure in one recursive query
        "CREATE TABLE directory_children (parent bytea NOT NULL, child bytea NOT NULL, PRIMARY KEY (parent, child))",
        # a PathInfo by the 20-byte hash of its store path: its protobuf encoding
        "CREATE TABLE pathinfos (hash bytea PRIMARY KEY, data bytea NOT NULL)",
    ],
}


class Database:
    """A pool of connections to one database (see the module docstring). Thread-safe."""

    def __init__(self, url: str, timeout: float = 10.0, max_size: int = 8) -> None:
        self.name = redact(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as e:
            raise ValidationError(f"invalid store URL {self.name!r}: {str(e).strip().splitlines()[0]}") from None
        self.timeout = timeout
        self._url = url
        self._max = max_size
        self._kwargs = {
            "connect_timeout": max(2, round(timeout / 2)),
            "options": f"-c statement_timeout={max(1, int(timeout * 1000))}",
        }
        self._pool = self._new_pool()
        self._refs = 0
        self._ready = False
        self._lock = threading.Lock()

    def _new_pool(self) -> psycopg_pool.ConnectionPool:
        pool = psycopg_pool.ConnectionPool(
            self._url,
            min_size=1,
            max_size=self._max,
            timeout=max(1.0, self.timeout / 2),  # the other half: `_probe` when it runs out
            kwargs=self._kwargs,
            check=psycopg_pool.ConnectionPool.check_connection,
            open=False,
            name=f"tvix-store-{next(_names)}",
        )
        pool.open(wait=False)
        return pool

    def _probe(self) -> str | None:
        """Why a new connection fails now, or None if one works (the pool's own reconnection
        backs off exponentially: after a long outage it would lag behind a server that is back)."""
        try:
            psycopg.connect(self._url, **self._kwargs).close()  # type: ignore[arg-type]
        except psycopg.Error as e:
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None

    def _renew(self, stale: psycopg_pool.ConnectionPool) -> None:
        with self._lock:
            if self._pool is not stale:
                return  # another thread did it
            self._pool = self._new_pool()
        stale.close(timeout=0)

    def retain(self) -> Database:
        with self._lock:
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs <= 0
        if last:
            self._pool.close(timeout=1)

    def close_if_unused(self) -> None:
        """Close the pool unless a service holds it (an opener whose services were never made)."""
        with self._lock:
            unused = self._refs <= 0
        if unused:
            self._pool.close(timeout=1)

    def _failed(self, e: Exception, what: str) -> StoreError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, psycopg_pool.PoolTimeout | psycopg.OperationalError):
            return UnavailableError(f"database {self.name} unavailable ({what}): {msg}")
        return StoreError(f"database {self.name} failed {what}: {msg}")

    def run(self, what: str, fn: Callable[[Any], T], *, write: bool = False) -> T:
        """`fn(cursor)` in one transaction (committed if it returns); errors mapped. When no
        connection comes within half the deadline, one direct attempt says why (or, if the
        server is back, the pool is renewed and the call made once more)."""
        pool = self._pool
        try:
            return self._once(pool, fn)
        except StoreError:
            raise
        except psycopg_pool.PoolTimeout:
            why = self._probe()
            if why is not None:
                raise UnavailableError(f"database {self.name} unavailable ({what}): {why}") from None
            self._renew(pool)
            try:
                return self._once(self._pool, fn)
            except StoreError:
                raise
            except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
                raise self._failed(e, what) from None
        except psycopg.Error as e:
            raise self._failed(e, what) from None

    def _once(self, pool: psycopg_pool.ConnectionPool, fn: Callable[[Any], T]) -> T:
        if not self._ready:
            self._migrate(pool)
        with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            return fn(cur)

    def _migrate(self, pool: psycopg_pool.ConnectionPool) -> None:
        with self._lock:
            if self._ready:
                return
            with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                cur.execute("CREATE TABLE IF NOT EXISTS tvix_schema (version integer NOT NULL)")
                cur.execute("SELECT max(version) FROM tvix_schema")
                row = cur.fetchone()
                have = row[0] if row and row[0] is not None else 0
                if have > SCHEMA_VERSION:
                    raise StoreError(
                        f"database {self.name} has schema version {have}; this tvix-store knows up to "
                        f"{SCHEMA_VERSION}: upgrade tvix-store"
                    )
                for v in range(have + 1, SCHEMA_VERSION + 1):
                    for stmt in MIGRATIONS[v]:
                        cur.execute(stmt)
                if have < SCHEMA_VERSION:
                    cur.execute("DELETE FROM tvix_schema")
                    cur.execute("INSERT INTO tvix_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            self._ready = True
