"""What a person at a terminal meets: `--version`, global options before or after the
subcommand, usage errors exit 2 (CLI.md), remote failures as one plain line, and progress bars
for import, copy, gc and verify on a terminal (a real pty) and nothing of them otherwise."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from conftest import cli, one_line_error


def test_version() -> None:
    p = cli("--version")
    line = p.stdout.decode().strip()
    assert line.startswith("tvix-store ") and "tvix.store.v1" in line, line
    version = line.split()[1]
    assert version[0].isdigit() and version.count(".") >= 2, line


def test_global_options_before_or_after_the_subcommand(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"global options\n")
    store = f"local://{tmp_path / 'store'}"
    sp = cli("--store", store, "--log-level", "warning", "import", str(f)).stdout.decode().strip()
    digest = cli("blob", "put", "--log-level", "error", "--store", store, str(f)).stdout.decode().strip()
    assert cli("--store", store, "blob", "cat", digest).stdout == b"global options\n"
    assert cli("nar", sp, "--store", store).returncode == 0
    # the one after the subcommand wins
    assert cli("--store", "memory://", "blob", "cat", "--store", store, digest).stdout == b"global options\n"
    env = {"TVIX_STORE_URL": store}
    assert cli("blob", "cat", digest, env=env).stdout == b"global options\n"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("import", "--store", "bogus://x", "."), "bogus://x"),
        (("--store", "local://relative/path", "nar", "/nix/store/" + "0" * 32 + "-x"), "local://"),
        (("blob", "cat", "--store", "grpc+http://host-without-port", "0" * 64), "grpc+http://HOST:PORT"),
        (("blob", "cat", "--store", "grpc+https://h:1?token_file=/nonexistent", "0" * 64), "token_file"),
        (("import", "--cache-dir", "/tmp/x", "."), "--cache-dir"),
        (("--cache-size", "1G", "gc"), "--cache-size"),
        (("daemon", "--listen", "nonsense", "--store", "memory://"), "invalid listen address"),
        (("nar-bridge", "--listen", "127.0.0.1:99999", "--store", "memory://"), "invalid listen address"),
        (("copy", "--from", "memory://", "--to", "nope:/", "/nix/store/" + "0" * 32 + "-x"), "--to"),
        (("blob", "cat", "--store", "memory://", "xyz"), "xyz"),
        (("no-such-command",), "no-such-command"),
    ],
)
def test_usage_errors_exit_2(argv: tuple[str, ...], needle: str) -> None:
    line = one_line_error(cli(*argv, check=False), 2, needle)
    assert "Traceback" not in line


def test_cache_dir_with_a_local_store_is_a_usage_error(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = cli("mount", "--store", f"local://{tmp_path / 's'}", "--cache-dir", str(tmp_path / "c"), str(mnt), check=False)
    one_line_error(p, 2, "--cache-dir", "remote")
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize(
    ("url", "needle"),
    [("grpc+http://127.0.0.1:1", "connection refused"), ("grpc+http://no-such-host.invalid:8000", "unknown host")],
)
def test_remote_errors_are_one_plain_line(url: str, needle: str) -> None:
    p = cli("blob", "cat", "--store", url, "--timeout", "5", "0" * 64, check=False)
    line = one_line_error(p, 1, url, needle)
    for internal in ("UNKNOWN", "ipv4", "failed to connect to all addresses", "StatusCode", "lookup error"):
        assert internal not in line, line


# --- progress -----------------------------------------------------------------------------------


def on_pty(*args: str) -> tuple[int, bytes, bytes]:
    """Run `tvix-store ARGS` with stderr on a pty (120 columns): (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix_store.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty is gone
                return
            if not b:
                return
            seen.extend(b)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    out, _ = proc.communicate(timeout=120)
    t.join(30)
    os.close(master)
    return proc.returncode, out, bytes(seen)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, str, str, str]:
    """(a tree, a store with it imported, its store path, an empty store)."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(6):
        (tree / f"f{i}").write_bytes(os.urandom(200_000 + i))
    (tree / "sub" / "big").write_bytes(os.urandom(3 << 20))
    src = f"local://{tmp_path / 'src'}"
    sp = cli("import", "--store", src, str(tree)).stdout.decode().strip()
    return tree, src, sp, f"local://{tmp_path / 'dst'}"


def test_progress_on_a_terminal(stores: tuple[Path, str, str, str], tmp_path: Path) -> None:
    tree, src, sp, dst = stores
    # import: the total is known (the tree's size): a percentage, a rate, an ETA
    rc, out, term = on_pty("import", "--store", f"local://{tmp_path / 'other'}", str(tree))
    assert rc == 0 and out.decode().strip() == sp, term
    assert b"import tree" in term and b"%|" in term and b"B/s" in term, term
    assert b"<?" in term or b"<00:" in term, term  # tqdm's ETA field
    # copy: to 100%
    rc, out, term = on_pty("copy", "--from", src, "--to", dst, sp)
    assert rc == 0 and out.decode().strip() == sp, term
    assert b"copy" in term and b"100%|" in term and b"B/s" in term, term
    # verify: the bytes of chunks re-hashed, to 100%
    rc, out, term = on_pty("verify", "--store", dst)
    assert rc == 0 and out.startswith(b"ok: "), (out, term)
    assert b"verify" in term and b"100%|" in term, term
    # gc: its phases, objects deleted (none here: just written, within gc's clock slack)
    cli("path", "rm", "--store", dst, sp)
    rc, out, term = on_pty("gc", "--store", dst, "--grace", "0s")
    assert rc == 0 and b"deleted" in out, (out, term)
    assert b"gc: reclaiming space: " in term and b"objects/s" in term, term
    # the bar is erased at the end: the last thing the terminal got clears the line
    assert term.rstrip(b" ").endswith(b"\r"), term[-200:]


def test_no_progress_without_a_terminal(stores: tuple[Path, str, str, str], tmp_path: Path) -> None:
    tree, src, sp, dst = stores
    for argv in (
        ("import", "--store", f"local://{tmp_path / 'other'}", str(tree)),
        ("copy", "--from", src, "--to", dst, sp),
        ("verify", "--store", dst),
        ("gc", "--store", dst, "--grace", "0s", "--dry-run"),
    ):
        p = cli("--log-level", "warning", *argv)
        assert p.stderr == b"", (argv, p.stderr)
