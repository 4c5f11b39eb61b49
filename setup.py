"""Optional compiled build of the classifier's hot modules (Cython, unchanged sources).

Everything else about the package is in pyproject.toml. The pure-Python modules are the
source of truth and run everywhere; where a C compiler is available, `pip install` also
compiles them with Cython (classification ~13% faster, measured in-process). A failed or skipped compile only
prints a note. `LODESTORE_NO_EXTENSIONS=1` skips it. The `.pxd` files beside the
sources declare the hot classes as extension types for the compiled build only. Next to
the compiled modules goes `_compiled.json`, the SHA-256 of each source (with its `.pxd`)
they were built from: at import, `governance/classify/_compiled.py` loads a compiled
module only while its source is unchanged, so an edit is never shadowed by a stale build.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGE = "governance.classify"
SOURCES = Path(__file__).parent / "governance" / "classify"


def _guard():
    """governance/classify/_compiled.py (stdlib only), loaded without its package: the
    module list and the source hash are the ones the import guard checks."""
    spec = importlib.util.spec_from_file_location("_lodestore_compiled", SOURCES / "_compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GUARD = _guard()
MODULES = GUARD.MODULES


def _extensions() -> list:
    if os.environ.get("LODESTORE_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("lodestore: Cython is not installed; the classifier runs as pure Python")
        return []
    from setuptools import Extension

    exts = [
        Extension(f"{PACKAGE}.{m}", [f"governance/classify/{m}.py"], optional=True)
        for m in MODULES
    ]
    try:
        return cythonize(
            exts,
            # types come from the .pxd files; the sources' annotations are for readers
            compiler_directives={
                "language_level": 3,
                "binding": True,
                "annotation_typing": False,
            },
            build_dir="build/cython",
            nthreads=os.cpu_count() or 1,
            quiet=True,
        )
    except Exception as exc:  # a Cython that cannot translate them: pure Python it is
        print(f"lodestore: Cython failed ({exc}); the classifier runs as pure Python")
        return []


class BuildExt(build_ext):
    """Never fail an install over the optional modules; record what they were built from.

    The compiled modules share extension types, so they are kept only all together: if
    one fails to build, the others are removed and the classifier runs as pure Python.
    """

    _built: list[str]

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext) -> None:
        super().build_extension(ext)  # an optional one that fails raises, and is skipped
        self._built.append(ext.name.rsplit(".", 1)[1])

    def run(self) -> None:
        self._built = []
        if not self.extensions:
            return super().run()
        manifest = Path(self.get_ext_fullpath(self.extensions[0].name)).parent / "_compiled.json"
        manifest.unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: pure Python it is
            print(f"lodestore: compiled classifier skipped ({exc}); pure Python is used")
        if sorted(self._built) != sorted(MODULES):
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            print("lodestore: the classifier was not compiled; it runs as pure Python")
            return
        built = {name: GUARD.source_hash(SOURCES, name) for name in MODULES}
        manifest.write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")
        self._manifest = str(manifest)

    def get_outputs(self) -> list[str]:
        out = super().get_outputs()
        manifest = getattr(self, "_manifest", None)
        return [*out, manifest] if manifest else out


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
