"""PathInfoService client of a remote PathInfoService of any protocol generation
(`snix.store.v1`, `tvix.store.v1` of 2024 or of 2022: the newest the remote serves,
`Remote.codec("pathinfo")`); CalculateNAR runs on the remote (with the root's name emptied for
2024/2025 servers, which require an anonymous root).

A PathInfo without narinfo (allowed in `tvix.store.v1`, refused by `snix.store.v1`) is sent on
the `tvix.store.v1` path even when the remote speaks snix's, where the remote has it (not with
`?protocol=g3`, which then gets snix's refusal).

`iter_all` streams List where the remote's generation has it (2024, 2025), so `path list` and a
mount's `store/` work over gRPC; against a 2022 remote it raises UnsupportedError. The
capability `can_list` is therefore declared (it holds for every remote but a 2022 one).

Every call goes through the store's shared `tvix_store.remote.channel.Remote`. What is
received is validated (IntegrityError otherwise). CalculateNAR's deadline grows with the
work: `timeout` plus one second per 32 MiB for a file node, `6 × timeout` for a directory
node (whose total size is unknown up front).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import DirectoryNode, FileNode, Node
from tvix_store.core.errors import IntegrityError, NotFoundError, UnsupportedError, ValidationError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.protocol.codec import Codec
from tvix_store.protocol.generations import CODECS
from tvix_store.remote.channel import Remote

_RENDER_FAILED = "failed rendering nar"


class GrpcPathInfoService(PathInfoService):
    """PathInfoService over a remote PathInfoService; CalculateNAR runs on the remote."""

    capabilities = Capabilities(is_remote=True, can_list=True)

    def __init__(self, remote: Remote) -> None:
        self._r = remote
        self._stubs: dict[str, Any] = {}

    def _stub(self, c: Codec) -> Any:
        """A stub of the PathInfoService of generation `c` on the shared channel."""
        stub = self._stubs.get(c.tag)
        if stub is None:
            stub = self._stubs[c.tag] = c.pathinfo_grpc.PathInfoServiceStub(self._r.channel)
        return stub

    def _decode(self, c: Codec, msg: Any) -> PathInfo:
        try:
            return c.pathinfo_from_proto(msg)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)

        def get(c: Codec) -> tuple[Codec, Any]:
            req = c.pathinfo.GetPathInfoRequest(by_output_hash=output_hash)
            return c, self._r.unary(self._stub(c).Get, req, f"path info Get {output_hash.hex()}")

        c, resp = self._r.negotiate("pathinfo", get)
        if resp is None:
            return None
        try:
            return c.pathinfo_from_proto(resp)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        what = f"path info Put {sp.basename}"

        def put(c: Codec) -> tuple[Codec, Any]:
            return c, self._r.unary(self._stub(c).Put, c.pathinfo_to_proto(info), what, none_if_absent=False)

        c, _ = self._r.negotiation.candidate("pathinfo")
        if info.narinfo is None and c.tag == "g3" and self._r.negotiation.forced is None:
            # snix.store.v1 requires a narinfo; tvix.store.v1 (2024 and 2022) does not
            try:
                c, resp = put(CODECS["g2"])
            except UnsupportedError:
                raise ValidationError(
                    f"remote store {self._r.name} speaks only snix.store.v1, which requires a narinfo: {what}"
                ) from None
        else:
            c, resp = self._r.negotiate("pathinfo", put)
        return self._decode(c, resp)

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        t = self._r.timeout
        if isinstance(node, FileNode):
            t += node.size / (32 << 20)
        elif isinstance(node, DirectoryNode):
            t *= 6

        def calculate(c: Codec) -> Any:
            req = c.node_to_proto(node if c.tag == "g1" else node.renamed(b""))
            return self._r.unary(self._stub(c).CalculateNAR, req, "CalculateNAR", timeout=t, none_if_absent=False)

        try:
            resp = self._r.negotiate("pathinfo", calculate)
        except IntegrityError as e:
            # snix (and this project's snix path) answer a NAR that cannot be rendered, e.g. for a
            # missing blob or Directory, DATA_LOSS "storage error: failed rendering nar: …"
            if _RENDER_FAILED in str(e):
                raise NotFoundError(str(e)) from None
            raise
        if len(resp.nar_sha256) != 32:
            raise IntegrityError(f"remote store {self._r.name} sent a NAR sha256 of {len(resp.nar_sha256)} bytes")
        return resp.nar_size, bytes(resp.nar_sha256)

    def iter_all(self) -> Iterator[PathInfo]:
        """Every PathInfo of the remote (List, one stream), each validated; UnsupportedError
        where the remote has no List (a 2022 server, or one over a store that cannot list)."""
        c = self._r.codec("pathinfo")  # List's UNIMPLEMENTED is no reason to try another generation
        if not c.has_list:
            raise UnsupportedError(f"remote store {self._r.name} cannot list path infos: {c.title} has no List")
        try:
            for msg in self._r.server_stream(self._stub(c).List, c.pathinfo.ListPathInfoRequest(), "path info List"):
                yield self._decode(c, msg)
        except UnsupportedError as e:
            raise UnsupportedError(
                f"remote store {self._r.name} cannot list path infos (a 2022 tvix.store.v1 server has no List): {e}"
            ) from None

    def available(self) -> bool:
        return not self._r.is_down

    def close(self) -> None:
        self._r.close()
