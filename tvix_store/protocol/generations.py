"""The protocol generations by tag ("g1", "g2", "g3") and their codecs, newest first where
order matters (a client picks the newest one a server speaks), and the descriptor pool a
server's reflection answers from (`reflection_pool`). Not the conversions
(`wire`, `wire_g2`, `wire_g3`), not the detection of what a server speaks
(`tvix_store.remote.generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

from tvix_store.protocol.codec import TAGS, Codec
from tvix_store.protocol.wire import G1
from tvix_store.protocol.wire_g2 import G2
from tvix_store.protocol.wire_g3 import G3

CODECS: dict[str, Codec] = {"g1": G1, "g2": G2, "g3": G3}
NEWEST_FIRST: tuple[Codec, ...] = (G3, G2, G1)

assert tuple(CODECS) == TAGS


def codec(tag: str) -> Codec:
    """The codec of a tag; KeyError for an unknown one."""
    return CODECS[tag]


def reflection_pool(extra: Sequence[Any] = ()) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding every service of every generation, for reflection: G2 and G3
    whole, G1's Blob and Directory services (their files only: G1's PathInfo files define
    `tvix.store.v1.PathInfo` and `PathInfoService` too, which collide with G2's; the G2
    `PathInfoService`, a superset on the wire, is the one served on that shared path), plus
    the `extra` file descriptors (health, reflection) with their dependencies."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pool.Add(proto)
        added.add(fd.name)

    for fd in (G1.blobstore.DESCRIPTOR, G1.directory.DESCRIPTOR):
        add(fd)
    for c in (G2, G3):
        for fd in (c.blobstore.DESCRIPTOR, c.directory.DESCRIPTOR, c.pathinfo.DESCRIPTOR):
            add(fd)
    for fd in extra:
        add(fd)
    return pool
