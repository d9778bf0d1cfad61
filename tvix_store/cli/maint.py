"""`tvix-store gc` and `tvix-store verify`: maintenance of a store's object layer.

- `gc [--dry-run] [--grace DURATION] [--keep STORE_PATH]…`: deletes every Directory, blob
  and chunk no PathInfo (or `--keep` path) reaches, unless written or used within the grace
  period (default 1h), then reclaims the space; prints what it deleted and kept per kind.
  Safe with concurrent imports, daemons and mounts (`tvix_store.gc`, docs/storage.md).
  With `--pathinfo-store URL` (path infos in another store), the roots are exactly the
  `--keep` paths (and any PathInfos of the collected store): they must be named.
- `verify [--repair-from URL]`: re-hashes every object and checks every reference
  (`tvix_store.verify`); one line per problem on stdout, exit 1 if any. With `--repair-from`,
  bad and missing objects are fetched from that store (any URL), verified and written, one
  line each; then the store is verified again, and the exit status says whether it is whole.

Both need the store's object layer (`local://`, the embedded store): a remote store is
collected and verified where it runs. Both draw a progress bar on a terminal
(`tvix_store.cli.progress`). Only argument handling and output here.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

from tvix_store.cli import UsageError, open_store_from_args
from tvix_store.cli.progress import bar
from tvix_store.core.castore import Node
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.core.pathinfo import StorePath
from tvix_store.util.progress import Progress


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes, {n / scale:.1f} {unit}"
    return f"{n} bytes"


def _duration(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    return f"{seconds:g}s"


def gc(args: argparse.Namespace) -> int:
    from tvix_store.gc import collect, objects_of

    keep: list[StorePath] = []
    for text in args.keep:
        try:
            keep.append(StorePath.parse(text))
        except ValidationError as e:
            raise UsageError(f"--keep: {e}") from None
    with open_store_from_args(args) as store:
        objects = objects_of(store, pathinfos=False)
        if objects is None:
            raise StoreError(
                f"gc needs a store whose blobs and Directories are in one embedded store (local:///…), "
                f"not {store.url}: collect a remote store where it runs"
            )
        if objects_of(store) is None and not keep:
            raise StoreError(
                "gc: the path infos are in another store, so gc cannot see them as roots: name every "
                "store path to keep with --keep (or collect a store that holds its path infos)"
            )
        roots: list[Node] = []
        for sp in keep:
            info = store.pathinfos.get(sp.digest)
            if info is None or info.node is None or info.node.name.decode("ascii", "replace") != sp.basename:
                raise StoreError(f"--keep: store path {sp} not found (nothing deleted)")
            roots.append(info.node)
        progress = Progress("objects")
        with bar("gc", progress):
            rep = collect(objects, grace=args.grace, roots=roots, dry_run=args.dry_run, progress=progress)
    verb = "would delete" if rep.dry_run else "deleted"
    out = [f"gc of {store.url}: store paths {rep.pathinfos}, grace {_duration(args.grace)}"]
    for kind, st in rep.kinds.items():
        out.append(f"{kind}: {verb} {st.deleted} ({_size(st.deleted_bytes)}), kept {st.kept} ({_size(st.kept_bytes)})")
    out.append(
        f"total: {verb} {rep.deleted} objects ({_size(rep.deleted_bytes)}) of {rep.scanned} scanned "
        f"({_size(rep.scanned_bytes)}) in {rep.seconds:.2f} s"
    )
    if not rep.dry_run:
        out.append(f"reclaimed: {_size(rep.reclaimed)} more given back by the backend (pack files rewritten or cut)")
    if rep.missing:
        out.append(f"warning: {rep.missing} reachable objects are missing (run tvix-store verify)")
    print("\n".join(out), flush=True)
    return 0


def verify(args: argparse.Namespace) -> int:
    from tvix_store.compose import open_store
    from tvix_store.gc import lock_of, objects_of
    from tvix_store.verify import repair, verify_objects

    with open_store_from_args(args) as store:
        objects = objects_of(store)
        if objects is None:
            raise StoreError(
                f"verify needs a store whose blobs, Directories and path infos are in one embedded store "
                f"(local:///…), not {store.url}: verify a remote store where it runs"
            )
        progress = Progress("B")
        with bar("verify", progress):
            rep = verify_objects(objects, progress=progress)
        for line in rep.problems:
            print(line, flush=True)
        counts = f"{rep.chunks} chunks, {rep.blobs} blobs, {rep.directories} directories, {rep.pathinfos} path infos"
        if rep.ok:
            print(f"ok: {counts}", flush=True)
            return 0
        if not args.repair_from:
            raise StoreError(f"{len(rep.found)} problems in {store.url} ({counts})")
        with open_store(args.repair_from, timeout=args.timeout) as source:
            lock = lock_of(objects)
            with lock.shared() if lock is not None else nullcontext():
                done = repair(objects, rep, source, say=lambda line: print(line, flush=True))
        again = verify_objects(objects)
    if again.ok:
        print(f"ok after repair: {len(done.repaired)} objects repaired", flush=True)
        return 0
    for line in again.problems:
        print(f"still: {line}", flush=True)
    sys.stdout.flush()
    raise StoreError(
        f"{len(again.found)} problems remain in {store.url} after repairing {len(done.repaired)} objects "
        f"from {args.repair_from} ({len(done.failed)} could not be)"
    )
