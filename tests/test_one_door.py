"""One door: tool code cannot reach a volume around the gateway (issue #3).

Two halves. Statically, no module of the ``tools`` package imports the storage layer
beyond its plain data types and errors (``storage.errors``, ``storage.paths``,
``storage.FileInfo`` and the error classes ``storage`` re-exports), nor names the
gateway's private volume handle. At runtime, a ``Gateway`` holds no ``Volume`` that a
tool could pick up from its attributes (one level deep, closures included).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

import storage
import storage.errors
from server.wiring import open_app
from storage import StoreConfig, Volume

ROOT = Path(__file__).resolve().parents[1]

# What tool code may take from the storage layer: plain data types and errors.
ALLOWED_STORAGE_MODULES = frozenset({"storage.errors", "storage.paths"})
ALLOWED_STORAGE_NAMES = frozenset(
    {"FileInfo", "errors", "paths"}
    | {n for n, v in vars(storage.errors).items()
       if inspect.isclass(v) and issubclass(v, BaseException)}
)
# Attribute names that only serve to get around the gateway.
FORBIDDEN_ATTRIBUTES = frozenset({"_v", "vol", "Volume", "FileReader", "ChunkStore", "MetaStore"})


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def _module_name(path: Path, package_root: Path, package: str) -> str:
    rel = path.relative_to(package_root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str | None, level: int, current: str, is_pkg: bool) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


def _is_storage(name: str) -> bool:
    return name == "storage" or name.startswith("storage.")


def storage_violations(source: str, filename: str = "<tool>", module: str = "tools.x",
                       is_pkg: bool = False) -> list[Violation]:
    """Ways ``source`` (a module of the tools layer) reaches past the gateway.

    Flags: importing any storage module other than ``storage.errors``/``storage.paths``
    (a bare ``import storage`` included: it hands out ``storage.Volume``); importing from
    ``storage`` anything but FileInfo and error classes; dynamic imports of storage
    (``importlib.import_module``/``__import__`` with a literal); and the attribute names
    that only serve to get around the gateway (``gateway._v``, ``principals.vol``, ...).
    """
    tree = ast.parse(source, filename)
    out: list[Violation] = []

    def bad(node: ast.AST, what: str) -> None:
        out.append(Violation(filename, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_storage(alias.name) and alias.name not in ALLOWED_STORAGE_MODULES:
                    bad(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module, node.level, module, is_pkg)
            if not _is_storage(mod):
                continue
            if mod in ALLOWED_STORAGE_MODULES:
                continue
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                if mod == "storage" and alias.name in ALLOWED_STORAGE_NAMES:
                    continue
                if full in ALLOWED_STORAGE_MODULES:
                    continue
                bad(node, f"from {mod} import {alias.name}")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if (isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                        and _is_storage(arg.value)
                        and arg.value not in ALLOWED_STORAGE_MODULES):
                    bad(node, f"dynamic import of {arg.value}")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            bad(node, f"attribute .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in ("Volume", "FileReader"):
            bad(node, f"name {node.id}")
    return out


def package_violations(package_dir: Path, package: str | None = None) -> list[Violation]:
    """``storage_violations`` over every ``.py`` file of a package directory."""
    package = package or package_dir.name
    out: list[Violation] = []
    for f in sorted(package_dir.rglob("*.py")):
        out += storage_violations(f.read_text(encoding="utf-8"), str(f),
                                  _module_name(f, package_dir, package),
                                  is_pkg=f.name == "__init__.py")
    return out


# --------------------------------------------------------------------------- static


BAD_TOOL = '''
"""A tool that reaches around the gateway in every way the checker knows."""
import storage
import storage.volume
import storage.meta.sql as sql
from storage import Volume, FileInfo
from storage.volume import FileReader
from storage.chunks import ChunkStore
import importlib

vol_mod = importlib.import_module("storage.volume")
vol2 = __import__("storage")


def read_raw(gateway, tenant, path):
    return gateway._v().read(tenant, path)


def read_raw2(gateway, tenant, path):
    return gateway.principals.vol.read(tenant, path)
'''

GOOD_TOOL = '''
"""A tool that only uses the gateway and storage's plain types."""
from __future__ import annotations

from storage import FileInfo, NotFound, StorageError
from storage.errors import InvalidArgument
from storage import paths
import storage.paths
from governance.gateway import Gateway


def read_text(gw: Gateway, who, path: str) -> str:
    try:
        res = gw.read(who, storage.paths.normalize(path))
    except NotFound:
        return ""
    info: FileInfo = res.info
    return res.data.decode() + info.name
'''


def _write_pkg(root: Path, name: str, files: dict[str, str]) -> Path:
    pkg = root / name
    pkg.mkdir()
    for rel, text in files.items():
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return pkg


def test_checker_flags_every_way_around_the_gateway(tmp_path):
    pkg = _write_pkg(tmp_path, "tools", {
        "__init__.py": "",
        "bad.py": BAD_TOOL,
        "good.py": GOOD_TOOL,
        "sub/__init__.py": "from ..good import read_text\nfrom .. import bad\n",
        "sub/rel.py": "from storage import chunks\n",
    })
    found = package_violations(pkg)
    by_file: dict[str, list[str]] = {}
    for v in found:
        by_file.setdefault(Path(v.file).relative_to(pkg).as_posix(), []).append(v.what)
    assert "good.py" not in by_file, by_file.get("good.py")
    assert sorted(by_file["bad.py"]) == sorted([
        "import storage", "import storage.volume", "import storage.meta.sql",
        "from storage import Volume", "from storage.volume import FileReader",
        "from storage.chunks import ChunkStore", "dynamic import of storage.volume",
        "dynamic import of storage", "attribute ._v", "attribute .vol",
    ])
    assert by_file["sub/rel.py"] == ["from storage import chunks"]
    assert "sub/__init__.py" not in by_file  # relative imports inside tools are fine


def test_checker_resolves_relative_imports_into_storage():
    src = "from . import volume\nfrom .errors import NotFound\nfrom .volume import Volume\n"
    found = [v.what for v in storage_violations(src, module="storage.fake", is_pkg=False)]
    assert found == ["from storage import volume", "from storage.volume import Volume"]


def test_real_tools_package_reaches_no_volume():
    tools_dir = ROOT / "tools"
    assert (tools_dir / "__init__.py").is_file()
    found = package_violations(tools_dir)
    assert found == [], "tools reach around the gateway:\n" + "\n".join(map(str, found))


# --------------------------------------------------------------------------- runtime


def _volumes_reachable(obj: object, name: str) -> Iterable[str]:
    """Paths to a Volume from ``obj``: itself, its attributes/slots, closure cells,
    and items of lists/tuples/dicts it holds (one level below ``obj``)."""
    def direct(v: object, where: str) -> Iterable[str]:
        if isinstance(v, Volume):
            yield where
        for i, cell in enumerate(getattr(v, "__closure__", None) or ()):
            try:
                if isinstance(cell.cell_contents, Volume):
                    yield f"{where}.__closure__[{i}]"
            except ValueError:  # empty cell
                pass
        if isinstance(v, list | tuple | set | frozenset):
            for i, item in enumerate(v):
                if isinstance(item, Volume):
                    yield f"{where}[{i}]"
        if isinstance(v, dict):
            for k, item in v.items():
                if isinstance(item, Volume):
                    yield f"{where}[{k!r}]"

    def attrs(v: object) -> dict[str, object]:
        names = set(dir(v))
        for cls in type(v).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            names |= {slots} if isinstance(slots, str) else set(slots)
        out = {}
        for n in sorted(names):
            if n.startswith("__") and n not in ("__closure__",):
                continue
            try:
                out[n] = getattr(v, n)
            except Exception:  # noqa: BLE001 - unset slots, properties that raise
                continue
        return out

    yield from direct(obj, name)
    for n, v in attrs(obj).items():
        where = f"{name}.{n}"
        yield from direct(v, where)
        if inspect.ismodule(v) or inspect.isclass(v) or inspect.isroutine(v):
            continue
        for n2, v2 in attrs(v).items():
            yield from direct(v2, f"{where}.{n2}")


@pytest.fixture
def app(tmp_path):
    home = tmp_path / "home"
    Volume.init(home, StoreConfig.embedded(home, durability="none")).close()
    a = open_app(home)
    yield a
    a.close()


def test_walker_finds_a_planted_volume(app):
    class Holder:
        def __init__(self, vol):
            self.inner = type("Inner", (), {})()
            self.inner.vol = vol
            self.get = (lambda v: lambda: v)(vol)
            self.items = [1, vol]

    found = set(_volumes_reachable(Holder(app.vol), "h"))
    assert found == {"h.inner.vol", "h.get.__closure__[0]", "h.items[1]"}


def test_gateway_exposes_no_volume(app):
    gw = app.gateway
    slots = type(gw).__slots__
    assert "_v" in slots  # the volume handle is a slot holding a closure...
    found = sorted(set(_volumes_reachable(gw, "gateway")))
    assert found == [], (
        "a Volume is reachable from the Gateway a tool receives, around the one door: "
        + ", ".join(found))
