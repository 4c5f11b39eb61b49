"""Optional compiled build of the classifier's hot modules (Cython, unchanged sources).

Everything else about the package is in pyproject.toml. The pure-Python modules are the
source of truth and run everywhere; where a C compiler is available, `pip install` also
compiles them with Cython (classification ~6% faster). A failed or skipped compile only
prints a note. `LODESTORE_NO_EXTENSIONS=1` skips it. The `.pxd` files beside the
sources declare the hot classes as extension types for the compiled build only. Next to
the compiled modules goes `_compiled.json`, the SHA-256 of each source (with its `.pxd`)
they were built from: at import, `governance/classify/_compiled.py` loads a compiled
module only while its source is unchanged, so an edit is never shadowed by a stale build.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGE = "governance.classify"
MODULES = ("classifier", "context", "engine", "phones", "prefilter", "regex_plan")
SOURCES = Path(__file__).parent / "governance" / "classify"


def source_hash(folder: Path, name: str) -> str:
    """SHA-256 of a module's source and its Cython declarations (`.pxd`), if any.
    Kept identical to governance/classify/_compiled.py's."""
    digest = hashlib.sha256((folder / f"{name}.py").read_bytes())
    pxd = folder / f"{name}.pxd"
    if pxd.exists():
        digest.update(b"\0pxd\0" + pxd.read_bytes())
    return digest.hexdigest()


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
    return cythonize(
        exts,
        # types come from the .pxd files; the sources' annotations are for readers
        compiler_directives={"language_level": 3, "binding": True, "annotation_typing": False},
        build_dir="build/cython",
        nthreads=os.cpu_count() or 1,
        quiet=True,
    )


class BuildExt(build_ext):
    """Never fail an install over the optional modules; record what they were built from."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: pure Python it is
            print(f"lodestore: compiled classifier skipped ({exc}); pure Python is used")
            return
        built = {}
        for ext in self.extensions:
            if Path(self.get_ext_fullpath(ext.name)).exists():
                name = ext.name.rsplit(".", 1)[1]
                built[name] = source_hash(SOURCES, name)
        if built:
            first = self.extensions[0].name
            target = Path(self.get_ext_fullpath(first)).parent / "_compiled.json"
            target.write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")
            self._manifest = str(target)

    def get_outputs(self) -> list[str]:
        out = super().get_outputs()
        manifest = getattr(self, "_manifest", None)
        return [*out, manifest] if manifest else out


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
