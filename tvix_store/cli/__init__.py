"""The `tvix-store` command line: argument parsing, dispatch, and the one error→exit map.

This package is the top layer: the only place that wires `tvix_store` and `tvix_fuse`
together. One module per command group (`blob`, `nar`, `importing`, `daemon`, `mount`,
`paths` for `path list|info|rm`, `maint` for `gc` and `verify`, `narbridge`, `copy`; and
`progress`, the bars on a terminal); this module holds the parser, the options every
store-opening command shares (`--store` and the per-service overrides `--blob-store`,
`--directory-store`, `--pathinfo-store`, `--timeout`, and for the mount `--cache-dir`/
`--cache-size`: accepted before or after the subcommand, with `--log-level`), the security
options of the servers (`--tls-*`, `--auth-tokens`, `--public-reads`, `--insecure`, checked by
`server_security`), `--version` and `main`.

Exit status: 0 success, 1 operational error, 2 usage error. Errors are one line on
stderr (`tvix-store: error: …`); a traceback only with `--log-level debug`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import StoreError, ValidationError

if TYPE_CHECKING:
    from tvix_store.serve.security import TlsFiles, Tokens
    from tvix_store.store import Store

log = logging.getLogger("tvix_store")
PROG = "tvix-store"


class UsageError(Exception):
    """A command-line value is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`tvix-store: error: …`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _digest_arg(text: str) -> B3Digest:
    try:
        return B3Digest.parse(text)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes with optional K/M/G suffix") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be positive")
    return v


def _duration_arg(text: str) -> float:
    from tvix_store.gc import parse_duration

    try:
        return parse_duration(text)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be positive")
    return v


def _add_store(p: argparse.ArgumentParser, cache: bool = False, *, top: bool = False) -> None:
    """The store options. On the top-level parser (`top`) they carry the defaults; on a
    subcommand they default to nothing (`SUPPRESS`), so they are accepted before or after the
    subcommand, and the one given after wins."""

    def dflt(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "--store",
        default=dflt(os.environ.get("TVIX_STORE_URL")),
        metavar="URL",
        help="store URL: local:///path (default: $TVIX_STORE_DIR or ~/.local/share/tvix-store), memory://, "
        "grpc+http://HOST:PORT, grpc+https://HOST:PORT[?ca=FILE&token_file=FILE], grpc+unix:///path.sock "
        "(env TVIX_STORE_URL); for one service only (the options below): objectstore+s3://BUCKET[/PREFIX][?OPTS], "
        "objectstore+file:///path, objectstore+http(s)://HOST/PREFIX (blobs, Directories), postgresql://… "
        "(Directories, path infos)",
    )
    for service, what in (("blob", "blobs"), ("directory", "Directories"), ("pathinfo", "path infos")):
        p.add_argument(
            f"--{service}-store",
            metavar="URL",
            default=dflt(None),
            help=f"take {what} from this store URL instead of --store",
        )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=dflt(10.0),
        metavar="SECONDS",
        help="deadline of remote calls (default 10)",
    )
    if cache:
        p.add_argument(
            "--cache-dir",
            default=dflt(None),
            metavar="DIR",
            help="persistent local cache in front of the remote services (mount only)",
        )
        p.add_argument(
            "--cache-size",
            type=_size_arg,
            default=dflt(None),
            metavar="BYTES",
            help="bound of the cache (suffixes K/M/G; default 10G on disk, 256M in memory without --cache-dir)",
        )


def _add_log_level(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=os.environ.get("TVIX_LOG_LEVEL", "info") if top else argparse.SUPPRESS,
        help="log verbosity (default info; env TVIX_LOG_LEVEL)",
    )


def _leaf_parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser under `p` that has no subcommands of its own."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        yield p
        return
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("tvix-store")
    except PackageNotFoundError:
        v = "unknown"
    return f"{PROG} {v} (protocol generations served: tvix.store.v1)"


def _add_bridge(p: argparse.ArgumentParser) -> None:
    """The options of the HTTP binary cache (`nar-bridge`, `daemon --nar-bridge`)."""
    p.add_argument(
        "--sign-key-file",
        action="append",
        metavar="FILE",
        help="sign every narinfo served with this key (from nix-store --generate-binary-cache-key); repeatable",
    )
    p.add_argument(
        "--priority", type=int, default=39, metavar="N", help="Priority in nix-cache-info (default 39; lower first)"
    )


def _add_security(p: argparse.ArgumentParser) -> None:
    """TLS, tokens and the network-exposure guard of a server (`daemon`, `nar-bridge`)."""
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain (with --tls-key)")
    g.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca", metavar="FILE", help="mutual TLS: clients must present a certificate this CA signed"
    )
    g.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="require a bearer token: one 'TOKEN ro|rw' a line (ro: reads only; rw: reads and writes)",
    )
    g.add_argument(
        "--public-reads",
        action="store_true",
        help="nar-bridge: downloads need no token (uploads still need an rw token)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a network address without TLS and authentication",
    )


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (calls and requests by method and status, "
        "durations, bytes, the store's cache and remote counters)",
    )


def server_security(args: argparse.Namespace, listens: Sequence[str]) -> tuple[TlsFiles | None, Tokens | None]:
    """The TLS files and tokens the options name, checked (UsageError), and the guard: listening
    on a non-loopback address of `listens` needs TLS and authentication unless `--insecure`."""
    from tvix_store.serve.security import TlsFiles, Tokens, exposure_problem

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = tokens = None
    try:
        if args.tls_cert:
            tls = TlsFiles.load(args.tls_cert, args.tls_key, args.tls_client_ca)
            tls.ssl_context()  # a key that does not match the certificate is refused here
        if args.auth_tokens:
            tokens = Tokens.load(args.auth_tokens)
    except ValidationError as e:
        raise UsageError(str(e)) from None
    if not args.insecure:
        for listen in listens:
            host = _listen_host(listen)
            problem = exposure_problem(host, tls=tls is not None, auth=tokens is not None or bool(args.tls_client_ca))
            if problem is not None:
                raise UsageError(problem)
    return tls, tokens


def _listen_host(listen: str) -> str | None:
    """The host of a listen address (None for a unix socket); UsageError if malformed."""
    if listen.startswith("unix:"):
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid listen address {listen!r}: expected HOST:PORT or unix:/path")
    if host.startswith("[") != host.endswith("]"):
        raise UsageError(f"invalid listen address {listen!r}: unbalanced brackets")
    return host


def open_store_from_args(args: argparse.Namespace, *, long_lived: bool = False, reads_many: bool = False) -> Store:
    """The store the common options name (see `tvix_store.compose.open_store`); `long_lived`
    (a mount, a daemon): remotes fail fast while known to be down, and without `--cache-dir`
    they sit behind an in-memory cache. `reads_many` (a command that reads a whole tree, like
    `nar`): the in-memory cache too, whose batched prefetch fetches the small files ahead of
    the reader (many calls in flight) instead of one round trip per file."""
    from tvix_store.compose import open_store

    try:
        return open_store(
            args.store,
            blob_url=args.blob_store,
            directory_url=args.directory_store,
            pathinfo_url=args.pathinfo_store,
            cache_dir=args.cache_dir,
            cache_size=args.cache_size,
            timeout=args.timeout,
            fail_fast=long_lived,
            memory_cache=long_lived or reads_many,
        )
    except ValidationError as e:  # a malformed or unknown URL, --cache-dir with a local store
        raise UsageError(str(e)) from None


def store_args(args: argparse.Namespace) -> list[str]:
    """The common store options of `args` as command-line arguments (for a child process)."""
    from tvix_store.compose import default_url

    out = ["--store", args.store or default_url(), "--timeout", repr(args.timeout)]
    for opt in ("blob_store", "directory_store", "pathinfo_store"):
        if (value := getattr(args, opt, None)) is not None:
            out += ["--" + opt.replace("_", "-"), value]
    return out


class StoreNotFound(StoreError):
    """A named object is not in the store (exit 1)."""


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A content-addressed store for Nix-style file trees.")
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    _add_log_level(p, top=True)
    _add_store(p, cache=True, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("daemon", help="serve the store over gRPC (and optionally mount it)")
    d.add_argument("--listen", default="127.0.0.1:8000", metavar="ADDR", help="HOST:PORT or unix:/path")
    _add_store(d)
    d.add_argument("--mount", metavar="DIR", help="also mount the store at DIR")
    d.add_argument(
        "--nar-bridge", metavar="ADDR", help="also serve the store as a Nix HTTP binary cache on ADDR (HOST:PORT)"
    )
    _add_bridge(d)
    _add_security(d)
    d.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (gRPC calls by method and status, durations, bytes)",
    )
    d.add_argument(
        "--max-streams",
        type=_positive_int,
        default=128,
        metavar="N",
        help="streaming calls served at once; more are refused with RESOURCE_EXHAUSTED (default 128)",
    )
    d.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="cancel a streaming call that makes no progress for this long (default 60)",
    )
    d.add_argument(
        "--max-directory-put-count",
        type=_positive_int,
        default=1_000_000,
        metavar="N",
        help="Directories in one Put stream at most; more is RESOURCE_EXHAUSTED (default 1000000)",
    )
    d.add_argument(
        "--max-directory-put-bytes",
        type=_size_arg,
        default=1 << 30,
        metavar="BYTES",
        help="encoded bytes of one Directory Put stream at most (suffixes K/M/G; default 1G)",
    )
    d.set_defaults(func=_lazy("tvix_store.cli.daemon", "run"))

    i = sub.add_parser("import", help="ingest paths, print their Nix store paths")
    _add_store(i)
    i.add_argument("paths", nargs="+", metavar="PATH")
    i.set_defaults(func=_lazy("tvix_store.cli.importing", "run"))

    c = sub.add_parser(
        "copy", help="copy store paths (PathInfo, Directories, blobs) between stores, only what the target lacks"
    )
    c.add_argument("--from", dest="from_url", required=True, metavar="URL", help="the store to copy from")
    c.add_argument("--to", dest="to_url", required=True, metavar="URL", help="the store to copy to")
    c.add_argument(
        "--timeout",
        type=_positive_float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="deadline of remote calls (default 10)",
    )
    c.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        metavar="N",
        help="batches of small blobs or big blobs in flight at once (default 8)",
    )
    c.add_argument("store_paths", nargs="+", metavar="STORE_PATH")
    c.set_defaults(func=_lazy("tvix_store.cli.copy", "run"))

    b = sub.add_parser("blob", help="put, cat and stat blobs")
    bsub = b.add_subparsers(dest="blob_command", metavar="SUBCOMMAND", required=True)
    bp = bsub.add_parser("put", help="store bytes from FILE (or - for stdin), print the digest")
    _add_store(bp)
    bp.add_argument("file", metavar="FILE|-")
    bp.set_defaults(func=_lazy("tvix_store.cli.blob", "put"))
    bc = bsub.add_parser("cat", help="write a blob to stdout")
    _add_store(bc)
    bc.add_argument("digest", type=_digest_arg, metavar="DIGEST")
    bc.set_defaults(func=_lazy("tvix_store.cli.blob", "cat"))
    bs = bsub.add_parser("stat", help="print a blob's size (and chunks)")
    _add_store(bs)
    bs.add_argument("--chunks", action="store_true", help="also print one 'DIGEST SIZE' line per chunk")
    bs.add_argument("digest", type=_digest_arg, metavar="DIGEST")
    bs.set_defaults(func=_lazy("tvix_store.cli.blob", "stat"))

    m = sub.add_parser("mount", help="mount the store read-only with FUSE")
    _add_store(m, cache=True)
    m.add_argument(
        "--store-root", action="store_true", help="show the store paths at the root (stand-in for /nix/store)"
    )
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    m.add_argument(
        "--no-xattrs",
        dest="xattrs",
        action="store_false",
        help="no extended attributes (digests, stats): the kernel stops asking, `ls -l` of big directories "
        "gets about 10x faster",
    )
    m.add_argument(
        "--offline-ok",
        action="store_true",
        help="mount even when the remote cannot be reached and --cache-dir holds nothing (EIO until it is "
        "back); without it such a mount fails with exit 1 (with cached data it serves that, warning once)",
    )
    m.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (the mount's and its store's counters)",
    )
    m.add_argument("--foreground", action="store_true", help="stay attached until unmounted")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.set_defaults(func=_lazy("tvix_store.cli.mount", "run"))

    n = sub.add_parser("nar", help="write the NAR of a store path to stdout")
    _add_store(n)
    n.add_argument("store_path", metavar="STORE_PATH")
    n.set_defaults(func=_lazy("tvix_store.cli.nar", "run"))

    nb = sub.add_parser("nar-bridge", help="serve the store as a Nix HTTP binary cache (nix copy, substituters)")
    nb.add_argument("--listen", default="127.0.0.1:9000", metavar="ADDR", help="HOST:PORT or unix:/path")
    _add_store(nb)
    _add_bridge(nb)
    _add_security(nb)
    _add_metrics(nb)
    nb.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="abandon an upload or download that makes no progress for this long (default 60)",
    )
    nb.set_defaults(func=_lazy("tvix_store.cli.narbridge", "run"))

    pa = sub.add_parser("path", help="list, describe and remove store paths")
    pasub = pa.add_subparsers(dest="path_command", metavar="SUBCOMMAND", required=True)
    pl = pasub.add_parser("list", help="every store path, one a line")
    _add_store(pl)
    pl.add_argument("--json", action="store_true", help="one JSON object a line: path, narSize, narHash, references")
    pl.set_defaults(func=_lazy("tvix_store.cli.paths", "list_paths"))
    pi = pasub.add_parser("info", help="a store path's root node, NAR size and hash, references, signatures")
    _add_store(pi)
    pi.add_argument("--json", action="store_true", help="one JSON object")
    pi.add_argument("store_path", metavar="STORE_PATH")
    pi.set_defaults(func=_lazy("tvix_store.cli.paths", "info"))
    pr = pasub.add_parser("rm", help="remove path infos (their data goes with the next gc)")
    _add_store(pr)
    pr.add_argument("store_paths", nargs="+", metavar="STORE_PATH")
    pr.set_defaults(func=_lazy("tvix_store.cli.paths", "rm"))

    g = sub.add_parser("gc", help="delete Directories, blobs and chunks no store path reaches")
    _add_store(g)
    g.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    g.add_argument(
        "--grace",
        type=_duration_arg,
        default=3600.0,
        metavar="DURATION",
        help="keep objects written or used within this long, reachable or not: 0s, 15m, 2h, 1d (default 1h)",
    )
    g.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="STORE_PATH",
        help="also a root (repeatable); needed when the path infos are in another store (--pathinfo-store)",
    )
    g.set_defaults(func=_lazy("tvix_store.cli.maint", "gc"))
    v = sub.add_parser("verify", help="re-hash every object and check every reference")
    _add_store(v)
    v.add_argument("--repair-from", metavar="URL", help="fetch bad or missing objects from this store, verified")
    v.set_defaults(func=_lazy("tvix_store.cli.maint", "verify"))
    for leaf in _leaf_parsers(p):
        _add_log_level(leaf)
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "mount" and (args.cache_dir is not None or args.cache_size is not None):
        parser.error(f"--cache-dir and --cache-size apply to mount only, not to {args.command}")
    setup_logging(args.log_level)
    debug = args.log_level == "debug"
    # gRPC's C core logs to stderr on its own (handshake failures at INFO): errors are our one line
    os.environ.setdefault("GRPC_VERBOSITY", "DEBUG" if debug else "ERROR")
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error worth a line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (StoreError, OSError) as e:
        if debug:
            log.exception("command failed")
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless debugging
        log.debug("internal error", exc_info=True)
        print(f"{PROG}: internal error: {_one_line(e)} (run with --log-level debug for details)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__
