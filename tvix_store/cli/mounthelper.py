"""`mount.fuse.tvix-store`: the helper `mount(8)` runs for filesystems of type
`fuse.tvix-store` (`mount -t fuse.tvix-store URL DIR -o …`, or an `/etc/fstab` line).

`mount` calls it as `mount.fuse.tvix-store SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]`.
SOURCE is the store URL; OPTIONS are a comma-separated list. Options of ours become the
options of `tvix-store mount` (`cache-dir=DIR`, `cache-size=SIZE`, `timeout=SECONDS`,
`log-level=LEVEL`, `blob-store=URL`, `directory-store=URL`, `pathinfo-store=URL`,
`metrics-listen=HOST:PORT`,
`allow_other`, `store-root`, `no-xattrs`, `offline-ok`); the generic options `mount` and systemd pass are
accepted and ignored (the mount is read-only whatever they say); anything else is a usage
error (exit 2) naming it. Then `tvix-store mount` runs in background mode: this returns once
the mount answers, with its exit status. Not the mount itself (`tvix_store.cli.mount`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "mount.fuse.tvix-store"

#: `name=value` options of ours → the option of `tvix-store mount`
VALUED = {
    "cache-dir": "--cache-dir",
    "cache-size": "--cache-size",
    "timeout": "--timeout",
    "blob-store": "--blob-store",
    "directory-store": "--directory-store",
    "pathinfo-store": "--pathinfo-store",
    "metrics-listen": "--metrics-listen",
}
#: flags of ours
FLAGS = {
    "allow_other": "--allow-other",
    "allow-other": "--allow-other",
    "store-root": "--store-root",
    "no-xattrs": "--no-xattrs",
    "offline-ok": "--offline-ok",
}
#: generic options of mount(8), fstab and systemd: accepted, no effect here
GENERIC = {
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "user",
    "nouser", "users", "owner", "group", "defaults", "nofail", "_netdev", "sync", "async",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
    "nodiratime", "lazytime", "nolazytime", "silent", "loud", "default_permissions",
}  # fmt: skip
#: generic options with a value, by prefix
GENERIC_PREFIXES = ("x-", "comment=", "uid=", "gid=", "context=", "fscontext=", "defcontext=", "rootcontext=")


class _Usage(Exception):
    pass


def translate(argv: Sequence[str]) -> list[str]:
    """The `tvix-store` arguments for a helper command line (raises _Usage)."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "-o":
            value = next(it, None)
            if value is None:
                raise _Usage("-o needs a value")
            options += [o for o in value.split(",") if o]
        elif a.startswith("-o") and len(a) > 2:
            options += [o for o in a[2:].split(",") if o]
        elif a == "-t":
            next(it, None)  # the type: fuse.tvix-store
        elif a in ("-s", "-f", "-n", "-v"):
            pass  # sloppy, fake, no mtab, verbose: nothing to do differently
        elif a.startswith("-"):
            raise _Usage(f"unknown argument {a!r}")
        else:
            positional.append(a)
    if len(positional) != 2:
        raise _Usage("expected SOURCE (a store URL) and MOUNTPOINT")
    source, mountpoint = positional
    out = []
    for o in options:
        name, eq, value = o.partition("=")
        if name == "log-level" and eq:
            out = ["--log-level", value, *out]
        elif name in VALUED and eq:
            out += [VALUED[name], value]
        elif o in FLAGS:
            out.append(FLAGS[o])
        elif o in GENERIC or o.startswith(GENERIC_PREFIXES):
            continue
        else:
            raise _Usage(f"unknown mount option {o!r}")
    log_level = out[:2] if out[:1] == ["--log-level"] else []
    return [*log_level, "mount", "--store", source, *out[len(log_level) :], mountpoint]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        translated = translate(args)
    except _Usage as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        print(f"usage: {PROG} STORE_URL MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 2
    from tvix_store.cli import main as cli_main

    return cli_main(translated)


if __name__ == "__main__":
    sys.exit(main())
