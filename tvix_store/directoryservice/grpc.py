"""DirectoryService client of a remote DirectoryService of any protocol generation
(`snix.castore.v1`, `tvix.castore.v1`, `tvix.store.v1`: the newest the remote serves,
`Remote.codec("directory")`).

Every call goes through the store's shared `tvix_store.remote.channel.Remote`. Every Directory
received is verified: it must validate and hash to the digest it was asked for (for a
recursive Get: to the root, or to a digest referenced by a Directory received before, with
the size that reference states); the root a Put answers must be the graph's root. A recursive
Get of a missing root yields nothing (NOT_FOUND from a 2022 server, an empty stream from tvix
and snix).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from tvix_store.core.capabilities import REMOTE
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError, ValidationError
from tvix_store.directoryservice import DirectoryService
from tvix_store.protocol import wire
from tvix_store.protocol.codec import Codec
from tvix_store.remote.channel import Remote


class GrpcDirectoryService(DirectoryService):
    """DirectoryService over a remote DirectoryService; verifies every Directory received."""

    capabilities = REMOTE

    def __init__(self, remote: Remote) -> None:
        self._r = remote
        self._stubs: dict[str, Any] = {}

    def _stub(self, c: Codec) -> Any:
        """A stub of the DirectoryService of generation `c` on the shared channel."""
        stub = self._stubs.get(c.tag)
        if stub is None:
            stub = self._stubs[c.tag] = c.directory_grpc.DirectoryServiceStub(self._r.channel)
        return stub

    def _decode(self, c: Codec, msg: Any) -> Directory:
        try:
            return c.directory_from_proto(msg)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid directory: {e}") from None

    def get(self, digest: B3Digest) -> Directory | None:
        what = f"directory Get {digest.hex()}"

        def get(c: Codec) -> tuple[Codec, list[Any]] | None:
            req = c.directory.GetDirectoryRequest(digest=bytes(digest))
            self._r.check()
            try:
                return c, list(self._stub(c).Get(req, timeout=self._r.timeout))
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                    return None
                raise self._r.failed(e, what) from None

        got = self._r.negotiate("directory", get)
        if got is None:
            return None
        c, msgs = got
        if len(msgs) != 1:
            raise IntegrityError(f"remote store {self._r.name} answered {len(msgs)} directories for {what}")
        d = self._decode(c, msgs[0])
        if d.digest != digest:
            raise IntegrityError(f"remote store {self._r.name} sent directory {d.digest.hex()} for {digest.hex()}")
        return d

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        # the generation is negotiated on the first answer (UNIMPLEMENTED comes before any message)
        end = object()

        def first(c: Codec) -> tuple[Iterator[Directory], object]:
            stream = self._recursive(c, digest)
            return stream, next(stream, end)

        stream, head = self._r.negotiate("directory", first)
        if head is end:
            return
        assert isinstance(head, Directory)
        yield head
        yield from stream

    def _recursive(self, c: Codec, digest: B3Digest) -> Iterator[Directory]:
        stub = self._stub(c)
        req = c.directory.GetDirectoryRequest(digest=bytes(digest), recursive=True)
        expected: dict[B3Digest, int | None] = {digest: None}  # digest → size its reference states
        received: set[B3Digest] = set()
        try:
            for msg in self._r.server_stream(stub.Get, req, f"directory Get {digest.hex()} (recursive)"):
                d = self._decode(c, msg)
                dg = d.digest
                if dg not in expected:
                    raise IntegrityError(
                        f"remote store {self._r.name} sent directory {dg.hex()}, not referenced by any sent before"
                    )
                if (size := expected[dg]) is not None and size != d.size:
                    raise IntegrityError(f"directory {dg.hex()} has size {d.size}, its reference says {size}")
                if dg in received:
                    continue
                received.add(dg)
                for child in d.directories:
                    expected.setdefault(child.digest, child.size)
                yield d
        except NotFoundError:
            if not received:
                return
            raise
        if not received:  # tvix and snix answer a missing root with an empty stream
            return
        missing = expected.keys() - received
        if missing:
            m = next(iter(missing))
            raise NotFoundError(f"directory {m.hex()} (below {digest.hex()}) missing from {self._r.name}")

    def _store(self, directory: Directory) -> None:
        self.put_graph([directory])

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        dirs = list(directories)
        if not dirs:
            raise ValidationError("no directories sent")

        def put(c: Codec) -> Any:
            msgs = (c.directory_to_proto(d) for d in dirs)
            return self._r.client_stream(self._stub(c).Put, msgs, f"directory Put of {len(dirs)}")

        resp = self._r.negotiate("directory", put)
        try:
            root = wire.digest_from_proto(resp.root_digest, "root digest returned by directory Put")
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name}: {e}") from None
        if root != dirs[-1].digest:
            raise IntegrityError(
                f"remote store {self._r.name} answered root {root.hex()} for a graph rooted at {dirs[-1].digest.hex()}"
            )
        return root

    def available(self) -> bool:
        return not self._r.is_down

    def close(self) -> None:
        self._r.close()
