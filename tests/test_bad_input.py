"""Bad input is refused with a clear error and changes nothing.

Each case asserts the exception class from ``storage.errors`` and that the message says
what was wrong, and that the store (counts from ``status()`` and every tenant's tree) is
identical before and after. CLI cases check for one ``error:`` line on stderr and a
non-zero exit.
"""

from __future__ import annotations

import pathlib
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from server.cli import main
from storage import (
    ConfigError,
    InvalidArgument,
    InvalidPath,
    NotADirectory,
    NotFound,
    StorageError,
    StoreConfig,
    TargetSpec,
    TargetUnavailable,
    UnknownTenant,
    VersionMismatch,
    Volume,
)
from storage.maintenance import status
from storage.volume import encode_cursor

CHUNK = 64 * 1024
T = "acme"


@pytest.fixture
def vol(tmp_path):
    cfg = StoreConfig.embedded(tmp_path, chunk_size=CHUNK, inline_threshold=1024,
                               durability="none")
    v = Volume.init(tmp_path, cfg)
    v.create_tenant(T)
    v.write(T, "/docs/readme.md", b"hello")
    v.write(T, "/docs/big.bin", bytes(range(256)) * 600)  # 150 KiB, 3 chunks
    v.write(T, "/file", b"i am a file")
    v.mkdir(T, "/empty")
    yield v
    v.close()


def snapshot(vol: Volume) -> tuple[dict[str, Any], list[tuple]]:
    st = status(vol)
    counts = {k: st[k] for k in ("tenants", "files", "directories", "bytes", "chunks",
                                 "stored_bytes")}
    entries = sorted((t, i.path, i.kind, i.size, i.version)
                     for t in vol.list_tenants() for i in vol.walk(t))
    return counts, entries


def refused(vol: Volume, exc: type[BaseException], match: str, fn: Callable[[], Any]) -> str:
    """Run ``fn``, expect ``exc`` whose message matches ``match``, and nothing changed."""
    before = snapshot(vol)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert isinstance(info.value, StorageError), f"{type(info.value).__name__} is no StorageError"
    assert snapshot(vol) == before, "a refused call changed the store"
    return str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- paths ------------------------------------------------------------------------------------

BAD_PATHS = [
    ("/docs/../etc/passwd", r"contains '\.\.'"),
    ("/..", r"contains '\.\.'"),
    ("..", r"contains '\.\.'"),
    ("/docs/./readme.md", r"contains '\.'"),
    ("/.", r"contains '\.'"),
    ("/docs/read\x00me.md", "NUL byte"),
    ("/docs/line\nbreak", "control character"),
    ("/docs/tab\there", "control character"),
    ("/docs/bell\x07", "control character"),
    ("/docs/del\x7f", "control character"),
    ("/docs/c1\x85", "control character"),
    ("", "path is empty"),
    ("//", r"empty component \('//'\)"),
    ("//docs", r"empty component \('//'\)"),
    ("/docs//readme.md", r"empty component \('//'\)"),
    ("/" + "a" * 256, "longer than 255 bytes"),
    ("/docs/" + "é" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes
    ("/" + "/".join(["d" * 200] * 21), "longer than 4096 bytes"),
    ("/docs\\readme.md", "backslash"),
    ("/docs/   /x", "only of whitespace"),
    ("/a" * 65, "deeper than 64 levels"),
]

OPS: dict[str, Callable[[Volume, str], Any]] = {
    "stat": lambda v, p: v.stat(T, p),
    "read": lambda v, p: v.read(T, p),
    "write": lambda v, p: v.write(T, p, b"data"),
    "append": lambda v, p: v.write(T, p, b"data", mode="append"),
    "mkdir": lambda v, p: v.mkdir(T, p, parents=True),
    "list": lambda v, p: v.list_dir(T, p),
    "delete": lambda v, p: v.delete(T, p, recursive=True),
    "move-from": lambda v, p: v.move(T, p, "/moved"),
    "move-to": lambda v, p: v.move(T, "/file", p),
    "exists": lambda v, p: v.exists(T, p),
}


@pytest.mark.parametrize("path,why", BAD_PATHS, ids=[repr(p)[:40] for p, _ in BAD_PATHS])
def test_bad_paths_are_refused_by_every_operation(vol: Volume, path: str, why: str) -> None:
    for name, op in OPS.items():
        msg = refused(vol, InvalidPath, why, lambda op=op: op(vol, path))
        assert len(msg) < 400, f"{name}: message too long to act on"


@pytest.mark.parametrize("path", [None, b"/docs/readme.md", 42, pathlib.PurePosixPath("/docs"),
                                  ["/docs"]], ids=lambda p: type(p).__name__)
def test_non_string_paths_are_refused(vol: Volume, path: Any) -> None:
    for op in OPS.values():
        refused(vol, InvalidPath, f"path must be a string, got {type(path).__name__}",
                lambda op=op: op(vol, path))


def test_path_limits_are_inclusive(vol: Volume) -> None:
    name = "n" * 255
    vol.write(T, f"/{name}", b"ok")
    assert vol.read(T, f"/{name}") == b"ok"
    # 16 components of 255 bytes, each with its slash: exactly 4096 bytes
    long = "".join(f"/{c * 255}" for c in "abcdefghijklmnop")
    assert len(long.encode()) == 4096
    vol.write(T, long, b"deep")
    assert vol.read(T, long) == b"deep"
    deep = "/d" * 64
    vol.write(T, deep, b"64 levels")
    assert vol.read(T, deep) == b"64 levels"


def test_relative_paths_are_taken_as_absolute(vol: Volume) -> None:
    """Documented behaviour: a path without a leading '/' is relative to the tenant root,
    the same as with one (there is no working directory), and a trailing '/' is ignored."""
    info = vol.write(T, "rel/dir/file.txt", b"relative")
    assert info.path == "/rel/dir/file.txt"
    assert vol.read(T, "/rel/dir/file.txt") == b"relative"
    assert vol.read(T, "rel/dir/file.txt") == b"relative"
    assert vol.stat(T, "docs/readme.md").path == "/docs/readme.md"
    assert vol.stat(T, "docs/").path == "/docs"
    assert [i.name for i in vol.list_dir(T, "docs")[0]] == ["big.bin", "readme.md"]


def test_root_is_protected(vol: Volume) -> None:
    refused(vol, InvalidPath, "cannot delete the root", lambda: vol.delete(T, "/", recursive=True))
    refused(vol, StorageError, "root", lambda: vol.write(T, "/", b"x"))
    refused(vol, StorageError, "root", lambda: vol.move(T, "/", "/x"))
    refused(vol, StorageError, "root", lambda: vol.move(T, "/docs", "/"))
    refused(vol, StorageError, "root", lambda: vol.read(T, "/"))


# -- tenants ----------------------------------------------------------------------------------


def test_unknown_tenant(vol: Volume) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: vol.stat("ghost", "/docs/readme.md"),
        lambda: vol.stat("ghost", "/"),
        lambda: vol.read("ghost", "/docs/readme.md"),
        lambda: vol.write("ghost", "/x", b"1"),
        lambda: vol.write("ghost", "/x", b"1" * 100_000),
        lambda: vol.mkdir("ghost", "/d"),
        lambda: vol.list_dir("ghost", "/"),
        lambda: vol.delete("ghost", "/docs", recursive=True),
        lambda: vol.move("ghost", "/docs", "/d2"),
    ]
    for call in calls:
        msg = refused(vol, UnknownTenant, "unknown tenant 'ghost'", call)
        assert "lodestore tenant add ghost" in msg


BAD_TENANTS = ["", "Acme", "-lead", "_lead", "has space", "a/b", "../etc", "x" * 64, "ünï",
               "dot.ted", "tab\t", None, 7]


@pytest.mark.parametrize("tenant", BAD_TENANTS, ids=repr)
def test_invalid_tenant_ids(vol: Volume, tenant: Any) -> None:
    for call in (lambda: vol.create_tenant(tenant), lambda: vol.stat(tenant, "/"),
                 lambda: vol.write(tenant, "/x", b"1"), lambda: vol.list_dir(tenant, "/")):
        refused(vol, InvalidPath, "tenant id", call)
    assert vol.list_tenants() == [T]


# -- missing entries, wrong kinds ---------------------------------------------------------------


def test_missing_file(vol: Volume) -> None:
    p = "/docs/nope.md"
    for call in (lambda: vol.read(T, p), lambda: vol.stat(T, p), lambda: vol.open_file(T, p),
                 lambda: vol.delete(T, p), lambda: vol.move(T, p, "/elsewhere")):
        refused(vol, NotFound, "/docs/nope.md does not exist", call)
    for call in (lambda: vol.read(T, "/nodir/x"), lambda: vol.stat(T, "/nodir/x"),
                 lambda: vol.write(T, "/nodir/x", b"1", parents=False),
                 lambda: vol.mkdir(T, "/nodir/x"), lambda: vol.list_dir(T, "/nodir"),
                 lambda: vol.move(T, "/file", "/nodir/x")):
        refused(vol, NotFound, "/nodir does not exist", call)
    assert not vol.exists(T, p)


def test_parent_is_a_file(vol: Volume) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: vol.write(T, "/file/child", b"x"),
        lambda: vol.write(T, "/file/child", b"x" * 200_000),
        lambda: vol.write(T, "/file/a/b/c", b"x"),
        lambda: vol.write(T, "/file/child", b"x", mode="append"),
        lambda: vol.mkdir(T, "/file/sub"),
        lambda: vol.mkdir(T, "/file/sub/deeper", parents=True),
        lambda: vol.read(T, "/file/child"),
        lambda: vol.stat(T, "/file/child"),
        lambda: vol.list_dir(T, "/file"),
        lambda: vol.move(T, "/docs/readme.md", "/file/readme.md"),
        lambda: vol.delete(T, "/file/child"),
    ]
    for call in calls:
        refused(vol, NotADirectory, "/file is a file", call)
    assert not vol.exists(T, "/file/child")


def test_version_mismatch(vol: Volume) -> None:
    msg = refused(vol, VersionMismatch, "expected version 5 but it is at version 1",
                  lambda: vol.write(T, "/file", b"new", expected_version=5))
    assert "/file" in msg and "re-read" in msg
    refused(vol, VersionMismatch, "expected version 0 but it is at version 1",
            lambda: vol.write(T, "/file", b"new", expected_version=0))
    refused(vol, VersionMismatch, "expected version 2 but it does not exist",
            lambda: vol.write(T, "/docs/new", b"new", expected_version=2))
    refused(vol, VersionMismatch, "expected version 9",
            lambda: vol.write(T, "/file", b"+", mode="append", expected_version=9))
    refused(vol, VersionMismatch, "expected version 3",
            lambda: vol.delete(T, "/file", expected_version=3))
    refused(vol, VersionMismatch, "expected version 4",
            lambda: vol.write(T, "/docs/big.bin", b"x" * 300_000, expected_version=4))


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["abc", "_w==", "%%%%", "!!!", "not a cursor!", "\x00"],
                         ids=repr)
def test_invalid_list_cursor(vol: Volume, cursor: str) -> None:
    """A cursor that is not one ``list_dir`` handed out must be refused, not silently
    restart the listing (an agent would page forever)."""
    refused(vol, InvalidArgument, "invalid cursor",
            lambda: vol.list_dir(T, "/docs", cursor=cursor, limit=1))


def test_valid_cursor_still_works(vol: Volume) -> None:
    items, cursor = vol.list_dir(T, "/docs", limit=1)
    assert [i.name for i in items] == ["big.bin"] and cursor == encode_cursor("big.bin")
    items, cursor = vol.list_dir(T, "/docs", cursor=cursor, limit=1)
    assert [i.name for i in items] == ["readme.md"] and cursor is None


@pytest.mark.parametrize("limit", [0, -1, 10_001])
def test_invalid_list_limit(vol: Volume, limit: int) -> None:
    refused(vol, InvalidArgument, "limit must be between 1 and 10000",
            lambda: vol.list_dir(T, "/docs", limit=limit))


@pytest.mark.parametrize("path", ["/docs/readme.md", "/docs/big.bin"], ids=["inline", "chunked"])
def test_negative_offsets_and_lengths(vol: Volume, path: str) -> None:
    r = vol.open_file(T, path)
    calls: list[Callable[[], Any]] = [
        lambda: vol.read(T, path, -1),
        lambda: vol.read(T, path, -1, 3),
        lambda: vol.read(T, path, 0, -1),
        lambda: r.read(-5),
        lambda: r.read(2, -2),
        lambda: list(r.iter(-3)),
        lambda: list(r.iter(0, -1)),
    ]
    for call in calls:
        refused(vol, InvalidArgument, "offset and length must be >= 0", call)


def test_bad_write_arguments(vol: Volume) -> None:
    refused(vol, InvalidArgument, "mode must be 'overwrite', 'create' or 'append'",
            lambda: vol.write(T, "/docs/x", b"1", mode="truncate"))
    refused(vol, InvalidArgument, "expected_version must be >= 0",
            lambda: vol.write(T, "/docs/x", b"1", expected_version=-1))
    refused(vol, InvalidArgument, "data must be bytes",
            lambda: vol.write(T, "/docs/x", "text, not bytes"))
    assert not vol.exists(T, "/docs/x")


@pytest.mark.parametrize("data", [None, 42, 1.5, ["str", "pieces"], [b"ok", "then str"]],
                         ids=["None", "int", "float", "str-pieces", "bytes-then-str"])
def test_non_bytes_data_is_refused(vol: Volume, data: Any) -> None:
    refused(vol, InvalidArgument, "data must be bytes", lambda: vol.write(T, "/docs/x", data))
    refused(vol, InvalidArgument, "data must be bytes",
            lambda: vol.write(T, "/docs/readme.md", data, mode="append"))


def test_str_piece_after_chunks_is_refused(vol: Volume) -> None:
    """A stream that turns bad after some chunks: the write fails and no entry changes.
    (Chunks already stored stay registered until gc collects them, as after a crash.)"""
    data = [b"x" * (3 * CHUNK), "then text"]
    before = snapshot(vol)[1]
    with pytest.raises(InvalidArgument, match="data must be bytes, got str"):
        vol.write(T, "/docs/x", iter(data))
    with pytest.raises(InvalidArgument, match="data must be bytes, got str"):
        vol.write(T, "/docs/readme.md", iter(data), mode="append")
    assert snapshot(vol)[1] == before


# -- configuration and targets ----------------------------------------------------------------


def _s3_url(port: int, prefix: str) -> str:
    return (f"s3://bucket/{prefix}?endpoint=http://127.0.0.1:{port}&allow_http=true"
            "&region=us-east-1&access_key_id=x&secret_access_key=y")


def test_unreachable_target_fails_init(tmp_path) -> None:
    port = _closed_port()
    home = tmp_path / "store"
    cfg = StoreConfig.embedded(home, durability="none")
    cfg.targets[5] = TargetSpec("t5", _s3_url(port, "p5"))
    t0 = time.monotonic()
    with pytest.raises(TargetUnavailable) as info:
        Volume.init(home, cfg)
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "target t5" in msg and f"127.0.0.1:{port}" in msg  # which target
    assert "check that the endpoint is reachable" in msg  # what to do
    assert "secret_access_key=y" not in msg
    assert not (home / "lodestore.yaml").exists()  # nothing committed
    with pytest.raises(ConfigError, match="no store at"):
        Volume.open(home)


def test_unreachable_targets_fail_a_write_and_commit_nothing(tmp_path) -> None:
    """A volume opened with two dead targets (of six): a chunked write cannot place k+1=5
    shares, so it fails naming the targets, and neither entry nor chunk is committed.
    (``Volume(cfg)`` opens without the ``ensure()`` that ``Volume.init`` runs.)"""
    port = _closed_port()
    cfg = StoreConfig.embedded(tmp_path, chunk_size=CHUNK, inline_threshold=1024,
                               durability="none")
    cfg.targets[4] = TargetSpec("t4", _s3_url(port, "p4"))
    cfg.targets[5] = TargetSpec("t5", _s3_url(port, "p5"))
    for t in cfg.targets[:4]:
        from storage.targets import open_target

        open_target(t.id, t.url).ensure()
    vol = Volume(cfg)
    try:
        vol.create_tenant(T)
        vol.write(T, "/before", b"inline files need no target")
        t0 = time.monotonic()
        msg = refused(vol, TargetUnavailable, r"could write only 4 of 6 shares \(need 5\)",
                      lambda: vol.write(T, "/big", b"z" * (3 * CHUNK)))
        assert time.monotonic() - t0 < 15
        assert "t4" in msg and "t5" in msg and "lodestore status" in msg
        refused(vol, TargetUnavailable, "could write only",
                lambda: vol.write(T, "/before", b"y" * (2 * CHUNK), mode="append"))
        assert not vol.exists(T, "/big")
        assert vol.read(T, "/before") == b"inline files need no target"
        assert status(vol)["chunks"] == 0
    finally:
        vol.close()


@pytest.mark.parametrize("url", ["ftp://host/frags", "relative/folder", "http://127.0.0.1/x"])
def test_unsupported_target_scheme(tmp_path, url: str) -> None:
    cfg = StoreConfig.embedded(tmp_path, durability="none")
    cfg.targets[2] = TargetSpec("t2", url)
    with pytest.raises(ConfigError, match="unsupported target URL") as info:
        Volume.init(tmp_path, cfg)
    assert url in str(info.value) and "file:///" in str(info.value)
    assert not (tmp_path / "lodestore.yaml").exists()


@pytest.mark.parametrize("url", ["not a url", "nosuchdialect://x/y", "::::"])
def test_garbage_engine_url(tmp_path, url: str) -> None:
    cfg = StoreConfig.embedded(tmp_path, durability="none")
    cfg.engines[1] = url
    with pytest.raises(ConfigError, match="cannot use metadata engine") as info:
        Volume.init(tmp_path, cfg)
    assert repr(url) in str(info.value)
    # nothing committed: no config was saved, so a corrected init creates the store
    assert not (tmp_path / "lodestore.yaml").exists()
    good = StoreConfig.embedded(tmp_path, durability="none")
    vol = Volume.init(tmp_path, good)
    try:
        assert vol.cfg.engines == good.engines
    finally:
        vol.close()


def test_unreachable_engine(tmp_path) -> None:
    port = _closed_port()
    url = f"postgresql+psycopg://postgres:pw@127.0.0.1:{port}/nodb"
    cfg = StoreConfig.embedded(tmp_path, durability="none")
    cfg.engines = [url]
    cfg.shard_map = [0] * cfg.virtual_shards
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        Volume.init(tmp_path, cfg)
    assert time.monotonic() - t0 < 15
    assert f"127.0.0.1:{port}" in str(info.value) and "pw" not in str(info.value)
    assert not (tmp_path / "lodestore.yaml").exists()


@pytest.mark.parametrize("override,why", [
    ({"k": 5, "m": 4}, "k/m"), ({"chunk_size": 1000}, "chunk_size"),
    ({"inline_threshold": -1}, "inline_threshold"), ({"durability": "maybe"}, "durability"),
    ({"checksum_block": 10}, "checksum_block"),
])
def test_invalid_settings(tmp_path, override: dict, why: str) -> None:
    cfg = StoreConfig.embedded(tmp_path)
    for k, v in override.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=why):
        Volume.init(tmp_path, cfg)
    assert not (tmp_path / "lodestore.yaml").exists()


def test_config_structure_errors(tmp_path) -> None:
    cfg = StoreConfig.embedded(tmp_path)
    cfg.targets = cfg.targets[:5]
    with pytest.raises(ConfigError, match="needs at least m=6 targets, has 5"):
        Volume.init(tmp_path, cfg)
    cfg = StoreConfig.embedded(tmp_path)
    cfg.targets[1] = TargetSpec("t0", cfg.targets[1].url)
    with pytest.raises(ConfigError, match="ids must be unique"):
        Volume.init(tmp_path, cfg)
    cfg = StoreConfig.embedded(tmp_path)
    cfg.shard_map[3] = 9
    with pytest.raises(ConfigError, match="refers to an engine that is not listed"):
        Volume.init(tmp_path, cfg)
    assert not (tmp_path / "lodestore.yaml").exists()


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path):
    home = str(tmp_path / "home")
    runner = CliRunner()

    def run(*args: str, input: bytes | None = None):
        return runner.invoke(main, ["--home", home, *args], input=input)

    r = run("tenant", "add", "t1")
    assert r.exit_code == 0, r.output
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello")
    assert run("put", str(src), "/docs/hello.txt", "-t", "t1").exit_code == 0
    return run, tmp_path


def _one_error_line(r, *fragments: str) -> str:
    assert r.exit_code != 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {r.stderr!r}"
    assert lines[0].startswith("error:"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in r.output
    return lines[0]


def test_cli_bad_input(cli) -> None:
    run, tmp = cli
    local = str(tmp / "hello.txt")
    _one_error_line(run("get", "/docs/missing.txt", "-", "-t", "t1"),
                    "/docs/missing.txt does not exist")
    _one_error_line(run("ls", "/", "-t", "ghost"), "unknown tenant 'ghost'")
    _one_error_line(run("put", local, "/a/../b", "-t", "t1"), "'..'")
    _one_error_line(run("put", local, "/a//b", "-t", "t1"), "empty component")
    _one_error_line(run("tenant", "add", "Bad Name"), "tenant id")
    _one_error_line(run("get", "/docs", "-", "-t", "t1"), "/docs is a directory")
    _one_error_line(run("put", "--expect-version", "5", local, "/docs/hello.txt", "-t", "t1"),
                    "expected version 5 but it is at version 1")
    _one_error_line(run("rm", "/docs", "-t", "t1"), "/docs is not empty")
    _one_error_line(run("rm", "/nope", "-t", "t1"), "/nope does not exist")
    _one_error_line(run("put", local, "/docs/hello.txt/x", "-t", "t1"), "is a file")
    _one_error_line(run("put", str(tmp / "no-such-local"), "/x", "-t", "t1"), "no-such-local")
    _one_error_line(run("get", "/docs/hello.txt", str(tmp / "no-dir" / "out"), "-t", "t1"),
                    "no-dir")
    # nothing changed
    r = run("ls", "/docs", "-t", "t1", "--json")
    assert r.exit_code == 0
    import json

    assert [(i["name"], i["version"]) for i in json.loads(r.stdout)] == [("hello.txt", 1)]
    assert run("tenant", "list").stdout.split() == ["t1"]
    r = run("get", "/docs/hello.txt", "-", "-t", "t1")
    assert r.exit_code == 0 and r.stdout_bytes == b"hello"


def test_cli_unusable_store(tmp_path) -> None:
    home = tmp_path / "broken"
    home.mkdir()
    (home / "lodestore.yaml").write_text("k: [unclosed\n")
    r = CliRunner().invoke(main, ["--home", str(home), "status"])
    _one_error_line(r, "not valid YAML")
    (home / "lodestore.yaml").write_text("colour: blue\n")
    r = CliRunner().invoke(main, ["--home", str(home), "status"])
    _one_error_line(r, "unknown settings ['colour']")


def test_cli_refusals_outside_storage_errors_use_the_same_format(cli) -> None:
    """``tenant add`` of an existing tenant is refused by the CLI itself (a
    ClickException): it should read like every other refusal, for scripts that grep
    stderr for ``error:``."""
    run, _tmp = cli
    _one_error_line(run("tenant", "add", "t1"), "tenant t1 already exists")
    _one_error_line(run("put", "--expect-version", "-1", "-", "/x", "-t", "t1", input=b"x"),
                    "expected_version must be >= 0")
