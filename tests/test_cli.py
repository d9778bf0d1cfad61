"""The `tvix-store` command line as a user meets it (real processes, CLI.md).

Exit status 0/1/2; every error is ONE line on stderr starting `tvix-store: error:`, and
never a traceback; digests are accepted in every form CLI.md lists; every subcommand
has `--help`; `TVIX_STORE_URL` and `TVIX_STORE_DIR` are honoured.
"""

from __future__ import annotations

import argparse
import base64
import random
import time
from pathlib import Path

import pytest
from conftest import cli, one_line_error
from fixtures import EMPTY_HEX, HELLO, HELLO_HEX

from tvix_store.cli import build_parser

ABSENT_HEX = HELLO_HEX  # a blob no fresh store has


def local_url(tmp_path: Path) -> str:
    return f"local://{tmp_path / 'store'}"


# --- exit codes and error lines ---------------------------------------------------------------------


def test_absent_blob_is_exit_1() -> None:
    for cmd in (["blob", "cat"], ["blob", "stat"], ["blob", "stat", "--chunks"]):
        p = cli(*cmd, "--store", "memory://", ABSENT_HEX, check=False)
        one_line_error(p, 1, ABSENT_HEX, "not found")
        assert p.stdout == b""


@pytest.mark.parametrize(
    "bad",
    ["xyz", EMPTY_HEX[:-2], EMPTY_HEX + "00", "b3:" + base64.b64encode(bytes(31)).decode(), "g" * 64, "b3:"],
)
def test_malformed_digest_is_usage_error_naming_it(bad: str) -> None:
    p = cli("blob", "cat", "--store", "memory://", bad, check=False)
    one_line_error(p, 2, repr(bad))


def test_unsupported_store_url() -> None:
    # a usage error (CLI.md: exit 2)
    p = cli("blob", "stat", "--store", "ftp://example.org/x", EMPTY_HEX, check=False)
    one_line_error(p, 2, "ftp://example.org/x", "unsupported store URL")
    p = cli("blob", "stat", "--store", "local://relative/path", EMPTY_HEX, check=False)
    one_line_error(p, 2, "local://relative/path")


def test_unreachable_remote_fails_without_waiting_for_the_deadline() -> None:
    deadline = 60
    t0 = time.monotonic()
    p = cli("blob", "stat", "--timeout", str(deadline), "--store", "grpc+http://127.0.0.1:1", EMPTY_HEX, check=False)
    elapsed = time.monotonic() - t0
    one_line_error(p, 1, "127.0.0.1:1")
    assert elapsed < deadline / 2, f"took {elapsed:.1f} s"


def test_nonexistent_import_path(tmp_path: Path) -> None:
    p = cli("import", "--store", "memory://", str(tmp_path / "absent"), check=False)
    one_line_error(p, 1, str(tmp_path / "absent"))


def test_nonexistent_blob_put_file(tmp_path: Path) -> None:
    p = cli("blob", "put", "--store", "memory://", str(tmp_path / "absent"), check=False)
    one_line_error(p, 1, str(tmp_path / "absent"))


@pytest.mark.parametrize(
    "bad, named",
    [
        ("foo", "'foo'"),
        ("/nix/store/tooshort-x", "'tooshort-x'"),
        ("/nix/store/" + "0" * 32 + "-x/bin", "-x/bin"),
        ("/tmp/x", "'/tmp/x'"),
        ("/nix/store/" + "0" * 32 + "-bad name", "'bad name'"),
    ],
)
def test_nar_bad_store_path_is_usage_error(bad: str, named: str) -> None:
    p = cli("nar", "--store", "memory://", bad, check=False)
    one_line_error(p, 2, named)
    assert p.stdout == b""


def test_nar_absent_store_path_is_exit_1() -> None:
    sp = "/nix/store/" + "0" * 32 + "-absent"
    p = cli("nar", "--store", "memory://", sp, check=False)
    one_line_error(p, 1, sp, "not found")
    assert p.stdout == b""


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["blob"],
        ["blob", "frobnicate"],
        ["blob", "cat"],
        ["import"],
        ["import", "--timeout", "-1", "x"],
        ["--log-level", "loud", "blob", "stat", EMPTY_HEX],
    ],
)
def test_usage_errors_are_exit_2(args: list[str]) -> None:
    one_line_error(cli(*args, check=False), 2)


def test_success_is_exit_0_and_quiet(tmp_path: Path) -> None:
    f = tmp_path / "hello"
    f.write_bytes(HELLO)
    p = cli("blob", "put", "--store", "memory://", str(f))
    assert (p.returncode, p.stdout, p.stderr) == (0, (HELLO_HEX + "\n").encode(), b"")


# --- digest input forms -------------------------------------------------------------------------------


def _forms(raw: bytes) -> list[str]:
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    b64 = [std, std.rstrip("="), url, url.rstrip("=")]
    return [raw.hex(), raw.hex().upper(), "b3:" + std, "b3:" + std.rstrip("="), *b64]


def _digest_with_both_alphabets() -> bytes:
    rng = random.Random(99)
    while True:
        raw = rng.randbytes(32)
        s = base64.b64encode(raw).decode()
        if "+" in s and "/" in s:
            return raw


def test_digest_forms_accepted() -> None:
    """Each form is parsed to the same digest: the not-found message names it in canonical hex."""
    raw = _digest_with_both_alphabets()
    for form in _forms(raw):
        p = cli("blob", "stat", "--store", "memory://", form, check=False)
        one_line_error(p, 1, raw.hex(), "not found")


def test_digest_forms_reach_the_blob(tmp_path: Path) -> None:
    url = local_url(tmp_path)
    f = tmp_path / "hello"
    f.write_bytes(HELLO)
    assert cli("blob", "put", "--store", url, str(f)).stdout.decode().strip() == HELLO_HEX
    forms = _forms(bytes.fromhex(HELLO_HEX))
    for form in forms:
        assert cli("blob", "cat", "--store", url, form).stdout == HELLO
    assert cli("blob", "stat", "--store", url, forms[-1]).stdout == f"{len(HELLO)}\n".encode()


# --- --help -----------------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


def test_every_subcommand_has_help() -> None:
    cmds = _commands(build_parser())
    required = [("daemon",), ("import",), ("blob", "put"), ("blob", "cat"), ("blob", "stat"), ("mount",), ("nar",)]
    assert set(required) <= set(cmds)
    for cmd in cmds:
        p = cli(*cmd, "--help")
        assert p.returncode == 0 and p.stderr == b""
        assert p.stdout.decode().startswith("usage: tvix-store"), cmd


# --- environment ---------------------------------------------------------------------------------------------


def test_tvix_store_url_is_honoured(tmp_path: Path) -> None:
    p = cli("blob", "stat", EMPTY_HEX, env={"TVIX_STORE_URL": "bogus://from-env"}, check=False)
    one_line_error(p, 2, "bogus://from-env")  # a bad URL is a usage error, from wherever
    # --store wins over the environment
    p = cli("blob", "stat", "--store", "memory://", EMPTY_HEX, env={"TVIX_STORE_URL": "bogus://x"}, check=False)
    one_line_error(p, 1, "not found")
    url = local_url(tmp_path)
    f = tmp_path / "hello"
    f.write_bytes(HELLO)
    cli("blob", "put", str(f), env={"TVIX_STORE_URL": url})
    assert cli("blob", "cat", "--store", url, HELLO_HEX).stdout == HELLO


def test_tvix_store_dir_is_honoured(tmp_path: Path) -> None:
    store_dir = tmp_path / "from-env"
    f = tmp_path / "hello"
    f.write_bytes(HELLO)
    env = {"TVIX_STORE_DIR": str(store_dir), "TVIX_STORE_URL": ""}
    cli("blob", "put", str(f), env=env)
    assert store_dir.is_dir() and any(store_dir.iterdir())
    assert cli("blob", "cat", HELLO_HEX, env=env).stdout == HELLO
    assert cli("blob", "cat", "--store", f"local://{store_dir}", HELLO_HEX).stdout == HELLO
