"""`tvix-store copy --from URL --to URL STORE_PATH…`: copy store paths between two stores.

Prints each store path once it is at the destination (copied or already there), and logs one
summary line (what was sent, what the destination already had). A progress bar on a terminal
(`tvix_store.cli.progress`). The copying is `tvix_store.copy`; this module is argument handling
and output only.
"""

from __future__ import annotations

import argparse
import logging

from tvix_store.cli import UsageError
from tvix_store.cli.progress import bar
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import StorePath

log = logging.getLogger("tvix_store.cli.copy")


def run(args: argparse.Namespace) -> int:
    from tvix_store.compose import open_store
    from tvix_store.copy import copy_paths
    from tvix_store.util.progress import Progress

    paths: list[StorePath] = []
    for text in args.store_paths:
        try:
            paths.append(StorePath.parse(text))
        except ValidationError as e:
            raise UsageError(str(e)) from None
    try:
        src = open_store(args.from_url, timeout=args.timeout)
    except ValidationError as e:
        raise UsageError(f"--from: {e}") from None
    with src:
        try:
            dst = open_store(args.to_url, timeout=args.timeout)
        except ValidationError as e:
            raise UsageError(f"--to: {e}") from None
        with dst:
            progress = Progress()
            with bar("copy", progress):
                rep = copy_paths(
                    src, dst, paths, workers=args.workers, progress=progress, say=lambda line: print(line, flush=True)
                )
    log.info(
        "copied %d store paths (%d already there) from %s to %s: %d blobs, %d bytes sent (%d blobs, %d bytes "
        "already there); %d directories sent (%d already there)",
        len(rep.paths_copied),
        len(rep.paths_present),
        src.url,
        dst.url,
        rep.blobs_sent,
        rep.bytes_sent,
        rep.blobs_present,
        rep.bytes_present,
        rep.directories_sent,
        rep.directories_present,
    )
    return 0
