"""zfec's Reed-Solomon code computed with ISA-L's SIMD kernels, where a library has them.

zfec multiplies over GF(2^8) with one table lookup per byte and has no SIMD path: on a
k=4, m=6 put it was 42% of all CPU samples. ISA-L (Intel's storage acceleration library)
multiplies 32 or 64 bytes per instruction with AVX2 / AVX-512 / GFNI and measured 15-25x
faster here. Both use the field with polynomial 0x11d, and the parity rows below are read
back from zfec itself (by encoding unit vectors), so the shares are byte for byte zfec's:
fragments written with either decode with either, and the on-disk format is unchanged.

ISA-L comes from the ``pyeclib`` wheel, which ships ``libisal`` in ``pyeclib.libs/`` (a
dependency on Linux x86-64 and aarch64, where such wheels exist). Anywhere it is missing,
or with ``LODESTORE_ERASURE=zfec``, :func:`kernel` returns None and zfec does the work.
``ec_encode_data`` is called through ``ctypes.CDLL``, which drops the GIL, so encoding on
several threads uses several cores as zfec did.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
from contextlib import ExitStack
from typing import Any

import zfec


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: the address of any bytes-like object, read-only ones too."""

    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


try:  # CPython's buffer API; elsewhere (no ctypes.pythonapi) zfec does the work
    _get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    _get_buffer.restype = ctypes.c_int
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
    _release_buffer.restype = None
    _BUFFER_API = True
except AttributeError:  # pragma: no cover - not CPython
    _BUFFER_API = False


class _Pinned:
    """Holds a buffer export open (the object cannot be resized or freed) while C reads it."""

    def __init__(self, obj: Any) -> None:
        self.view = _PyBuffer()
        if _get_buffer(obj, ctypes.byref(self.view), 0) != 0:  # PyBUF_SIMPLE: contiguous
            raise BufferError("cannot read this object's buffer")
        self.address: int = self.view.buf or 0
        self.length: int = self.view.len

    def __enter__(self) -> _Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        _release_buffer(ctypes.byref(self.view))


def zfec_parity_rows(k: int, m: int) -> bytes:
    """zfec's (m−k)×k parity coefficients, row-major, read back by encoding unit vectors."""
    enc = zfec.Encoder(k, m)
    rows = m - k
    out = bytearray(rows * k)
    for j in range(k):
        src = [b"\0"] * k
        src[j] = b"\1"
        for r, block in enumerate(enc.encode(src, list(range(k, m)))):
            out[r * k + j] = block[0]
    return bytes(out)


def code_rows(k: int, m: int, nums: list[int] | tuple[int, ...]) -> bytes:
    """Rows ``nums`` of the systematic code's m×k matrix: identity rows for data
    shares, zfec's parity rows for the rest."""
    parity = zfec_parity_rows(k, m)
    return b"".join(bytes(1 if j == n else 0 for j in range(k)) if n < k
                    else parity[(n - k) * k:(n - k + 1) * k] for n in nums)


class Kernel:
    """ISA-L's ``ec_init_tables`` / ``ec_encode_data`` / ``gf_invert_matrix``, typed."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._init = lib.ec_init_tables
        self._init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
        self._init.restype = None
        self._encode = lib.ec_encode_data
        self._encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p]
        self._encode.restype = None
        self._invert = lib.gf_invert_matrix
        self._invert.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._invert.restype = ctypes.c_int
        self._tables: dict[tuple, ctypes.Array] = {}
        self._lock = threading.Lock()

    def tables(self, k: int, rows: bytes) -> ctypes.Array:
        """Expanded multiplication tables for a (len(rows)/k)×k coefficient matrix."""
        key = (k, rows)
        t = self._tables.get(key)
        if t is None:
            t = ctypes.create_string_buffer(32 * len(rows))
            self._init(k, len(rows) // k, rows, t)
            with self._lock:
                if len(self._tables) >= 256:  # decode rows vary with the failure pattern
                    self._tables.clear()
                self._tables[key] = t
        return t

    def dot(self, k: int, rows: bytes, sources: list[Any], length: int) -> list[bytearray]:
        """Each row of ``rows`` times the k ``sources`` (each ``length`` bytes)."""
        if len(sources) != k or len(rows) % k:
            raise ValueError(f"need {k} sources and rows of {k} coefficients")
        if length > MAX_LENGTH:
            raise ValueError(f"ISA-L takes at most {MAX_LENGTH} bytes per share, not {length}")
        n = len(rows) // k
        outs = [bytearray(length) for _ in range(n)]
        with ExitStack() as stack:
            src = (ctypes.c_void_p * k)()
            for j, s in enumerate(sources):
                pin = stack.enter_context(_Pinned(s))
                if pin.length < length:
                    raise ValueError(f"source {j} holds {pin.length} bytes, need {length}")
                src[j] = pin.address
            dst = (ctypes.c_void_p * n)()
            for r, o in enumerate(outs):
                dst[r] = stack.enter_context(_Pinned(o)).address
            if length:
                self._encode(length, k, n, self.tables(k, rows), src, dst)
        return outs

    def invert(self, matrix: bytes, n: int) -> bytes:
        """The inverse of an n×n matrix over GF(2^8) (ISA-L's routine clobbers its input)."""
        a = ctypes.create_string_buffer(matrix, n * n)
        b = ctypes.create_string_buffer(n * n)
        if self._invert(a, b, n) != 0:
            raise ValueError("singular decode matrix")
        return b.raw


MAX_LENGTH = 2**31 - 1  # ec_encode_data takes the length as a C int


def agrees_with_zfec(kern: Kernel) -> bool:
    """Encode and decode odd-length data for 1-8 parity rows and compare with zfec.

    ISA-L picks its kernel (SSE, AVX2, AVX-512, GFNI) by CPU at run time, so the one
    that runs here may be one no test exercised; a wrong one would corrupt parity
    silently. A few milliseconds, once per process.
    """
    for k, m in ((1, 2), (2, 4), (3, 6), (4, 6), (4, 8), (5, 10), (6, 13), (10, 14), (8, 16)):
        n = 2 * k + 1 + 64 * k  # odd, past a vector width, a partial last vector
        data = [bytes((i * 131 + j * 7 + 1) % 256 for i in range(n)) for j in range(k)]
        want = zfec.Encoder(k, m).encode(data, list(range(k, m)))
        rows = zfec_parity_rows(k, m)
        got = kern.dot(k, rows, data, n)
        if [bytes(g) for g in got] != list(want):
            return False
        # decode data share 0 from the last k shares (parity first when m - k >= k)
        nums = list(range(m - k, m))
        shares = {**dict(enumerate(data)), **{k + r: want[r] for r in range(m - k)}}
        inv = kern.invert(code_rows(k, m, nums), k)
        if bytes(kern.dot(k, inv[:k], [shares[i] for i in nums], n)[0]) != data[0]:
            return False
    return True


_kernel: Kernel | None = None
_loaded = False
_load_lock = threading.Lock()


def _find_library() -> str | None:
    spec = importlib.util.find_spec("pyeclib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for pkg in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(os.path.dirname(pkg), "pyeclib.libs", "libisal*.so*")))
        if hits:
            return hits[0]
    return None


def kernel() -> Kernel | None:
    """The ISA-L kernel, or None when it is unavailable or ``LODESTORE_ERASURE=zfec``."""
    global _kernel, _loaded
    if os.environ.get("LODESTORE_ERASURE", "").strip().lower() == "zfec":
        return None
    if not _loaded:
        with _load_lock:
            if not _loaded:
                path = _find_library() if _BUFFER_API else None
                if path is not None:
                    try:
                        kern = Kernel(ctypes.CDLL(path), path)
                        _kernel = kern if agrees_with_zfec(kern) else None
                    except (OSError, AttributeError, ValueError):
                        _kernel = None
                _loaded = True
    return _kernel
