"""PathInfoService client of a remote `tvix.store.v1` PathInfoService; CalculateNAR runs on
the remote.

Every call goes through the store's shared `tvix_store.remote.channel.Remote`. What is
received is validated (IntegrityError otherwise). CalculateNAR's deadline grows with the
work: `timeout` plus one second per 32 MiB for a file node, `6 × timeout` for a directory
node (whose total size is unknown up front).
"""

from __future__ import annotations

from tvix_store.core.capabilities import REMOTE
from tvix_store.core.castore import DirectoryNode, FileNode, Node
from tvix_store.core.errors import IntegrityError, ValidationError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import pathinfo_pb2, rpc_pathinfo_pb2, rpc_pathinfo_pb2_grpc
from tvix_store.remote.channel import Remote


class GrpcPathInfoService(PathInfoService):
    """PathInfoService over a remote PathInfoService; CalculateNAR runs on the remote."""

    capabilities = REMOTE

    def __init__(self, remote: Remote) -> None:
        self._r = remote
        self._stub = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(remote.channel)

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        req = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=output_hash)
        resp = self._r.unary(self._stub.Get, req, f"path info Get {output_hash.hex()}")
        if resp is None:
            return None
        try:
            return wire.pathinfo_from_proto(resp)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        resp = self._r.unary(
            self._stub.Put, wire.pathinfo_to_proto(info), f"path info Put {sp.basename}", none_if_absent=False
        )
        try:
            return wire.pathinfo_from_proto(resp)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        t = self._r.timeout
        if isinstance(node, FileNode):
            t += node.size / (32 << 20)
        elif isinstance(node, DirectoryNode):
            t *= 6
        req: pathinfo_pb2.Node = wire.node_to_proto(node)
        resp = self._r.unary(self._stub.CalculateNAR, req, "CalculateNAR", timeout=t, none_if_absent=False)
        if len(resp.nar_sha256) != 32:
            raise IntegrityError(f"remote store {self._r.name} sent a NAR sha256 of {len(resp.nar_sha256)} bytes")
        return resp.nar_size, bytes(resp.nar_sha256)

    def available(self) -> bool:
        return not self._r.is_down

    def close(self) -> None:
        self._r.close()
