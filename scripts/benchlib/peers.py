"""The peers the bench compares with, as BENCH.md names them: installing them and driving them.

- `nix-store --add` / `--delete` (import reference), `nix-store --dump` (NAR reference hashes),
- `borg init -e none; borg create; borg mount -f`, `casync make; casync mount` (local and over
  HTTP from `python3 -m http.server`), `rclone mount :http:` (Debian's rclone) over nginx,
- apt-get installs of whatever is missing (only as root, only Debian packages, `--no-install`
  turns it off).

Not a test of the peers: their data is checked like ours, but their failures only become a
row's reason, never the bench's.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .procs import Mount
from .runner import Bench
from .util import CLEANUP, BenchError, log, run, timed

#: apt package for each peer command
PEER_PACKAGES = {
    "borg": "borgbackup",
    "casync": "casync",
    "nix-store": "nix-bin",
    "b3sum": "b3sum",
    "fusermount3": "fuse3",
    "rclone": "rclone",
    "nginx": "nginx",
    "wrk": "wrk",
}


def ensure_peers(b: Bench) -> None:
    missing = [c for c in PEER_PACKAGES if shutil.which(c) is None and c not in b.args.skip_peers]
    if missing and os.geteuid() == 0 and shutil.which("apt-get") and not b.args.no_install:
        pkgs = [PEER_PACKAGES[c] for c in missing]
        log(f"installing {' '.join(pkgs)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            run(["apt-get", "update", "-qq"], timeout=300, env=env, check=False)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs], timeout=600, env=env)
        except BenchError as e:
            log(f"apt-get failed: {e}")
    for c in PEER_PACKAGES:
        b.peers[c] = None if shutil.which(c) else f"{c} not installed ({PEER_PACKAGES[c]})"
    if b.peers["nix-store"] is None and os.geteuid() != 0:
        b.peers["nix-store"] = "nix-store --add needs root here"
    if b.peers["fusermount3"] is not None:
        for c in ("borg", "casync", "rclone"):
            b.peers[c] = b.peers["fusermount3"]
    if b.peers["nginx"] is not None:
        b.peers["rclone"] = b.peers["rclone"] or f"rclone needs a static server: {b.peers['nginx']}"
    if b.peers["b3sum"] is not None:
        raise BenchError("b3sum is needed to check what every row read")


# -- nix-store


def nix_add(src: Path) -> tuple[float, str]:
    """One timed `nix-store --add`, the path deleted again at once (so each run really adds)."""
    os.sync()
    t0 = time.perf_counter()
    out = run(["nix-store", "--add", str(src)], timeout=600)
    t = time.perf_counter() - t0
    path = out.stdout.decode().strip()
    key = CLEANUP.add(f"nix-store --delete {path}", lambda: nix_delete(path, check=False))
    nix_delete(path)
    CLEANUP.discard(key)
    return t, path


def nix_delete(path: str, check: bool = True) -> None:
    p = run(["nix-store", "--delete", path], timeout=300, check=False)
    still = run(["nix-store", "--check-validity", path], check=False).returncode == 0
    if check and still:
        raise BenchError(f"nix-store --delete {path} did not delete it: {' '.join(p.stderr.decode().split())[-200:]}")


# -- borg


def ensure_borg(b: Bench) -> None:
    if b.borg_repo is not None:
        return
    if (why := b.peer("borg")) is not None:
        raise BenchError(why)
    repo = b.tmp / "borg-repo"
    log("borg create (setup)")
    run(["borg", "init", "-e", "none", str(repo)], env=b.env, timeout=120)
    run(["borg", "create", f"{repo}::a", str(b.data.bigdir), str(b.data.tree)], env=b.env, timeout=600)
    b.borg_repo = repo


def borg_mount(b: Bench) -> Mount:
    assert b.borg_repo is not None
    mnt = b.fresh("borg-mnt")
    return b.peer_mount("borg mount", ["borg", "mount", "-f", f"{b.borg_repo}::a", str(mnt)], mnt)


def in_borg(mnt: Path, p: Path) -> Path:
    return mnt / str(p).lstrip("/")


# -- casync


def casync_make(b: Bench, which: str, cap: float | None = None) -> float:
    """Timed `casync make` of bigdir or tree into a fresh S; keeps S (store/ and x.caidx) for the mounts."""
    src = b.data.bigdir if which == "big" else b.data.tree
    s = b.fresh(f"casync-{which}")
    s.mkdir()
    os.sync()
    t, _ = timed(["casync", "make", f"--store={s / 'store'}", str(s / "x.caidx"), str(src)], cap=cap)
    old = b.casync.get(which)
    b.casync[which] = s
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return t


def ensure_casync(b: Bench, which: str) -> None:
    if which in b.casync:
        return
    if (why := b.peer("casync")) is not None:
        raise BenchError(why)
    log(f"casync make {which} (setup)")
    casync_make(b, which)


def casync_mount(b: Bench, which: str, store: str | None = None) -> Mount:
    """`casync mount` of big's or tree's index, from the local store or `store` (an http:// URL)."""
    s = b.casync[which]
    mnt = b.fresh(f"casync-mnt-{which}")
    argv = ["casync", "mount", f"--store={store or s / 'store'}", str(s / "x.caidx"), str(mnt)]
    return b.peer_mount("casync mount", argv, mnt)


# -- rclone over a static server


def rclone_www(b: Bench) -> Path:
    """A directory for the static server: `big` and `tree/` (hard links; the tree without its symlinks,
    which a static HTTP server would follow and rclone cannot show)."""
    if "rclone-www" in b.memo:
        return Path(b.memo["rclone-www"])
    www = b.tmp / "www"
    www.mkdir()
    os.link(b.data.big, www / "big")
    run(["cp", "-al", str(b.data.tree), str(www / "tree")])
    for dirpath, dirs, names in os.walk(www / "tree"):
        for n in [*names, *dirs]:
            p = Path(dirpath) / n
            if p.is_symlink():
                p.unlink()
    b.memo["rclone-www"] = str(www)
    return www


def rclone_mount(b: Bench, url: str) -> Mount:
    """`rclone mount :http:` of a static server (read-only, no VFS cache, a fresh rclone each time)."""
    if (why := b.peer("rclone")) is not None:
        raise BenchError(why)
    mnt = b.fresh("rclone-mnt")
    cache = b.fresh("rclone-cache")
    argv = ["rclone", "mount", ":http:", str(mnt), "--http-url", url, "--read-only", "--config", "/dev/null"]
    argv += ["--cache-dir", str(cache), "--vfs-cache-mode", "off", "--dir-cache-time", "1h"]
    return b.peer_mount("rclone mount", argv, mnt)
