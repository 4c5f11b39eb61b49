"""The optional compiled classifier (setup.py): used when fresh, never when stale.

`pip install` compiles the hot modules with Cython where a compiler exists and records
each source's hash; an edited source must win over its old build, and the pure-Python
path must give the same findings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import governance.classify as classify_pkg
from governance.classify import Classifier, _compiled, corpus

PKG_DIR = Path(classify_pkg.__file__).parent
REPO = PKG_DIR.parents[1]


def test_fresh_follows_the_source_hash(tmp_path):
    src = b"X = 1\n"
    (tmp_path / "mod.py").write_bytes(src)
    built = {"mod": hashlib.sha256(src).hexdigest()}
    assert not _compiled.fresh("mod", tmp_path, built)  # no extension file
    (tmp_path / f"mod{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert _compiled.fresh("mod", tmp_path, built)
    (tmp_path / "mod.py").write_bytes(b"X = 2\n")  # edited after the build
    assert not _compiled.fresh("mod", tmp_path, built)
    assert not _compiled.fresh("other", tmp_path, built)  # never compiled


def test_compiled_modules_are_used_when_built():
    built = _compiled.recorded()
    running = _compiled.compiled_modules()
    complete = sorted(built) == sorted(_compiled.MODULES)
    if os.environ.get("LODESTORE_CLASSIFY_PURE") or not (
        complete and all(map(_compiled.fresh, built))
    ):
        assert running == []
    else:
        assert running == sorted(_compiled.MODULES)


def _run(code: str, env: dict[str, str], cwd: Path | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "LODESTORE_CLASSIFY_PURE"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_pure_python_gives_the_same_findings():
    import random

    rng = random.Random(5)
    docs = [corpus.document(rng, 3000, kind, pii_per_kb=3).text for kind in corpus.FILLERS]
    code = (
        "import json, sys\n"
        "from governance.classify import Classifier, _compiled\n"
        "docs = json.load(sys.stdin)\n"
        "c = Classifier(workers=1)\n"
        "print(json.dumps([_compiled.compiled_modules(), "
        "[[(f.start, f.end, f.entity_type, f.score) for f in c.analyze(d)] for d in docs]]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(docs),
        env={**os.environ, "LODESTORE_CLASSIFY_PURE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    running, pure = json.loads(proc.stdout)
    assert running == []
    with Classifier(workers=1) as here:
        mine = [[[f.start, f.end, f.entity_type, f.score] for f in here.analyze(d)] for d in docs]
    assert pure == mine
    assert sum(map(len, mine)) > 10


def test_an_edited_source_wins_over_its_old_build(tmp_path):
    """Copy the package with its build, edit one module: the edit is what runs, and
    the other modules run from source too (they share extension types)."""
    if not _compiled.fresh("context"):
        import pytest

        pytest.skip("the classifier is not compiled in this install (no C compiler)")
    root = tmp_path / "root"
    shutil.copytree(REPO / "governance", root / "governance")
    ctx = root / "governance" / "classify" / "context.py"
    ctx.write_text(ctx.read_text() + "\nEDITED = True\n")
    out = _run(
        "import governance.classify.context as c\n"
        "from governance.classify import _compiled\n"
        "print(c.__file__.endswith('.py'), getattr(c, 'EDITED', False),"
        " _compiled.compiled_modules())\n",
        {"PYTHONPATH": str(root)},
        cwd=root,
    )
    assert out == "True True []"
