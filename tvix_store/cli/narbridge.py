"""`tvix-store nar-bridge`: serve a store as a Nix HTTP binary cache until SIGINT/SIGTERM.

Lifecycle as the daemon's: signal handlers first, open the store, load the signing keys, bind
(`tvix_store.narbridge.server.BridgeServer`), log one `nar-bridge listening on URL` line, wait
for a signal, stop accepting, let in-flight requests finish (up to GRACE_SECONDS; a second
signal cuts that short), close the store, exit 0. `bridge_from_args` is shared with
`daemon --nar-bridge`. Process wiring only: the bridge is `tvix_store.narbridge`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from tvix_store.cli import UsageError
from tvix_store.core.errors import ValidationError
from tvix_store.util import sdnotify

if TYPE_CHECKING:
    from tvix_store.admission import Admission
    from tvix_store.narbridge.server import BridgeServer
    from tvix_store.serve.metrics import HttpMetrics, MetricsServer
    from tvix_store.serve.security import TlsFiles, Tokens
    from tvix_store.store import Store

log = logging.getLogger("tvix_store.cli.narbridge")

#: Seconds in-flight requests may run on after SIGINT/SIGTERM (a second signal cuts it short).
GRACE_SECONDS = 20.0


def bridge_from_args(
    args: argparse.Namespace,
    store: Store,
    listen: str,
    admission: Admission | None = None,
    tls: TlsFiles | None = None,
    tokens: Tokens | None = None,
    metrics: HttpMetrics | None = None,
) -> BridgeServer:
    """A bound and started bridge over `store` (keys, priority, timeouts and `--public-reads`
    from `args`; TLS and tokens as `tvix_store.cli.server_security` checked them)."""
    from tvix_store.narbridge.app import Bridge
    from tvix_store.narbridge.server import BridgeServer
    from tvix_store.narbridge.signing import SigningKey

    keys = []
    for path in args.sign_key_file or ():
        try:
            keys.append(SigningKey.load(path))
        except ValidationError as e:
            raise UsageError(f"--sign-key-file {e}") from None
    try:
        server = BridgeServer(
            Bridge(
                store,
                keys=tuple(keys),
                priority=args.priority,
                admission=admission,
                idle_timeout=args.idle_timeout,
                tokens=tokens,
                public_reads=args.public_reads,
                metrics=metrics,
            ),
            listen,
            grace=GRACE_SECONDS,
            ssl_context=tls.ssl_context() if tls is not None else None,
        )
    except ValidationError as e:
        raise UsageError(str(e)) from None
    server.start()
    return server


def run(args: argparse.Namespace) -> int:
    from tvix_store.cli import server_security

    tls, tokens = server_security(args, [args.listen])
    metrics = start_metrics(args)
    try:
        return _run(args, tls, tokens, metrics)
    finally:
        if metrics is not None:
            metrics.stop()


def start_metrics(args: argparse.Namespace) -> MetricsServer | None:
    """The Prometheus endpoint of `--metrics-listen`, started; None without it (UsageError if malformed)."""
    if not args.metrics_listen:
        return None
    from tvix_store.serve.metrics import MetricsServer

    metrics = MetricsServer()
    try:
        metrics.start(args.metrics_listen)
    except ValidationError as e:
        raise UsageError(str(e)) from None
    return metrics


def _run(args: argparse.Namespace, tls: TlsFiles | None, tokens: Tokens | None, metrics: MetricsServer | None) -> int:
    from tvix_store.cli import open_store_from_args

    stop = install_stop_handlers()
    store = open_store_from_args(args, long_lived=True)
    if metrics is not None:
        metrics.add_store(store.counters.snapshot)
    try:
        server = bridge_from_args(
            args, store, args.listen, tls=tls, tokens=tokens, metrics=metrics.http if metrics is not None else None
        )
        try:
            keys = ", ".join(k.name for k in server.bridge.keys) or "none"
            if tokens is not None:
                access = f"{len(tokens.entries)} tokens" + ("; public reads" if args.public_reads else "")
            else:
                access = "no authentication"
            if metrics is not None:
                access += f"; metrics on {metrics.url}"
            log.info("nar-bridge listening on %s (store %s, signing keys: %s, %s)", server.url, store.url, keys, access)
            sdnotify.ready(f"nar-bridge listening on {server.url}")
            while not stop.wait(1.0):
                pass
            sdnotify.stopping()
        finally:
            stop_gracefully(server)
    finally:
        store.close()
    log.info("stopped")
    return 0


def install_stop_handlers() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def stop_gracefully(server: BridgeServer) -> None:
    """Stop the bridge; a further SIGINT/SIGTERM during the grace period cancels in-flight requests."""

    def hurry(signum: int, frame: FrameType | None) -> None:
        log.warning("second %s: cancelling in-flight requests", signal.Signals(signum).name)
        server.hurry()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, hurry)
    done = threading.Event()
    t = threading.Thread(target=lambda: (server.stop(), done.set()), name="nar-bridge-stop", daemon=True)
    t.start()
    while not done.wait(0.5):
        pass
