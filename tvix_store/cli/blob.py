"""`tvix-store blob put|cat|stat`: one blob in, out, or described."""

from __future__ import annotations

import argparse
import sys

from tvix_store.cli import StoreNotFound, open_store_from_args
from tvix_store.gc import writing


def put(args: argparse.Namespace) -> int:
    with open_store_from_args(args) as store:
        src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        try:
            with writing(store), store.blobs.open_write() as w:
                while buf := src.read(1 << 20):
                    w.write(buf)
            digest = w.close()
        finally:
            if src is not sys.stdin.buffer:
                src.close()
    print(digest.hex())
    return 0


def cat(args: argparse.Namespace) -> int:
    with open_store_from_args(args) as store:
        reader = store.blobs.open_read(args.digest)
        if reader is None:
            raise StoreNotFound(f"blob {args.digest.hex()} not found")
        out = sys.stdout.buffer
        with reader:
            while buf := reader.read(1 << 20):
                out.write(buf)
        out.flush()
    return 0


def stat(args: argparse.Namespace) -> int:
    with open_store_from_args(args) as store:
        chunks = store.blobs.chunks(args.digest)
    if chunks is None:
        raise StoreNotFound(f"blob {args.digest.hex()} not found")
    print(sum(c.size for c in chunks))
    if args.chunks:
        for c in chunks:
            print(f"{c.digest.hex()} {c.size}")
    return 0
