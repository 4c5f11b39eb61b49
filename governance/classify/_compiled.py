"""Load a compiled classifier module only while it matches the source beside it.

`pip install` may compile the hot modules with Cython (see setup.py), next to their
sources, and records the SHA-256 of each source (with its `.pxd`) in `_compiled.json`.
Python prefers an extension module to a `.py` of the same name, so after an edit (or a
checkout) the old build would silently shadow the new code; this finder then sends the
imports of all of them to the sources (the compiled modules share extension types, so
they are used together or not at all). `LODESTORE_CLASSIFY_PURE=1` always uses the
sources.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path

HERE = Path(__file__).parent
PACKAGE = __name__.rpartition(".")[0]
# What setup.py compiles (it reads this list and `source_hash` from this file).
MODULES = ("classifier", "context", "engine", "phones", "prefilter", "regex_plan")


def recorded(folder: Path = HERE) -> dict[str, str]:
    """Module name -> SHA-256 of the source it was compiled from."""
    try:
        data = json.loads((folder / "_compiled.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fresh(name: str, folder: Path = HERE, built: dict[str, str] | None = None) -> bool:
    """Is there a compiled `name` built from the current `name.py`?"""
    built = recorded(folder) if built is None else built
    if name not in built or not any((folder / f"{name}{s}").exists() for s in EXTENSION_SUFFIXES):
        return False
    try:
        return source_hash(folder, name) == built[name]
    except OSError:
        return True  # installed without sources: the build is all there is


def source_hash(folder: Path, name: str) -> str:
    """SHA-256 of a module's source and its Cython declarations (`.pxd`), if any
    (what setup.py records for each module it compiles)."""
    digest = hashlib.sha256((folder / f"{name}.py").read_bytes())
    pxd = folder / f"{name}.pxd"
    if pxd.exists():
        digest.update(b"\0pxd\0" + pxd.read_bytes())
    return digest.hexdigest()


class _SourceWhenStale:
    """Meta path finder: compiled modules unless one is stale (or unwanted), else the
    `.py` of every one of them."""

    def __init__(self) -> None:
        built = recorded()
        pure = bool(os.environ.get("LODESTORE_CLASSIFY_PURE"))
        self.compiled = (
            not pure
            and sorted(built) == sorted(MODULES)
            and all(fresh(m, HERE, built) for m in MODULES)
        )

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        pkg, _, name = fullname.rpartition(".")
        if pkg != PACKAGE or name not in MODULES or self.compiled:
            return None  # the default machinery picks the extension, if any
        return importlib.util.spec_from_file_location(fullname, HERE / f"{name}.py")


def install() -> None:
    if not any(isinstance(f, _SourceWhenStale) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceWhenStale())


def compiled_modules() -> list[str]:
    """The classifier modules running compiled in this process."""
    out = []
    for name, mod in sys.modules.items():
        pkg, _, short = name.rpartition(".")
        origin = getattr(mod, "__file__", "") or ""
        if pkg == PACKAGE and any(origin.endswith(s) for s in EXTENSION_SUFFIXES):
            out.append(short)
    return sorted(out)
