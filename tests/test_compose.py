"""Composition (`tvix_store.compose`): the scheme registry, per-service overrides on the command
line (`--blob-store`, `--directory-store`, `--pathinfo-store`), the cache over remote services
only, and declared capabilities instead of URL tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Daemon, cli, one_line_error
from fixtures import make_tree, nix_dump, object_keys

from tvix_store.compose import SCHEMES, open_store
from tvix_store.core.errors import ValidationError


def files_under(root: Path, kind: str) -> int:
    """Objects of one kind in a local store (whatever its layout)."""
    return len(object_keys(root, kind))


def test_every_scheme_is_registered_and_unknown_ones_name_them() -> None:
    assert {"local", "memory", "grpc+http", "grpc+unix"} <= set(SCHEMES)
    with pytest.raises(ValidationError) as ei:
        open_store("ftp://example/store")
    for usage in ("local:///path", "memory://", "grpc+http://HOST:PORT", "grpc+unix:///path"):
        assert usage in str(ei.value)


def test_per_service_overrides_put_each_service_where_it_was_told(tmp_path: Path) -> None:
    """Blobs in A, Directories in B, path infos in C: an import spreads over the three stores,
    and reading the store path back through the same three gives `nix-store --dump`'s NAR."""
    tree = make_tree(tmp_path / "tree")
    a, b, c = (tmp_path / n for n in "abc")
    flags = ["--blob-store", f"local://{a}", "--directory-store", f"local://{b}", "--pathinfo-store", f"local://{c}"]
    sp = cli("import", *flags, str(tree)).stdout.decode().strip()
    assert files_under(a, "chunks") > 0 and files_under(a, "directories") == files_under(a, "pathinfos") == 0
    assert files_under(b, "directories") > 0 and files_under(b, "chunks") == files_under(b, "pathinfos") == 0
    assert files_under(c, "pathinfos") == 1 and files_under(c, "chunks") == files_under(c, "directories") == 0
    assert cli("nar", *flags, sp).stdout == nix_dump(tree)
    # --store is the default for the services not overridden
    p = cli(
        "nar", "--store", f"local://{a}", "--directory-store", f"local://{b}", "--pathinfo-store", f"local://{c}", sp
    )
    assert p.stdout == nix_dump(tree)
    one_line_error(cli("nar", "--store", f"local://{a}", sp, check=False), 1, "not found")


def test_a_url_shared_by_services_is_opened_once(tmp_path: Path) -> None:
    with open_store(f"local://{tmp_path / 's'}") as s:
        assert s.blobs.objects is s.directories.objects is s.pathinfos.objects  # type: ignore[attr-defined]


def test_overrides_mix_a_remote_and_a_local_store(tmp_path: Path) -> None:
    """Blobs from a daemon, metadata local: capabilities say which service is remote, and the
    cache goes in front of that one only."""
    d = Daemon(f"local://{tmp_path / 'remote'}")
    try:
        with open_store(f"local://{tmp_path / 'meta'}", blob_url=d.url, cache_dir=tmp_path / "cache") as s:
            assert s.is_remote
            assert s.blobs.capabilities.is_remote and not s.directories.capabilities.is_remote
            assert type(s.blobs).__name__ == "CachedBlobService"
            assert type(s.directories).__name__ == "ObjectDirectoryService"
            digest = s.blobs.put(b"through the cache to the daemon")
        with open_store(d.url) as remote:
            assert remote.blobs.read_chunk(digest) == b"through the cache to the daemon"
    finally:
        d.stop()


def test_cache_dir_needs_a_remote_service(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="only applies to a remote store"):
        open_store(f"local://{tmp_path / 's'}", cache_dir=tmp_path / "c")
    (tmp_path / "mnt").mkdir()
    p = cli("mount", "--store", "memory://", "--cache-dir", str(tmp_path / "c"), str(tmp_path / "mnt"), check=False)
    one_line_error(p, 2, "only applies to a remote store")  # misuse: a usage error
    assert not (tmp_path / "c").exists()  # refused before anything was created


def test_help_names_the_overrides() -> None:
    for cmd in (["import"], ["blob", "put"], ["blob", "cat"], ["nar"], ["mount"], ["daemon"]):
        out = cli(*cmd, "--help").stdout.decode()
        for opt in ("--blob-store", "--directory-store", "--pathinfo-store"):
            assert opt in out, (cmd, opt)
