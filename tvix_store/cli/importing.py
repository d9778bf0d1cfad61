"""`tvix-store import PATH…`: import paths, print their store paths; a progress bar on a terminal
(bytes of the tree hashed and uploaded against its total size, then the small files uploaded
after the walk; `tvix_store.cli.progress`)."""

from __future__ import annotations

import argparse
import os
import stat

from tvix_store.cli import open_store_from_args
from tvix_store.cli.progress import bar, enabled
from tvix_store.importer import import_path
from tvix_store.importer.upload import SMALL_PHASE
from tvix_store.util.progress import Progress


def tree_size(path: str) -> int:
    """Bytes of the regular files under `path` (symlinks not followed), as the walk will read them."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class _Feed:
    """The importer's progress callback, into a `Progress` a bar draws."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.small = False
        progress.phase("hashing", total)

    def __call__(self, phase: str, files: int, nbytes: int) -> None:
        if phase == SMALL_PHASE and not self.small:
            self.small = True
            self.progress.phase(SMALL_PHASE, None)
        self.progress.set(nbytes, phase)


def run(args: argparse.Namespace) -> int:
    """`tvix-store import PATH…`: print one store path per PATH, as `nix-store --add` does."""
    show = enabled()
    with open_store_from_args(args) as store:
        for p in args.paths:
            progress = Progress("B")
            feed = _Feed(progress, tree_size(p)) if show else None
            with bar(f"import {os.path.basename(os.path.normpath(p)) or p}", progress):
                info = import_path(store, p, feed)
            print(info.store_path.absolute, flush=True)
    return 0
