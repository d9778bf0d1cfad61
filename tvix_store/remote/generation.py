"""Which protocol generation a remote speaks, per service: `Negotiation`, the state one channel
keeps (PROTOCOL-V2.md §6, the probing way).

Newest first, falling back on UNIMPLEMENTED, and no call spent on detection where it can be
avoided: a service's first real call goes out in the newest generation not yet refused
(`candidate`); an UNIMPLEMENTED answer to it refuses that generation (`refuse`) and the call
is repeated in the next older one; any other answer (a result, NOT_FOUND, INVALID_ARGUMENT…)
confirms the generation for the channel's life (`confirm`). Only calls whose request cannot
be sent twice (a blob writer streaming from its caller) or whose UNIMPLEMENTED means
something else (List on a store that cannot list) need a confirmed generation first; they get
it from a probe (`probe_request`: an all-zero digest, answered NOT_FOUND where the path is
served).

Candidates: Blob and Directory services: `snix.castore.v1` (g3), `tvix.castore.v1` (g2),
`tvix.store.v1` (g1). PathInfoService: `snix.store.v1` (g3), then `tvix.store.v1` spoken with
G2's messages (g2), which 2022 servers parse too (the same bytes for what they can hold; G2's
List is then UNIMPLEMENTED). `?protocol=g1|g2|g3` forces one generation for every service,
confirmed from the start. Services are negotiated independently: one endpoint may serve only
some of them, in different generations.

Not here: the calls (`channel.Remote.negotiate`, the clients), the status → error map.
"""

from __future__ import annotations

import threading
from typing import Any

from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import UnsupportedError
from tvix_store.protocol.codec import TAGS, Codec
from tvix_store.protocol.generations import CODECS

#: the services a store client uses
SERVICES = ("blob", "directory", "pathinfo")

#: the generations tried for each service, newest first
CANDIDATES: dict[str, tuple[str, ...]] = {
    "blob": ("g3", "g2", "g1"),
    "directory": ("g3", "g2", "g1"),
    "pathinfo": ("g3", "g2"),
}


class Negotiation:
    """The generation of each service of one remote: tried newest first, refused on
    UNIMPLEMENTED, confirmed by any other answer (thread-safe; see the module docstring)."""

    def __init__(self, name: str, forced: str | None = None) -> None:
        if forced is not None and forced not in TAGS:
            raise ValueError(f"unknown protocol generation {forced!r}")
        self.name = name
        self.forced = forced
        self._lock = threading.Lock()
        self._left = {s: [forced] if forced else list(CANDIDATES[s]) for s in SERVICES}
        self._confirmed: dict[str, bool] = dict.fromkeys(SERVICES, forced is not None)

    def candidate(self, service: str) -> tuple[Codec, bool]:
        """The generation to use for `service` now, and whether it is confirmed;
        UnsupportedError when every generation was refused."""
        with self._lock:
            left = self._left[service]
            if not left:
                raise UnsupportedError(
                    f"remote store {self.name} serves no {service} service of any protocol generation"
                )
            return CODECS[left[0]], self._confirmed[service]

    def confirm(self, service: str, tag: str) -> None:
        with self._lock:
            left = self._left[service]
            if left and left[0] == tag:
                self._confirmed[service] = True

    def refuse(self, service: str, tag: str) -> None:
        """`tag` answered UNIMPLEMENTED for `service`: try the next older one."""
        with self._lock:
            left = self._left[service]
            if left and left[0] == tag and not self._confirmed[service]:
                left.pop(0)

    def known(self) -> dict[str, str | None]:
        """Each service's confirmed generation (None while not confirmed or none served)."""
        with self._lock:
            return {s: (self._left[s][0] if self._confirmed[s] and self._left[s] else None) for s in SERVICES}


def probe_request(service: str, c: Codec) -> tuple[str, Any]:
    """(method name, request) of a call that asks `service` in generation `c` for an absent
    object: NOT_FOUND where that path is served, UNIMPLEMENTED where it is not."""
    if service == "blob":
        return "Stat", c.stat_request(B3Digest(bytes(32)), False)
    if service == "directory":
        return "Get", c.directory.GetDirectoryRequest(digest=bytes(32))
    return "Get", c.pathinfo.GetPathInfoRequest(by_output_hash=bytes(20))
