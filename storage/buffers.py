"""Fresh ``bytes`` objects that reads fill in place.

A read that returns ``bytes`` normally copies its data once more than the kernel did:
into ``bytearray`` buffers, then ``b"".join`` (or ``bytes(buf)``) for the immutable result.
On a 2-core machine that copy is GIL-held CPU beside the kernel's own copy and costs a big
read a fifth of its speed. CPython builds the result of ``os.read`` the same way this does:
it allocates an uninitialised bytes object and reads into it before anyone else can see
it. ``fresh_bytes`` does that from Python (``PyBytes_FromStringAndSize(NULL, n)`` through
ctypes) and hands out a writable view of its buffer for the reader to fill.

Rules for callers: fill the view completely, release it, and only then let the bytes
object escape. Where the trick is unavailable (another interpreter, a layout that fails
the self-check at import) a ``bytearray`` stands in: same API, one copy at ``finish``.
"""

from __future__ import annotations

import ctypes
import sys


class Fresh:
    """A bytes object under construction and a writable view of its ``n`` bytes."""

    __slots__ = ("_obj", "view")

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError("size must be >= 0")
        self._obj: bytes | bytearray
        if n == 0:  # the empty bytes object is a shared singleton: never write into it
            self._obj, self.view = b"", memoryview(bytearray())
        elif _new is not None:
            obj = _new(None, n)
            self._obj = obj
            self.view = memoryview((ctypes.c_char * n).from_address(id(obj) + _OFFSET)
                                   ).cast("B")
        else:
            buf = bytearray(n)
            self._obj, self.view = buf, memoryview(buf)

    def finish(self) -> bytes:
        """The filled bytes (call once, after every write into ``view`` has ended)."""
        self.view.release()
        obj = self._obj
        self._obj = b""
        return obj if type(obj) is bytes else bytes(obj)


def _setup() -> tuple[object | None, int]:
    if sys.implementation.name != "cpython":
        return None, 0
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        offset = bytes.__basicsize__ - 1  # ob_sval: the data, after the header
        probe = new(None, 300)
        view = memoryview((ctypes.c_char * 300).from_address(id(probe) + offset)).cast("B")
        view[:] = bytes(range(256)) + bytes(range(44))
        view.release()
        if probe != bytes(range(256)) + bytes(range(44)) or len(probe) != 300:
            return None, 0
        return new, offset
    except Exception:  # noqa: BLE001 - no ctypes, no pythonapi: use the bytearray fallback
        return None, 0


_new, _OFFSET = _setup()
ZERO_COPY = _new is not None
