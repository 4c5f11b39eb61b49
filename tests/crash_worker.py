"""Crash-test worker: seeded-random namespace operations on a store, until killed.

Run as ``python crash_worker.py HOME TENANT LOG SEED [FOCUS [MAX_OPS]]`` (FOCUS: 'mixed'
or 'namespace', see ``Chooser``; MAX_OPS: stop cleanly after that many operations). The
worker opens the store, reads the whole namespace of TENANT (paths and contents) to learn
where it starts, writes a ``ready`` record, then loops: pick an operation valid for the
current namespace, write an ``op`` record (the intent), run it, write an ``ack`` record.
Every record is one JSON line written with a single ``write`` and ``fsync``'ed before the
worker goes on, so the parent, after ``SIGKILL``, knows exactly which operations were
acknowledged and which single one (the last ``op`` without its ``ack``) was in flight.

Content is self-verifying: every write or append records a seed and a length, and the
bytes are ``gen(seed, n)``; ``apply`` replays an operation on a namespace model
(path -> bytes for a file, None for a directory), so the parent can recompute the exact
expected content of every path. The parent imports this module for ``gen``, ``apply``,
``allowed_states`` and ``digest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import traceback
from typing import Any

Model = dict[str, bytes | None]  # path -> file content, or None for a directory

DIR_NAMES = ("a", "b", "c", "d", "e")
FILE_NAMES = ("x0", "x1", "x2", "x3", "x4", "x5")
MAX_NEW_DEPTH = 3  # new files and directories go into directories at most this deep
MAX_DEPTH = 5  # no path deeper than this (moves of subtrees respect it)
MAX_APPEND_SIZE = 256 * 1024  # files larger than this are not appended to


# -- the model (shared with the checker) ---------------------------------------------------


def gen(seed: int, n: int) -> bytes:
    """The content of a write or append: deterministic bytes from a seed."""
    return random.Random(seed).randbytes(n)


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def dirname(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it."""
    return path == top or path.startswith(top + "/")


def apply(model: Model, op: dict[str, Any]) -> Model:
    """The namespace after ``op`` completed (a new dict; ``model`` is left alone)."""
    m = dict(model)
    kind = op["op"]
    if kind == "write":
        for d in op.get("mk", ()):
            m[d] = None
        m[op["path"]] = gen(op["seed"], op["n"])
    elif kind == "append":
        m[op["path"]] = (m.get(op["path"]) or b"") + gen(op["seed"], op["n"])
    elif kind == "mkdir":
        m[op["path"]] = None
    elif kind == "delete":
        for q in [q for q in m if under(q, op["path"])]:
            del m[q]
    elif kind == "move":
        src, dst = op["src"], op["dst"]
        m.pop(dst, None)  # a replaced file or empty directory
        for q in [q for q in m if under(q, src)]:
            m[dst + q[len(src):]] = m.pop(q)
    else:  # pragma: no cover - a typo in the worker
        raise ValueError(f"unknown op {kind!r}")
    return m


def allowed_states(model: Model, op: dict[str, Any] | None) -> list[tuple[str, Model]]:
    """Every namespace a reader may find after a crash during ``op`` (None: no op was in
    flight). Each operation is atomic, except that ``write(parents=True)`` creates missing
    parent directories one by one before it commits the file."""
    states: list[tuple[str, Model]] = [("before", model)]
    if op is None:
        return states
    if op["op"] == "write" and op.get("mk"):
        m = dict(model)
        for d in op["mk"]:
            m[d] = None
            states.append((f"parents-created-{d}", dict(m)))
    states.append(("after", apply(model, op)))
    return states


def digest(model: Model) -> str:
    """A fingerprint of a namespace: paths, kinds and contents."""
    h = hashlib.sha256()
    for p in sorted(model):
        v = model[p]
        h.update(p.encode() + b"\0")
        h.update(b"d" if v is None else b"f" + hashlib.sha256(v).digest())
    return h.hexdigest()


# -- choosing operations -------------------------------------------------------------------


class Chooser:
    """``focus``: 'mixed' (all kinds) or 'namespace' (mostly moves, deletes and mkdirs:
    cheap operations, so that more kills land inside them)."""

    def __init__(self, rng: random.Random, inline: int, chunk: int, focus: str = "mixed") -> None:
        if focus not in ("mixed", "namespace"):
            raise ValueError(f"unknown focus {focus!r}")
        self.rng, self.inline, self.chunk, self.focus = rng, inline, chunk, focus

    def choose(self, model: Model) -> dict[str, Any]:
        dirs = ["/"] + sorted(p for p, v in model.items() if v is None)
        files = sorted(p for p, v in model.items() if v is not None)
        weights = {
            "write_small": 3.0, "write_big": 2.0, "append": 3.0, "move_file": 3.0,
            "move_dir": 1.5, "delete_file": 1.2, "rmtree": 0.6, "mkdir": 1.0,
        }
        if self.focus == "namespace":
            weights.update(write_small=1.5, write_big=0.0, append=0.5, move_file=5.0,
                           move_dir=4.0, delete_file=1.5, rmtree=1.0, mkdir=2.0)
        if len(files) < 10:  # keep the namespace populated
            weights.update(write_small=weights["write_small"] * 3, delete_file=0.3, rmtree=0.2)
        if len(files) > 30:
            weights.update(delete_file=4.0, rmtree=1.5)
        if len(dirs) < 4:
            weights.update(mkdir=3.0, rmtree=0.0)
        if len(dirs) > 14:
            weights.update(mkdir=0.2, rmtree=1.5)
        kinds, w = list(weights), list(weights.values())
        for _ in range(200):
            kind = self.rng.choices(kinds, w)[0]
            op = getattr(self, f"_{kind}")(model, dirs, files)
            if op is not None:
                op["kind"] = kind
                return op
        # fallback (never expected): a small overwrite at the top level
        return {"op": "write", "kind": "write_small", "path": "/x0", "mode": "overwrite",
                "seed": self.rng.getrandbits(48), "n": 10, "mk": []}

    def _new_file_path(self, model: Model, dirs: list[str]) -> tuple[str, list[str]] | None:
        """A file path in an existing directory, sometimes in a new sub-directory."""
        rng = self.rng
        parent = rng.choice([d for d in dirs if depth(d) <= MAX_NEW_DEPTH])
        mk: list[str] = []
        if rng.random() < 0.15 and depth(parent) < MAX_NEW_DEPTH:
            sub = join(parent, rng.choice(DIR_NAMES))
            if sub in model:
                return None
            mk.append(sub)
            parent = sub
        path = join(parent, rng.choice(FILE_NAMES))
        if path in model and model[path] is None:
            return None
        return path, mk

    def _write(self, model: Model, dirs: list[str], n: int) -> dict[str, Any] | None:
        picked = self._new_file_path(model, dirs)
        if picked is None:
            return None
        path, mk = picked
        exists = path in model
        mode = "overwrite" if exists else self.rng.choice(["create", "overwrite"])
        return {"op": "write", "path": path, "mode": mode, "seed": self.rng.getrandbits(48),
                "n": n, "mk": mk}

    def _write_small(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        return self._write(model, dirs, self.rng.randint(0, self.inline))

    def _write_big(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        return self._write(model, dirs, self.rng.randint(self.inline + 1, 3 * self.chunk + 999))

    def _append(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        rng = self.rng
        if files and rng.random() < 0.85:
            path = rng.choice(files)
            if len(model[path] or b"") > MAX_APPEND_SIZE:
                return None
        else:
            parent = rng.choice([d for d in dirs if depth(d) <= MAX_NEW_DEPTH])
            path = join(parent, rng.choice(FILE_NAMES))
            if path in model and model[path] is None:
                return None
        small = 1.0 if self.focus == "namespace" else 0.7
        if rng.random() < small:
            n = rng.randint(1, 700)
        else:
            n = rng.randint(self.chunk // 2, 2 * self.chunk)
        return {"op": "append", "path": path, "seed": rng.getrandbits(48), "n": n}

    def _move_file(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        if not files:
            return None
        rng = self.rng
        src = rng.choice(files)
        parent = rng.choice([d for d in dirs if depth(d) <= MAX_NEW_DEPTH])
        dst = join(parent, rng.choice(FILE_NAMES + DIR_NAMES[:1]))
        if dst == src or (dst in model and model[dst] is None):
            return None
        overwrite = dst in model or rng.random() < 0.3
        return {"op": "move", "src": src, "dst": dst, "overwrite": overwrite,
                "replaces": dst in model}

    def _move_dir(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        if len(dirs) < 2:
            return None
        rng = self.rng
        src = rng.choice(dirs[1:])
        parent = rng.choice(dirs)
        if under(parent, src):
            return None  # into itself
        dst = join(parent, rng.choice(DIR_NAMES))
        if dst == src:
            return None
        if dst in model and (model[dst] is not None or any(q.startswith(dst + "/") for q in model)):
            return None  # a file, or a non-empty directory: refused by the volume
        sub = [q for q in model if under(q, src)]
        if max(depth(dst) + depth(q) - depth(src) for q in sub) > MAX_DEPTH:
            return None
        return {"op": "move", "src": src, "dst": dst, "overwrite": dst in model,
                "replaces": dst in model}

    def _delete_file(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        if not files:
            return None
        return {"op": "delete", "path": self.rng.choice(files), "recursive": False}

    def _rmtree(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        if len(dirs) < 2:
            return None
        return {"op": "delete", "path": self.rng.choice(dirs[1:]), "recursive": True}

    def _mkdir(self, model: Model, dirs: list[str], files: list[str]) -> dict | None:
        parent = self.rng.choice([d for d in dirs if depth(d) < MAX_NEW_DEPTH])
        path = join(parent, self.rng.choice(DIR_NAMES))
        if path in model:
            return None
        return {"op": "mkdir", "path": path}


# -- the worker process --------------------------------------------------------------------


def read_namespace(vol: Any, tenant: str) -> Model:
    model: Model = {}
    for info in vol.walk(tenant, "/"):
        model[info.path] = None if info.is_dir else vol.read(tenant, info.path)
    return model


def _engine_of(vol: Any, tenant: str, parent: str) -> int:
    from storage import paths

    ino = vol._resolve_dir(tenant, paths.split_path(parent))[-1]
    return vol.meta.shard_map[vol.meta.vshard_of(tenant, ino)]


def run(op: dict[str, Any], vol: Any, tenant: str) -> None:
    kind = op["op"]
    if kind == "write":
        vol.write(tenant, op["path"], gen(op["seed"], op["n"]), mode=op["mode"], parents=True)
    elif kind == "append":
        vol.write(tenant, op["path"], gen(op["seed"], op["n"]), mode="append")
    elif kind == "mkdir":
        vol.mkdir(tenant, op["path"])
    elif kind == "delete":
        vol.delete(tenant, op["path"], recursive=op["recursive"])
    elif kind == "move":
        vol.move(tenant, op["src"], op["dst"], overwrite=op["overwrite"])
    else:  # pragma: no cover
        raise ValueError(f"unknown op {kind!r}")


def main(argv: list[str]) -> int:
    home, tenant, log_path, seed = argv[1], argv[2], argv[3], int(argv[4])
    focus = argv[5] if len(argv) > 5 else "mixed"
    max_ops = int(argv[6]) if len(argv) > 6 else None
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(**fields: Any) -> None:
        fields["t"] = round(time.time(), 6)
        os.write(fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())
        os.fsync(fd)

    from storage.volume import Volume

    vol = Volume.open(home)
    model = read_namespace(vol, tenant)
    chooser = Chooser(random.Random(seed), vol.cfg.inline_threshold, vol.cfg.chunk_size, focus)
    record(ev="ready", pid=os.getpid(), digest=digest(model), entries=len(model))
    i = 0
    while max_ops is None or i < max_ops:
        op = chooser.choose(model)
        if op["op"] == "move":
            op["cross"] = _engine_of(vol, tenant, dirname(op["src"])) != _engine_of(
                vol, tenant, dirname(op["dst"]))
        record(ev="op", i=i, op=op)
        try:
            run(op, vol, tenant)
        except Exception as exc:  # every chosen op is valid: any error is a finding
            record(ev="error", i=i, error=f"{type(exc).__name__}: {exc}",
                   tb=traceback.format_exc())
            return 3
        record(ev="ack", i=i)
        model = apply(model, op)
        i += 1
    vol.close()
    record(ev="done", ops=i, digest=digest(model))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
