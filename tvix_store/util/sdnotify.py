"""systemd readiness notification (`sd_notify(3)`): `READY=1` once a daemon, nar-bridge or
mount serves, `STOPPING=1` when it begins to shut down, for units of `Type=notify`.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
`$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without that variable
(not started by systemd) every call is a no-op. Failures are ignored: a notification is a
courtesy to the supervisor, never a reason to stop serving. Not a systemd client library
(no watchdog, no fd store).
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=…") to systemd; True if a datagram was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    """The service is up: `READY=1`, its main pid (this process) and a one-line status."""
    return notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")


def stopping() -> bool:
    return notify("STOPPING=1")
