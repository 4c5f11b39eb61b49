"""Redis / Valkey KV backend, chosen by a ``redis://`` or ``rediss://`` URL.

Layout under the URL's ``prefix`` (default ``lodestore:``): ``{prefix}{ns}:v:{key}`` holds
a value (with a native expiry for TTLs) and the sorted set ``{prefix}{ns}:i`` indexes the
namespace's keys for ordered prefix scans (``ZRANGEBYLEX``). Tenant ids never hold ``:``,
so namespaces cannot collide. Writes go in one MULTI/EXEC; compare-and-set is a Lua script.
Durability is the server's (``appendonly``/``appendfsync``); with ``?waitaof=1`` in the URL
every write also waits until the server has fsynced it to its AOF.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit, urlunsplit

from .base import KVStore, check_key, check_ttl, check_value

_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if cur then return 0 end
else
  if (not cur) or cur ~= ARGV[2] then return 0 end
end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  if ARGV[6] ~= '' then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[6])
  else
    redis.call('SET', KEYS[1], ARGV[4])
  end
  redis.call('ZADD', KEYS[2], 0, ARGV[5])
end
return 1
"""


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class RedisKV(KVStore):
    def __init__(self, url: str) -> None:
        import redis

        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.prefix = q.pop("prefix", ["lodestore:"])[0]
        self.waitaof = q.pop("waitaof", ["0"])[0] in ("1", "true", "yes")
        rest = "&".join(f"{k}={v[0]}" for k, v in q.items())
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
        self.url = url
        self.r = redis.Redis.from_url(clean, socket_timeout=30)
        self.r.ping()  # a wrong URL fails at open, not at the first write
        self._cas = self.r.register_script(_CAS)

    def _vk(self, ns: str, key: str) -> str:
        return f"{self.prefix}{ns}:v:{key}"

    def _ik(self, ns: str) -> str:
        return f"{self.prefix}{ns}:i"

    def _sync(self) -> None:
        if self.waitaof:
            self.r.execute_command("WAITAOF", 1, 0, 5000)

    def get(self, ns: str, key: str) -> bytes | None:
        return self.r.get(self._vk(self._ns(ns), check_key(key)))

    def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        ns = self._ns(ns)
        return list(self.r.mget([self._vk(ns, check_key(k)) for k in keys]))

    def put(self, ns: str, key: str, value: bytes, ttl: float | None = None) -> None:
        self.put_many(ns, [(key, value)], ttl)

    def put_many(self, ns: str, items: Sequence[tuple[str, bytes]],
                 ttl: float | None = None) -> None:
        ns = self._ns(ns)
        ttl = check_ttl(ttl)
        rows = [(check_key(k), check_value(v)) for k, v in items]
        if not rows:
            return
        pipe = self.r.pipeline(transaction=True)
        for k, v in rows:
            pipe.set(self._vk(ns, k), v, px=None if ttl is None else max(1, int(ttl * 1000)))
        pipe.zadd(self._ik(ns), {k: 0 for k, _ in rows})
        pipe.execute()
        self._sync()

    def delete(self, ns: str, key: str) -> bool:
        ns, key = self._ns(ns), check_key(key)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._vk(ns, key))
        pipe.zrem(self._ik(ns), key)
        n, _ = pipe.execute()
        self._sync()
        return bool(n)

    def delete_many(self, ns: str, keys: Sequence[str]) -> int:
        ns = self._ns(ns)
        keys = [check_key(k) for k in keys]
        if not keys:
            return 0
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*[self._vk(ns, k) for k in keys])
        pipe.zrem(self._ik(ns), *keys)
        n, _ = pipe.execute()
        self._sync()
        return int(n)

    def cas(self, ns: str, key: str, expected: bytes | None, value: bytes | None,
            ttl: float | None = None) -> bool:
        ns, key = self._ns(ns), check_key(key)
        ttl = check_ttl(ttl)
        if value is not None:
            value = check_value(value)
        args = ["0" if expected is None else "1", expected or b"",
                "0" if value is None else "1", value or b"", key,
                "" if ttl is None else str(max(1, int(ttl * 1000)))]
        ok = bool(self._cas(keys=[self._vk(ns, key), self._ik(ns)], args=args))
        if ok:
            self._sync()
        return ok

    def scan(self, ns: str, prefix: str = "", *, start_after: str | None = None,
             limit: int | None = None) -> list[tuple[str, bytes]]:
        ns = self._ns(ns)
        lo = f"[{prefix}" if prefix else "-"
        if start_after is not None and start_after >= prefix:
            lo = f"({start_after}"
        hi = f"({_prefix_end(prefix)}" if prefix else "+"
        out: list[tuple[str, bytes]] = []
        stale: list[str] = []
        offset = 0
        page = 512 if limit is None else max(16, min(512, limit * 2))
        while True:
            keys = [k.decode() for k in self.r.zrangebylex(self._ik(ns), lo, hi, offset, page)]
            if not keys:
                break
            values = self.r.mget([self._vk(ns, k) for k in keys])
            for k, v in zip(keys, values, strict=True):
                if v is None:
                    stale.append(k)  # expired: Redis dropped the value, not the index entry
                    continue
                out.append((k, v))
                if limit is not None and len(out) >= limit:
                    break
            if (limit is not None and len(out) >= limit) or len(keys) < page:
                break
            offset += page
        if stale:
            self.r.zrem(self._ik(ns), *stale)
        return out

    def count_range(self, ns: str, lo: str, hi: str) -> int:
        ns = self._ns(ns)
        return int(self.r.zlexcount(self._ik(ns), f"[{check_key(lo)}", f"[{check_key(hi)}"))

    def incr(self, ns: str, key: str, by: int = 1) -> int:
        ns, key = self._ns(ns), check_key(key)
        pipe = self.r.pipeline(transaction=True)
        pipe.incrby(self._vk(ns, key), by)
        pipe.zadd(self._ik(ns), {key: 0})
        n, _ = pipe.execute()
        self._sync()
        return int(n)

    def purge(self, ns: str | None = None) -> int:
        spaces = [self._ns(ns)] if ns is not None else [
            k.decode()[len(self.prefix):-2] for k in self.r.scan_iter(f"{self.prefix}*:i")]
        removed = 0
        for space in spaces:
            keys = [k.decode() for k in self.r.zrange(self._ik(space), 0, -1)]
            for i in range(0, len(keys), 512):
                part = keys[i:i + 512]
                gone = [k for k, n in zip(part, self.r.mget([self._vk(space, k) for k in part]),
                                          strict=True) if n is None]
                if gone:
                    removed += self.r.zrem(self._ik(space), *gone)
        return removed

    def drop_namespace(self, ns: str) -> int:
        ns = self._ns(ns)
        keys = [k.decode() for k in self.r.zrange(self._ik(ns), 0, -1)]
        n = 0
        for i in range(0, len(keys), 512):
            n += self.r.delete(*[self._vk(ns, k) for k in keys[i:i + 512]])
        self.r.delete(self._ik(ns))
        return n

    def close(self) -> None:
        self.r.close()
