"""Tenant QoS: token buckets, a fair scheduler with priority classes, and quotas.

Every governed call passes :meth:`Scheduler.admit` (async) or :meth:`Scheduler.admit_sync`
(threads: the CLI, background workers) before it touches storage::

    async with scheduler.admit("acme", cost_bytes=len(data)) as ticket:
        ...                       # the operation
        ticket.charge(n_read)     # bytes only known afterwards (reads)

Admission has two stages.

1. **Rate** - each tenant has two token buckets, ops/s and bytes/s. A call reserves one op
   and its known byte cost. A bucket may go negative (a big write, or bytes charged after
   the fact with :meth:`Ticket.charge`); the next calls then wait until it has refilled.
   The wait is computed from the refill rate, so a call that would wait longer than its
   bound (``QosPolicy.max_wait_ms``) fails at once with :class:`RateLimited` and the exact
   ``retry_after_ms`` instead of sleeping first. A call larger than the burst goes when
   the bucket is full, then leaves it in debt, so big writes are possible but paid for.
2. **Slots** - the server runs at most ``capacity`` operations at once. When they are all
   taken, waiting calls are granted in this order: strict priority between the classes
   ``interactive`` > ``batch`` > ``background`` (scrub, repair and GC), except that the
   lower classes keep a small reserved share (default batch 10 %, background 5 % of the
   grants made while they wait) so they are never starved; within a class, start-time
   fair queuing on a virtual clock, weighted by ``QosPolicy.weight``, so a tenant that
   floods the server gets its share and no more. The last ``headroom`` free slots go only
   to tenants below their fair share, so a quiet tenant's call finds a slot at once
   instead of waiting behind a flood. A tenant's ``max_concurrency`` caps its own running
   operations. Waiting for a slot counts against the same bound.

Buckets live in process (:class:`LocalBuckets`) or, for several server replicas, in
Redis/Valkey (:class:`RedisBuckets`, one Lua script per decision, the server's clock),
chosen by URL with :func:`make_buckets`.

The scheduler is thread-safe: one lock guards its state, async waiters are woken on their
own event loop (``call_soon_threadsafe`` when the grant comes from another thread), and
sync waiters on a ``threading.Event``. It runs on asyncio (the MCP SDK's anyio backend).

Quotas (:func:`check_quota`, :class:`Quota`) refuse writes that would take a tenant past
its byte or file limit, with a message that says how far and what to do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from storage.errors import ConfigError, InvalidArgument, StorageError

log = logging.getLogger(__name__)

PRIORITIES: tuple[str, ...] = ("interactive", "batch", "background")
_CLASS = {name: i for i, name in enumerate(PRIORITIES)}
DEFAULT_RESERVED_SHARE: dict[str, float] = {"batch": 0.10, "background": 0.05}

Spec = tuple[float, float]  # (rate per second, burst)
Reservation = tuple[bool, float, str | None]  # (reserved, wait seconds, limiting bucket)


# ---------------------------------------------------------------------------- errors


class RateLimited(StorageError):
    """A call would have waited longer than its bound. Retry after ``retry_after_ms``.

    ``limit`` names what was exhausted: ``ops`` or ``bytes`` (the tenant's rate),
    ``concurrency`` (the tenant's ``max_concurrency``) or ``capacity`` (the server's).
    """

    code = "rate_limited"

    def __init__(self, retry_after_ms: int, tenant: str, limit: str, detail: str) -> None:
        self.retry_after_ms = int(retry_after_ms)
        self.tenant = tenant
        self.limit = limit
        super().__init__(f"rate limited: retry after {self.retry_after_ms} ms ({detail})")


class QuotaExceeded(StorageError):
    """A write would take the tenant past its byte or file quota."""

    code = "quota_exceeded"

    def __init__(self, tenant: str | None, kind: str, used: int, limit: int, add: int) -> None:
        self.tenant, self.kind, self.used, self.limit, self.add = tenant, kind, used, limit, add
        self.excess = used + add - limit
        who = f" for tenant {tenant}" if tenant else ""
        if kind == "bytes":
            state = f"{format_bytes(used)} of {format_bytes(limit)} used"
            need = format_bytes(self.excess, round_up=True)
            what = "delete files"
        else:
            state = f"{used} of {limit} files used"
            need = f"{self.excess} file{'s' if self.excess != 1 else ''}"
            what = "delete files or directories"
        super().__init__(
            f"quota exceeded{who}: {state}, this write needs {need} more; "
            f"{what} or ask an admin to raise quotas.{kind}"
        )


# ---------------------------------------------------------------------------- policy


def _positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"qos.{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or math.isinf(value):
        raise InvalidArgument(
            f"qos.{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}"
        )


@dataclass(frozen=True)
class QosPolicy:
    """One tenant's QoS. ``None`` rates mean unlimited.

    ``burst`` is the ops bucket's size (default: one second of ``ops_per_second``, at
    least 1). The bytes bucket holds ``bytes_burst`` (default ``bytes_per_second *
    burst_seconds``). ``priority`` is the tenant's class and also its ceiling: a call may
    ask for a lower class, never a higher one. ``weight`` is the tenant's share of the
    server within its class. ``max_wait_ms`` bounds how long a call waits (for tokens and
    for a slot together) before it fails with :class:`RateLimited`.
    """

    ops_per_second: float | None = None
    bytes_per_second: float | None = None
    burst: float | None = None
    priority: str = "interactive"
    max_concurrency: int | None = None
    weight: float = 1.0
    max_wait_ms: float = 2000
    bytes_burst: float | None = None
    burst_seconds: float = 1.0

    def __post_init__(self) -> None:
        _positive("ops_per_second", self.ops_per_second)
        _positive("bytes_per_second", self.bytes_per_second)
        _positive("burst", self.burst)
        _positive("bytes_burst", self.bytes_burst)
        _positive("burst_seconds", self.burst_seconds)
        _positive("weight", self.weight)
        _positive("max_wait_ms", self.max_wait_ms, allow_zero=True)
        if self.priority not in _CLASS:
            raise InvalidArgument(
                f"qos.priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}"
            )
        mc = self.max_concurrency
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise InvalidArgument(f"qos.max_concurrency must be an integer >= 1, got {mc!r}")

    @property
    def ops_spec(self) -> Spec | None:
        """(rate, burst) of the ops bucket, or None when unlimited."""
        if self.ops_per_second is None:
            return None
        burst = self.burst if self.burst is not None else max(1.0, float(self.ops_per_second))
        return (float(self.ops_per_second), float(max(burst, 1.0)))

    @property
    def bytes_spec(self) -> Spec | None:
        """(rate, burst) of the bytes bucket, or None when unlimited."""
        if self.bytes_per_second is None:
            return None
        burst = self.bytes_burst
        if burst is None:
            burst = self.bytes_per_second * self.burst_seconds
        return (float(self.bytes_per_second), float(max(burst, 1.0)))

    @classmethod
    def from_spec(cls, spec: Any) -> QosPolicy:
        """Build from a mapping or an object with the same field names (e.g. the
        ``qos`` section of a governance policy document). Unknown keys are refused."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        names = cls.__dataclass_fields__
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise InvalidArgument(
                    f"unknown qos field(s) {', '.join(unknown)}; allowed: {', '.join(names)}"
                )
            values = dict(spec)
        else:
            values = {n: getattr(spec, n) for n in names if hasattr(spec, n)}
        return cls(**values)


# ---------------------------------------------------------------------------- buckets


class TokenBucket:
    """A token bucket with explicit time (seconds); the tokens may go negative (debt).

    ``wait(cost, now)`` is how long until ``min(cost, burst)`` tokens are there: a call
    larger than the bucket goes when the bucket is full and leaves it in debt.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = float(burst), now

    def level(self, now: float) -> float:
        if now > self.stamp:
            self.tokens += (now - self.stamp) * self.rate
            self.stamp = now
        if self.tokens > self.burst:
            self.tokens = self.burst
        return self.tokens

    def configure(self, rate: float, burst: float, now: float) -> None:
        self.level(now)
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = min(self.tokens, self.burst)

    def wait(self, cost: float, now: float) -> float:
        need = min(cost, self.burst)
        have = self.level(now)
        return 0.0 if have >= need else (need - have) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.level(now)
        self.tokens -= cost

    def give(self, cost: float, now: float) -> None:
        self.level(now)
        self.tokens = min(self.burst, self.tokens + cost)


class Buckets(Protocol):
    """Where tenants' buckets live. ``shared`` backends do I/O and also provide
    ``areserve``, ``arefund`` and ``acharge`` coroutines, which the event loop uses."""

    shared: bool

    def reserve(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
                bytes_cost: float, max_wait_s: float) -> Reservation: ...

    def refund(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
               bytes_cost: float) -> None: ...

    def charge(self, tenant: str, nbytes: Spec, bytes_cost: float) -> None: ...

    def close(self) -> None: ...


class LocalBuckets:
    """In-process buckets: limits hold per server process (``memory://``)."""

    shared = False

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._b: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, tenant: str, kind: str, spec: Spec, now: float) -> TokenBucket:
        b = self._b.get((tenant, kind))
        if b is None:
            b = self._b[(tenant, kind)] = TokenBucket(spec[0], spec[1], now)
        elif b.rate != spec[0] or b.burst != spec[1]:
            b.configure(spec[0], spec[1], now)
        return b

    def reserve(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
                bytes_cost: float, max_wait_s: float) -> Reservation:
        now = self._clock()
        with self._lock:
            wait, which = 0.0, None
            bo = bb = None
            if ops is not None:
                bo = self._bucket(tenant, "ops", ops, now)
                w = bo.wait(ops_cost, now)
                if w > wait:
                    wait, which = w, "ops"
            if nbytes is not None:
                bb = self._bucket(tenant, "bytes", nbytes, now)
                w = bb.wait(bytes_cost, now)
                if w > wait:
                    wait, which = w, "bytes"
            if wait > max_wait_s:
                return False, wait, which
            # wait() levelled both buckets at `now`: take without levelling again
            if bo is not None:
                bo.tokens -= ops_cost
            if bb is not None:
                bb.tokens -= bytes_cost
            return True, wait, which

    def refund(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
               bytes_cost: float) -> None:
        now = self._clock()
        with self._lock:
            if ops is not None:
                self._bucket(tenant, "ops", ops, now).give(ops_cost, now)
            if nbytes is not None:
                self._bucket(tenant, "bytes", nbytes, now).give(bytes_cost, now)

    def charge(self, tenant: str, nbytes: Spec, bytes_cost: float) -> None:
        now = self._clock()
        with self._lock:
            self._bucket(tenant, "bytes", nbytes, now).take(bytes_cost, now)

    def level(self, tenant: str, kind: str) -> float | None:
        """Current tokens of a bucket (for tests and metrics); None if never used."""
        with self._lock:
            b = self._b.get((tenant, kind))
            return None if b is None else b.level(self._clock())

    def close(self) -> None:
        pass


# One decision per call, on the Redis server's clock, for both of a tenant's buckets.
# KEYS: ops bucket, bytes bucket. ARGV: mode ('r' reserve | 'f' refund | 'c' charge),
# max wait in microseconds, then rate, burst, cost for ops and for bytes (rate 0: none).
# Returns {reserved 0|1, wait in microseconds, limiting bucket 0 none | 1 ops | 2 bytes}.
_LUA = """
local mode = ARGV[1]
local max_wait = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lv = {}
local wait, which = 0, 0
for i = 1, 2 do
  local rate = tonumber(ARGV[3 * i])
  if rate > 0 then
    local burst, cost = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
    local v = redis.call('HMGET', KEYS[i], 't', 's')
    local tok, ts = tonumber(v[1]), tonumber(v[2])
    if tok == nil or ts == nil then
      tok = burst
    elseif now > ts then
      tok = tok + (now - ts) * rate / 1000000
    end
    if tok > burst then tok = burst end
    lv[i] = tok
    if mode == 'r' then
      local need = math.min(cost, burst)
      if tok < need then
        local w = (need - tok) / rate * 1000000
        if w > wait then wait, which = w, i end
      end
    end
  end
end
if mode == 'r' and wait > max_wait then
  return {0, math.ceil(wait), which}
end
for i = 1, 2 do
  local tok = lv[i]
  if tok ~= nil then
    local rate, burst, cost = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]),
      tonumber(ARGV[3 * i + 2])
    if mode == 'f' then
      tok = math.min(burst, tok + cost)
    else
      tok = tok - cost
    end
    redis.call('HSET', KEYS[i], 't', string.format('%.17g', tok), 's',
      string.format('%.17g', now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tok) / rate * 1000) + 1000)
  end
end
return {1, math.ceil(wait), which}
"""

_WHICH = {0: None, 1: "ops", 2: "bytes"}


class RedisBuckets:
    """Buckets shared by every server replica, in Redis or Valkey.

    One Lua script per decision on the Redis server's clock, so replicas need no clock
    agreement. Keys are ``{prefix}{{tenant}}:ops`` and ``:bytes`` (a hash tag, so both of a
    tenant's keys share a cluster slot) and expire once the bucket would be full again.
    If Redis cannot be reached and ``fallback_local`` is set, decisions fall back to
    in-process buckets (limits then hold per replica) for ``retry_after_s`` before Redis
    is tried again, and a warning is logged; otherwise the call fails with StorageError.
    """

    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "lodestore:qos:",
                 *, fallback_local: bool = True, socket_timeout: float = 0.5,
                 retry_after_s: float = 5.0) -> None:
        try:
            import redis  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                f"QoS buckets at {url} need the redis package: pip install redis ({exc})"
            ) from exc
        self.url, self.prefix = url, prefix
        self.fallback_local = fallback_local
        self.retry_after_s = retry_after_s
        self._timeout = socket_timeout
        self._client: Any = None
        self._script: Any = None
        self._aclients: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._local = LocalBuckets()
        self._warned_at = -math.inf
        self._down_until = -math.inf
        self._lock = threading.Lock()

    def keys(self, tenant: str) -> list[str]:
        return [f"{self.prefix}{{{tenant}}}:ops", f"{self.prefix}{{{tenant}}}:bytes"]

    @staticmethod
    def _args(mode: str, max_wait_s: float, ops: Spec | None, nbytes: Spec | None,
              ops_cost: float, bytes_cost: float) -> list[str]:
        o = ops or (0.0, 0.0)
        b = nbytes or (0.0, 0.0)
        mw = min(max_wait_s, 1e9) * 1e6
        return [mode, repr(mw), repr(o[0]), repr(o[1]), repr(float(ops_cost)),
                repr(b[0]), repr(b[1]), repr(float(bytes_cost))]

    def _sync(self) -> Any:
        with self._lock:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(
                    self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
                )
                self._script = self._client.register_script(_LUA)
            return self._script

    def _async(self) -> Any:
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        if entry is None:
            import redis.asyncio as aredis

            client = aredis.Redis.from_url(
                self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
            entry = (client, client.register_script(_LUA))
            self._aclients[loop] = entry
        return entry[1]

    def _unreachable(self, exc: Exception) -> None:
        if not self.fallback_local:
            raise StorageError(
                f"QoS buckets at {self.url} are unreachable ({exc}); check that Redis is "
                "running or configure qos buckets as memory://"
            ) from exc
        now = time.monotonic()
        self._down_until = now + self.retry_after_s
        if now - self._warned_at > 30:
            self._warned_at = now
            log.warning("QoS buckets at %s unreachable (%s); using per-process buckets",
                        self.url, exc)

    @staticmethod
    def _conn_errors() -> tuple[type[BaseException], ...]:
        import redis

        return (redis.ConnectionError, redis.TimeoutError, OSError)

    @staticmethod
    def _result(r: Any) -> Reservation:
        return bool(int(r[0])), int(r[1]) / 1e6, _WHICH.get(int(r[2]))

    def _run(self, tenant: str, args: list[str], local: Any) -> Any:
        if time.monotonic() < self._down_until:
            return local()
        try:
            return self._sync()(keys=self.keys(tenant), args=args)
        except self._conn_errors() as exc:
            self._unreachable(exc)
            return local()

    async def _arun(self, tenant: str, args: list[str], local: Any) -> Any:
        if time.monotonic() < self._down_until:
            return local()
        try:
            return await self._async()(keys=self.keys(tenant), args=args)
        except self._conn_errors() as exc:
            self._unreachable(exc)
            return local()

    def reserve(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
                bytes_cost: float, max_wait_s: float) -> Reservation:
        r = self._run(tenant, self._args("r", max_wait_s, ops, nbytes, ops_cost, bytes_cost),
                      lambda: self._local.reserve(tenant, ops, nbytes, ops_cost, bytes_cost,
                                                  max_wait_s))
        return r if isinstance(r, tuple) else self._result(r)

    async def areserve(self, tenant: str, ops: Spec | None, nbytes: Spec | None,
                       ops_cost: float, bytes_cost: float, max_wait_s: float) -> Reservation:
        r = await self._arun(
            tenant, self._args("r", max_wait_s, ops, nbytes, ops_cost, bytes_cost),
            lambda: self._local.reserve(tenant, ops, nbytes, ops_cost, bytes_cost, max_wait_s))
        return r if isinstance(r, tuple) else self._result(r)

    def refund(self, tenant: str, ops: Spec | None, nbytes: Spec | None, ops_cost: float,
               bytes_cost: float) -> None:
        self._run(tenant, self._args("f", 0, ops, nbytes, ops_cost, bytes_cost),
                  lambda: self._local.refund(tenant, ops, nbytes, ops_cost, bytes_cost))

    async def arefund(self, tenant: str, ops: Spec | None, nbytes: Spec | None,
                      ops_cost: float, bytes_cost: float) -> None:
        await self._arun(tenant, self._args("f", 0, ops, nbytes, ops_cost, bytes_cost),
                         lambda: self._local.refund(tenant, ops, nbytes, ops_cost, bytes_cost))

    def charge(self, tenant: str, nbytes: Spec, bytes_cost: float) -> None:
        self._run(tenant, self._args("c", 0, None, nbytes, 0, bytes_cost),
                  lambda: self._local.charge(tenant, nbytes, bytes_cost))

    async def acharge(self, tenant: str, nbytes: Spec, bytes_cost: float) -> None:
        await self._arun(tenant, self._args("c", 0, None, nbytes, 0, bytes_cost),
                         lambda: self._local.charge(tenant, nbytes, bytes_cost))

    def delete(self, tenant: str) -> None:
        """Forget a tenant's buckets (they start full again)."""
        self._sync()
        self._client.delete(*self.keys(tenant))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = self._script = None

    async def aclose(self) -> None:
        """Close this event loop's connections (and the sync client)."""
        entry = self._aclients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].aclose()
        self.close()


def make_buckets(url: str | None = None) -> LocalBuckets | RedisBuckets:
    """Buckets by URL: ``None``/``memory://`` in process; ``redis://``, ``rediss://``,
    ``valkey://``, ``valkeys://`` shared (``?prefix=...`` sets the key prefix)."""
    if not url or url in ("memory://", "local://"):
        return LocalBuckets()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "valkey", "valkeys", "unix"):
        raise ConfigError(
            f"unsupported QoS bucket URL {url!r}: use memory:// or redis://host:port/db"
        )
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme, scheme)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "lodestore:qos:")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    clean = urlunsplit((scheme, parts.netloc, parts.path, rest, parts.fragment))
    return RedisBuckets(clean, prefix)


# ---------------------------------------------------------------------------- scheduler


class _Tenant:
    __slots__ = ("name", "policy", "ops", "bytes", "cls", "active", "queues", "finish",
                 "admitted", "limited", "waited_s", "touched")

    def __init__(self, name: str, policy: QosPolicy) -> None:
        self.name = name
        self.active = 0
        self.touched = -math.inf
        self.queues: tuple[deque[_Waiter], ...] = (deque(), deque(), deque())
        self.finish = [0.0, 0.0, 0.0]  # per-class virtual finish tag of the last grant
        self.admitted = self.limited = 0
        self.waited_s = 0.0
        self.set_policy(policy)

    def set_policy(self, policy: QosPolicy) -> None:
        self.policy = policy
        self.ops = policy.ops_spec
        self.bytes = policy.bytes_spec
        self.cls = _CLASS[policy.priority]


class _Waiter:
    __slots__ = ("tenant", "cls", "granted", "fut", "loop", "thread", "event")

    def __init__(self, tenant: _Tenant, cls: int) -> None:
        self.tenant, self.cls = tenant, cls
        self.granted = False
        self.fut: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0
        self.event: threading.Event | None = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Ticket:
    """An admitted call. Release it once (the context managers do); charge bytes that
    were only known afterwards with :meth:`charge`."""

    __slots__ = ("_sched", "_st", "_cls", "cost_bytes", "charged_bytes", "_waited",
                 "_granted_at", "_released", "_pending")

    def __init__(self, sched: Scheduler, st: _Tenant, cls: int, cost_bytes: int,
                 waited_s: float, now: float) -> None:
        self._sched, self._st, self._cls = sched, st, cls
        self.cost_bytes = cost_bytes
        self.charged_bytes = self._pending = 0
        self._waited, self._granted_at = waited_s, now
        self._released = False

    @property
    def tenant(self) -> str:
        return self._st.name

    @property
    def priority(self) -> str:
        """The class the call ran in (the policy's, or the lower one asked for)."""
        return PRIORITIES[self._cls]

    @property
    def waited_ms(self) -> float:
        """How long admission took (tokens and slot), for the audit event."""
        return self._waited * 1000.0

    def _held(self) -> float:
        # only needed for retry estimates under contention: skip the clock otherwise
        return time.monotonic() - self._granted_at if self._sched._waiting else 0.0

    def charge(self, nbytes: int) -> None:
        """Charge ``nbytes`` more to the tenant's bytes bucket, without waiting; the bucket
        may go negative so the tenant's next calls wait. With shared (Redis) buckets the
        charge is sent when the ticket is released (or at once, if it already was)."""
        if nbytes <= 0:
            return
        self.charged_bytes += nbytes
        spec = self._st.bytes
        if spec is None:
            return
        buckets = self._sched.buckets
        if buckets.shared and not self._released:
            self._pending += nbytes
        else:
            buckets.charge(self.tenant, spec, nbytes)

    async def acharge(self, nbytes: int) -> None:
        """:meth:`charge`, sent at once also to shared buckets."""
        if nbytes <= 0:
            return
        self.charged_bytes += nbytes
        spec = self._st.bytes
        if spec is None:
            return
        buckets: Any = self._sched.buckets
        if buckets.shared:
            await buckets.acharge(self.tenant, spec, nbytes)
        else:
            buckets.charge(self.tenant, spec, nbytes)

    def release(self) -> None:
        """Give the slot back (idempotent); flushes pending shared charges (blocking)."""
        if self._released:
            return
        self._released = True
        self._sched._release(self._st, self._held())
        if self._pending and self._st.bytes is not None:
            n, self._pending = self._pending, 0
            self._sched.buckets.charge(self.tenant, self._st.bytes, n)

    async def arelease(self) -> None:
        """:meth:`release` without blocking the event loop on shared buckets."""
        if self._released:
            return
        self._released = True
        self._sched._release(self._st, self._held())
        if self._pending and self._st.bytes is not None:
            n, self._pending = self._pending, 0
            buckets: Any = self._sched.buckets
            await buckets.acharge(self.tenant, self._st.bytes, n)


class _Done:
    """An awaitable that is already done (saves a coroutine on the hot path)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


class _AsyncAdmit:
    __slots__ = ("_sched", "_tenant", "_cost", "_prio", "_wait", "_ticket")

    def __init__(self, sched: Scheduler, tenant: str, cost_bytes: int, priority: str | None,
                 max_wait_ms: float | None) -> None:
        self._sched, self._tenant, self._cost = sched, tenant, cost_bytes
        self._prio, self._wait = priority, max_wait_ms
        self._ticket: Ticket | None = None

    def __aenter__(self) -> Awaitable[Ticket]:
        return self._sched.acquire(self._tenant, self._cost, self._prio, self._wait,
                                   _holder=self)

    def __aexit__(self, *exc: object) -> Awaitable[None]:
        t = self._ticket
        if t is None:
            return _DONE
        if t._pending:
            return t.arelease()
        t.release()
        return _DONE


class _SyncAdmit:
    __slots__ = ("_args", "_ticket")

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._ticket: Ticket | None = None

    def __enter__(self) -> Ticket:
        sched, *rest = self._args
        self._ticket = sched.acquire_sync(*rest)
        return self._ticket

    def __exit__(self, *exc: object) -> None:
        if self._ticket is not None:
            self._ticket.release()


def _fmt_rate(v: float) -> str:
    return f"{v:g}"


class Scheduler:
    """Per-tenant token buckets plus a fair, prioritised queue for ``capacity`` slots.

    ``capacity``: operations the server runs at once (default 2 x CPU cores).
    ``default_policy``: for tenants never configured (default: unlimited, interactive).
    ``buckets``: a :class:`Buckets` backend or a URL for :func:`make_buckets`.
    ``reserved_share``: the minimum share of grants for ``batch`` and ``background``
    while higher classes are waiting too (default 0.10 and 0.05).
    ``headroom``: the last free slots (default ``capacity // 8``) go only to tenants below
    their weighted fair share of the capacity among the tenants active in the last
    ``active_window_s`` seconds, so a flooding tenant cannot fill every slot and a quiet
    tenant's next call finds one free instead of waiting for a release. At most this many
    slots stay idle while a tenant over its share waits; a lone tenant may use them all.
    """

    def __init__(self, capacity: int | None = None, *, default_policy: QosPolicy | None = None,
                 buckets: Buckets | str | None = None,
                 reserved_share: Mapping[str, float] | None = None,
                 headroom: int | None = None, active_window_s: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._capacity = 1
        self._headroom_cfg = headroom
        self._headroom = 0
        if headroom is not None and (isinstance(headroom, bool) or not isinstance(headroom, int)
                                     or headroom < 0):
            raise InvalidArgument(f"headroom must be an integer >= 0, got {headroom!r}")
        _positive("active_window_s", active_window_s)
        self._window = float(active_window_s)
        self._touch_every = self._window / 20
        self._recent: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._recent_w = 0.0
        self.default_policy = default_policy or QosPolicy()
        self.buckets: Buckets = (
            buckets if buckets is not None and not isinstance(buckets, str)
            else make_buckets(buckets)
        )
        share = dict(DEFAULT_RESERVED_SHARE)
        share.update(reserved_share or {})
        for name, v in share.items():
            if name not in _CLASS or not 0 <= v <= 1:
                raise InvalidArgument(f"reserved_share: {name!r}={v!r} is not a class and 0..1")
        self._share = [0.0] + [float(share.get(PRIORITIES[c], 0.0)) for c in (1, 2)]
        self._credit = [0.0, 0.0, 0.0]
        self._vtime = [0.0, 0.0, 0.0]
        self._backlog: tuple[dict[str, _Tenant], ...] = ({}, {}, {})
        self._tenants: dict[str, _Tenant] = {}
        self._in_use = 0
        self._waiting = 0
        self._ewma = 0.005  # seconds an operation holds a slot, for retry estimates
        self.set_capacity(capacity if capacity is not None else 2 * (os.cpu_count() or 1))

    # -- configuration

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidArgument(f"capacity must be an integer >= 1, got {capacity!r}")
        with self._lock:
            self._capacity = capacity
            hr = self._headroom_cfg
            self._headroom = min(hr, capacity - 1) if hr is not None else capacity // 8
            if self._waiting:
                self._dispatch()

    def configure(self, tenant: str, policy: QosPolicy | Mapping[str, Any] | None) -> None:
        """Set (or with None, reset to the default) a tenant's policy; takes effect for the
        next calls and for calls already waiting for a slot."""
        pol = self.default_policy if policy is None else QosPolicy.from_spec(policy)
        with self._lock:
            st = self._tenants.get(tenant)
            if st is None:
                self._tenants[tenant] = _Tenant(tenant, pol)
            else:
                st.set_policy(pol)
                if self._waiting:
                    self._dispatch()

    def policy(self, tenant: str) -> QosPolicy:
        st = self._tenants.get(tenant)
        return st.policy if st is not None else self.default_policy

    def stats(self) -> dict[str, Any]:
        """A snapshot for /metrics: slots in use, calls waiting, per-tenant counters."""
        with self._lock:
            return {
                "capacity": self._capacity,
                "headroom": self._headroom,
                "in_use": self._in_use,
                "waiting": self._waiting,
                "tenants": {
                    t.name: {
                        "active": t.active,
                        "waiting": sum(len(q) for q in t.queues),
                        "admitted": t.admitted,
                        "rate_limited": t.limited,
                        "waited_ms": round(t.waited_s * 1000.0, 3),
                    }
                    for t in self._tenants.values()
                },
            }

    # -- admission

    def admit(self, tenant: str, cost_bytes: int = 0, priority: str | None = None, *,
              max_wait_ms: float | None = None) -> _AsyncAdmit:
        """``async with scheduler.admit(tenant, cost_bytes) as ticket:`` - see module doc."""
        return _AsyncAdmit(self, tenant, cost_bytes, priority, max_wait_ms)

    def admit_sync(self, tenant: str, cost_bytes: int = 0, priority: str | None = None, *,
                   max_wait_ms: float | None = None) -> _SyncAdmit:
        """``with scheduler.admit_sync(...) as ticket:`` for threads (blocks while waiting)."""
        return _SyncAdmit(self, tenant, cost_bytes, priority, max_wait_ms)

    def _prepare(self, tenant: str, priority: str | None,
                 max_wait_ms: float | None) -> tuple[_Tenant, int, float]:
        st = self._tenants.get(tenant)
        if st is None:
            with self._lock:
                st = self._tenants.get(tenant)
                if st is None:
                    st = self._tenants[tenant] = _Tenant(tenant, self.default_policy)
        cls = st.cls
        if priority is not None:
            want = _CLASS.get(priority)
            if want is None:
                raise InvalidArgument(
                    f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}"
                )
            cls = max(cls, want)  # the policy's class is the ceiling
        bound = st.policy.max_wait_ms if max_wait_ms is None else max_wait_ms
        return st, cls, max(0.0, bound) / 1000.0

    def _limited(self, st: _Tenant, which: str | None, wait_s: float) -> RateLimited:
        with self._lock:
            st.limited += 1
        ms = max(1, math.ceil(wait_s * 1000.0))
        if which == "bytes" and st.bytes is not None:
            detail = (f"tenant {st.name} is over its bytes/s limit of "
                      f"{format_bytes(st.bytes[0])}/s")
        else:
            rate = _fmt_rate(st.ops[0]) if st.ops is not None else "?"
            detail = f"tenant {st.name} is over its ops/s limit of {rate} ops/s"
        return RateLimited(ms, st.name, which or "ops", detail)

    def _queue_limited(self, st: _Tenant, w: _Waiter) -> RateLimited:
        with self._lock:
            st.limited += 1
            mc = st.policy.max_concurrency
            if mc is not None and st.active >= mc:
                ahead = len(st.queues[w.cls]) + 1
                est = self._ewma * ahead / mc
                limit = "concurrency"
                detail = f"tenant {st.name} has {st.active} calls running, its max_concurrency"
            else:
                est = self._ewma * (self._waiting + 1) / self._capacity
                limit = "capacity"
                detail = f"server at capacity ({self._capacity} concurrent operations)"
                if self._headroom and self._over_share(st):
                    detail += (f"; tenant {st.name} already runs {st.active}, more than its "
                               "fair share while other tenants are active")
        return RateLimited(max(1, math.ceil(est * 1000.0)), st.name, limit, detail)

    async def acquire(self, tenant: str, cost_bytes: int = 0, priority: str | None = None,
                      max_wait_ms: float | None = None, *, _holder: Any = None) -> Ticket:
        """Wait for admission and return the :class:`Ticket`; release it when done."""
        t0 = time.monotonic()
        st, cls, bound = self._prepare(tenant, priority, max_wait_ms)
        ops, nb = st.ops, st.bytes
        wait = 0.0
        if ops is not None or nb is not None:
            b: Any = self.buckets
            if b.shared:
                ok, wait, which = await b.areserve(tenant, ops, nb, 1, cost_bytes, bound)
            else:
                ok, wait, which = b.reserve(tenant, ops, nb, 1, cost_bytes, bound)
            if not ok:
                raise self._limited(st, which, wait)
            if wait > 0:
                try:
                    await asyncio.sleep(wait)
                except BaseException:
                    await self._arefund(st, ops, nb, cost_bytes)
                    raise
        w = self._enter(st, cls, asyncio.get_running_loop(), t0)
        if w is not None:
            assert w.fut is not None
            remaining = bound - (time.monotonic() - t0)
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await w.fut
            except TimeoutError:
                if self._abandon(w):
                    await self._arefund(st, ops, nb, cost_bytes)
                    raise self._queue_limited(st, w) from None
            except BaseException:
                if not self._abandon(w):
                    self._release(st, 0.0)
                await self._arefund(st, ops, nb, cost_bytes)
                raise
        ticket = self._ticket(st, cls, cost_bytes, t0, w is not None or wait > 0)
        if _holder is not None:
            _holder._ticket = ticket
        return ticket

    def acquire_sync(self, tenant: str, cost_bytes: int = 0, priority: str | None = None,
                     max_wait_ms: float | None = None) -> Ticket:
        """:meth:`acquire` for threads."""
        t0 = time.monotonic()
        st, cls, bound = self._prepare(tenant, priority, max_wait_ms)
        ops, nb = st.ops, st.bytes
        wait = 0.0
        if ops is not None or nb is not None:
            ok, wait, which = self.buckets.reserve(tenant, ops, nb, 1, cost_bytes, bound)
            if not ok:
                raise self._limited(st, which, wait)
            if wait > 0:
                try:
                    time.sleep(wait)
                except BaseException:
                    self._refund(st, ops, nb, cost_bytes)
                    raise
        w = self._enter(st, cls, None, t0)
        if w is not None:
            assert w.event is not None
            remaining = bound - (time.monotonic() - t0)
            try:
                w.event.wait(max(0.0, remaining))
            except BaseException:
                if not self._abandon(w):
                    self._release(st, 0.0)
                self._refund(st, ops, nb, cost_bytes)
                raise
            if self._abandon(w):
                self._refund(st, ops, nb, cost_bytes)
                raise self._queue_limited(st, w)
        return self._ticket(st, cls, cost_bytes, t0, w is not None or wait > 0)

    def _ticket(self, st: _Tenant, cls: int, cost_bytes: int, t0: float,
                waited: bool) -> Ticket:
        if not waited:
            return Ticket(self, st, cls, cost_bytes, 0.0, t0)
        now = time.monotonic()
        with self._lock:
            st.waited_s += now - t0
        return Ticket(self, st, cls, cost_bytes, now - t0, now)

    def _refund(self, st: _Tenant, ops: Spec | None, nb: Spec | None, cost_bytes: int) -> None:
        if ops is not None or nb is not None:
            self.buckets.refund(st.name, ops, nb, 1, cost_bytes)

    async def _arefund(self, st: _Tenant, ops: Spec | None, nb: Spec | None,
                       cost_bytes: int) -> None:
        if ops is None and nb is None:
            return
        b: Any = self.buckets
        if b.shared:
            await b.arefund(st.name, ops, nb, 1, cost_bytes)
        else:
            b.refund(st.name, ops, nb, 1, cost_bytes)

    # -- the fair queue (all under self._lock)

    def _enter(self, st: _Tenant, cls: int, loop: asyncio.AbstractEventLoop | None,
               now: float) -> _Waiter | None:
        """Take a slot now (None) or queue a waiter that a later release will grant."""
        with self._lock:
            if now - st.touched > self._touch_every:
                self._touch(st, now)
            mc = st.policy.max_concurrency
            free = self._capacity - self._in_use
            if (not self._waiting and free > 0 and (mc is None or st.active < mc)
                    and (free > self._headroom or not self._over_share(st))):
                v = self._vtime[cls]
                tag = st.finish[cls] if st.finish[cls] > v else v
                self._vtime[cls] = tag
                st.finish[cls] = tag + 1.0 / st.policy.weight
                self._in_use += 1
                st.active += 1
                st.admitted += 1
                return None
            w = _Waiter(st, cls)
            if loop is not None:
                w.loop, w.fut, w.thread = loop, loop.create_future(), threading.get_ident()
            else:
                w.event = threading.Event()
            st.queues[cls].append(w)
            self._backlog[cls][st.name] = st
            self._waiting += 1
            self._dispatch()
            return None if w.granted else w

    def _touch(self, st: _Tenant, now: float) -> None:
        """Mark the tenant active now (at most every 1/20 of the window, which is all the
        precision the headroom needs); forget tenants idle for longer than the window."""
        st.touched = now
        r = self._recent
        old = r.pop(st.name, None)
        w = st.policy.weight
        self._recent_w += w - (old[1] if old is not None else 0.0)
        r[st.name] = (now, w)
        self._prune(now)

    def _prune(self, now: float) -> None:
        r = self._recent
        limit = now - self._window
        while r:
            name, (t, w) = next(iter(r.items()))
            if t >= limit:
                break
            del r[name]
            self._recent_w -= w
        if not r:
            self._recent_w = 0.0

    def _over_share(self, st: _Tenant) -> bool:
        """Whether the tenant runs its weighted fair share of the capacity (or more)."""
        w = st.policy.weight
        total = self._recent_w + (0.0 if st.name in self._recent else w)
        share = self._capacity * w / total if total > 0 else self._capacity
        return st.active >= max(1.0, share)

    def _abandon(self, w: _Waiter) -> bool:
        """Withdraw a waiter that gave up; False if it was granted a slot meanwhile."""
        with self._lock:
            if w.granted:
                return False
            q = w.tenant.queues[w.cls]
            try:
                q.remove(w)
            except ValueError:  # pragma: no cover - defensive
                return True
            self._waiting -= 1
            if not q:
                self._backlog[w.cls].pop(w.tenant.name, None)
            return True

    def _release(self, st: _Tenant, held_s: float) -> None:
        with self._lock:
            self._in_use -= 1
            st.active -= 1
            if held_s > 0:
                self._ewma += 0.1 * (held_s - self._ewma)
            if self._waiting:
                self._dispatch()

    def _pick(self) -> _Waiter | None:
        cands: list[tuple[int, _Tenant, float]] = []
        tight = self._headroom and self._capacity - self._in_use <= self._headroom
        if tight:
            self._prune(time.monotonic())
        for c in range(3):
            backlog = self._backlog[c]
            if not backlog:
                continue
            v = self._vtime[c]
            best: _Tenant | None = None
            best_tag = math.inf
            for st in backlog.values():
                mc = st.policy.max_concurrency
                if mc is not None and st.active >= mc:
                    continue
                if tight and self._over_share(st):
                    continue
                f = st.finish[c]
                tag = f if f > v else v
                if tag < best_tag:
                    best, best_tag = st, tag
            if best is not None:
                cands.append((c, best, best_tag))
        if not cands:
            return None
        chosen = cands[0]
        if len(cands) > 1:
            # Lower classes earn credit while passed over; a full credit buys one grant.
            for cand in cands[1:]:
                self._credit[cand[0]] += self._share[cand[0]]
            for cand in reversed(cands[1:]):
                if self._credit[cand[0]] >= 1.0:
                    self._credit[cand[0]] -= 1.0
                    chosen = cand
                    break
        c, st, tag = chosen
        self._vtime[c] = tag
        st.finish[c] = tag + 1.0 / st.policy.weight
        q = st.queues[c]
        w = q.popleft()
        if not q:
            del self._backlog[c][st.name]
        return w

    def _dispatch(self) -> None:
        while self._waiting and self._in_use < self._capacity:
            w = self._pick()
            if w is None:
                return
            self._waiting -= 1
            w.granted = True
            self._in_use += 1
            w.tenant.active += 1
            w.tenant.admitted += 1
            if w.event is not None:
                w.event.set()
                continue
            assert w.fut is not None and w.loop is not None
            if w.thread == threading.get_ident():
                _wake(w.fut)
            else:
                try:
                    w.loop.call_soon_threadsafe(_wake, w.fut)
                except RuntimeError:  # its event loop is closed: nobody will take it
                    w.granted = False
                    self._in_use -= 1
                    w.tenant.active -= 1
                    w.tenant.admitted -= 1


# ---------------------------------------------------------------------------- quotas

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """``12 MiB``-style sizes: one decimal, or (round_up) the next whole unit above."""
    v, unit = float(n), 0
    while abs(v) >= 1024 and unit < len(_UNITS) - 1:
        v /= 1024
        unit += 1
    if unit == 0:
        return f"{math.ceil(v) if round_up else round(v)} B"
    return f"{math.ceil(v - 1e-9)} {_UNITS[unit]}" if round_up else f"{v:.1f} {_UNITS[unit]}"


def check_quota(used_bytes: int, used_files: int, add_bytes: int, add_files: int,
                quota_bytes: int | None, quota_files: int | None, *,
                tenant: str | None = None) -> None:
    """Refuse a write that would take usage past a quota (``None``: unlimited).

    Writes that do not grow usage (``add_* <= 0``) always pass, so a tenant over its
    quota can still delete and shrink files.
    """
    if quota_bytes is not None and add_bytes > 0 and used_bytes + add_bytes > quota_bytes:
        raise QuotaExceeded(tenant, "bytes", used_bytes, quota_bytes, add_bytes)
    if quota_files is not None and add_files > 0 and used_files + add_files > quota_files:
        raise QuotaExceeded(tenant, "files", used_files, quota_files, add_files)


@dataclass(frozen=True)
class Quota:
    """A tenant's quotas (``None``: unlimited), e.g. from a policy's ``quotas`` section."""

    bytes: int | None = None
    files: int | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> Quota:
        if spec is None:
            return cls()
        if isinstance(spec, Mapping):
            return cls(bytes=spec.get("bytes"), files=spec.get("files"))
        return cls(bytes=getattr(spec, "bytes", None), files=getattr(spec, "files", None))

    def check(self, tenant: str | None, used_bytes: int, used_files: int, add_bytes: int = 0,
              add_files: int = 0) -> None:
        check_quota(used_bytes, used_files, add_bytes, add_files, self.bytes, self.files,
                    tenant=tenant)


__all__ = [
    "PRIORITIES", "Buckets", "LocalBuckets", "QosPolicy", "Quota", "QuotaExceeded",
    "RateLimited", "RedisBuckets", "Scheduler", "Ticket", "TokenBucket", "check_quota",
    "format_bytes", "make_buckets",
]
