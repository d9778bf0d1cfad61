"""`tvix-store daemon`: serve a store over gRPC (and optionally mount it) until SIGINT/SIGTERM.

Lifecycle: open the store, bind and start the server (`tvix_store.serve.grpc.StoreServer`),
log one `listening on ADDR` line with the real bound address (after the mount is ready
when `--mount` is given; with `--nar-bridge` the line names its URL too, and the bridge shares
the store and the gRPC server's Admission), wait, then stop accepting, let in-flight calls finish (up to
a grace period), close the store and return 0. A bad or busy address raises StoreError
(one error line, exit 1, from `tvix_store.cli`). `--metrics-listen` serves Prometheus metrics
(`tvix_store.serve.metrics`) from before the store opens until after the server stopped.
This module is process wiring only: the servicers live in `tvix_store.serve.grpc`, the mount in `tvix_fuse.mount`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from tvix_store.core.errors import StoreError
from tvix_store.util import sdnotify

if TYPE_CHECKING:
    from tvix_store.serve.metrics import MetricsServer
    from tvix_store.serve.security import TlsFiles, Tokens

log = logging.getLogger("tvix_store.cli.daemon")

#: Seconds in-flight calls may run on after SIGINT/SIGTERM (a second signal cuts it short).
GRACE_SECONDS = 20.0


def run(args: argparse.Namespace) -> int:
    from tvix_store.cli import server_security
    from tvix_store.cli.narbridge import start_metrics

    tls, tokens = server_security(args, [args.listen, *([args.nar_bridge] if args.nar_bridge else [])])
    metrics = start_metrics(args)
    try:
        return _run(args, tls, tokens, metrics)
    finally:
        if metrics is not None:
            metrics.stop()


def _run(args: argparse.Namespace, tls: TlsFiles | None, tokens: Tokens | None, metrics: MetricsServer | None) -> int:
    from tvix_store.cli import open_store_from_args
    from tvix_store.cli.narbridge import install_stop_handlers
    from tvix_store.serve.grpc import StoreServer

    # handlers first: a signal arriving right after the ready line must already stop us cleanly
    stop = install_stop_handlers()
    store = open_store_from_args(args, long_lived=True)
    if metrics is not None:
        metrics.add_store(store.counters.snapshot)
    try:
        server = StoreServer(
            store,
            max_streams=args.max_streams,
            idle_timeout=args.idle_timeout,
            max_directory_put_count=args.max_directory_put_count,
            max_directory_put_bytes=args.max_directory_put_bytes,
            tokens=tokens,
            interceptors=[metrics.grpc] if metrics is not None else (),
        )
        address = server.bind(args.listen, tls)
        server.start()
        bridge = None
        try:
            note = ""
            if tls is not None:
                note += "; TLS" + (" with client certificates" if tls.client_ca else "")
            if tokens is not None:
                note += f"; {len(tokens.entries)} tokens"
            elif args.insecure:
                note += "; insecure: no authentication"
            if metrics is not None:
                note += f"; metrics on {metrics.url}"
            if args.nar_bridge:
                from tvix_store.cli.narbridge import bridge_from_args

                bridge = bridge_from_args(
                    args,
                    store,
                    args.nar_bridge,
                    admission=server.admission,
                    tls=tls,
                    tokens=tokens,
                    metrics=metrics.http if metrics is not None else None,
                )
                note += f"; nar-bridge on {bridge.url}"
            if args.mount:
                if not stop.is_set():
                    _serve_with_mount(store, address, args.mount, args.timeout, note)
            else:
                log.info("listening on %s (store %s%s)", address, store.url or args.store, note)
                sdnotify.ready(f"listening on {address}{note}")
                while not stop.wait(1.0):
                    pass
            sdnotify.stopping()
            log.info("shutting down: finishing in-flight calls (up to %g s)", GRACE_SECONDS)
        finally:
            stopping = None
            if bridge is not None:  # stops accepting at once, finishes its requests beside the gRPC calls
                stopping = threading.Thread(target=bridge.stop, name="nar-bridge-stop", daemon=True)
                stopping.start()
            _stop(server)
            if stopping is not None:
                stopping.join()
    finally:
        store.close()
    log.info("stopped")
    return 0


def _serve_with_mount(store: object, address: str, mountpoint: str, timeout: float, note: str = "") -> None:
    """Mount in this (main) thread until unmounted or signalled; `run_foreground` handles the signals."""
    try:
        from tvix_fuse.mount import run_foreground
    except ImportError as e:
        raise StoreError(f"--mount is not available: {e}") from None

    def ready() -> None:
        log.info("listening on %s (mounted at %s%s)", address, mountpoint, note)
        sdnotify.ready(f"listening on {address}, mounted at {mountpoint}{note}")

    run_foreground(store, mountpoint, on_ready=ready, timeout=timeout)  # type: ignore[arg-type]


def _stop(server: object) -> None:
    """Graceful stop; a further SIGINT/SIGTERM during the grace period stops at once."""
    from tvix_store.serve.grpc import StoreServer

    assert isinstance(server, StoreServer)
    done = threading.Event()
    t = threading.Thread(target=lambda: (server.stop(GRACE_SECONDS), done.set()), name="grpc-stop", daemon=True)

    def hurry(signum: int, frame: FrameType | None) -> None:
        log.warning("second %s: cancelling in-flight calls", signal.Signals(signum).name)
        server.stop(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, hurry)
    t.start()
    while not done.wait(0.5):
        pass
