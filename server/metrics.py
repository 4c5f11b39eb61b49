"""Prometheus text metrics for the MCP server (``/metrics``).

Calls by tool and outcome, a latency histogram per tool, HTTP auth refusals, and the QoS
scheduler's counters summed over tenants. No label carries a tenant, agent, path or any
other caller data: tool names and outcomes come from fixed sets.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from typing import Any

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
OUTCOMES = ("ok", "error", "invalid", "denied", "rate_limited", "unauthorized", "internal")


class _Histogram:
    __slots__ = ("counts", "sum", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.sum += v
        self.n += 1


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters kept on the event loop (no locks: every update happens there)."""

    def __init__(self, qos_stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.started = time.time()
        self.calls: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.auth: dict[str, int] = {}
        self.qos_stats = qos_stats
        self.known_tools: set[str] | None = None

    def call(self, tool: str, outcome: str, seconds: float) -> None:
        if self.known_tools is not None and tool not in self.known_tools:
            tool = "unknown"  # a label never carries caller-chosen text
        if outcome not in OUTCOMES:
            outcome = "error"
        key = (tool, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1
        h = self.latency.get(tool)
        if h is None:
            h = self.latency[tool] = _Histogram()
        h.observe(seconds)

    def refused(self, status: int, reason: str) -> None:
        key = f"{status}:{reason}"
        self.auth[key] = self.auth.get(key, 0) + 1

    def render(self) -> str:
        out: list[str] = []
        add = out.append
        add("# HELP lodestore_up 1 while the server runs.")
        add("# TYPE lodestore_up gauge")
        add("lodestore_up 1")
        add("# HELP lodestore_start_time_seconds Unix time the server started.")
        add("# TYPE lodestore_start_time_seconds gauge")
        add(f"lodestore_start_time_seconds {self.started:.3f}")
        add("# HELP lodestore_mcp_calls_total MCP tool calls and resource reads by outcome.")
        add("# TYPE lodestore_mcp_calls_total counter")
        for (tool, outcome), n in sorted(self.calls.items()):
            add(f'lodestore_mcp_calls_total{{tool="{_esc(tool)}",outcome="{outcome}"}} {n}')
        add("# HELP lodestore_mcp_call_seconds Latency of MCP tool calls, server side.")
        add("# TYPE lodestore_mcp_call_seconds histogram")
        for tool, h in sorted(self.latency.items()):
            t = _esc(tool)
            cum = 0
            for le, c in zip(BUCKETS, h.counts, strict=False):
                cum += c
                add(f'lodestore_mcp_call_seconds_bucket{{tool="{t}",le="{le}"}} {cum}')
            add(f'lodestore_mcp_call_seconds_bucket{{tool="{t}",le="+Inf"}} {h.n}')
            add(f'lodestore_mcp_call_seconds_sum{{tool="{t}"}} {h.sum:.6f}')
            add(f'lodestore_mcp_call_seconds_count{{tool="{t}"}} {h.n}')
        add("# HELP lodestore_http_refused_total HTTP requests refused before MCP "
            "(401 no or bad token, 403 role without access or foreign Origin).")
        add("# TYPE lodestore_http_refused_total counter")
        for key, n in sorted(self.auth.items()):
            status, reason = key.split(":", 1)
            add(f'lodestore_http_refused_total{{status="{status}",reason="{_esc(reason)}"}} {n}')
        if self.qos_stats is not None:
            try:
                st = self.qos_stats()
            except Exception:  # noqa: BLE001 - metrics never fail the scrape
                st = None
            if st:
                tenants = st.get("tenants") or {}
                total = {k: sum(float(t.get(k) or 0) for t in tenants.values())
                         for k in ("active", "waiting", "admitted", "rate_limited", "waited_ms")}
                rows = [
                    ("lodestore_qos_capacity", "gauge", "Concurrent call slots.",
                     st.get("capacity")),
                    ("lodestore_qos_in_use", "gauge", "Slots in use.", st.get("in_use")),
                    ("lodestore_qos_waiting", "gauge", "Calls waiting for a slot.",
                     st.get("waiting")),
                    ("lodestore_qos_tenants", "gauge", "Tenants the scheduler has seen.",
                     len(tenants)),
                    ("lodestore_qos_admitted_total", "counter", "Calls admitted.",
                     total["admitted"]),
                    ("lodestore_qos_rate_limited_total", "counter",
                     "Calls refused as rate limited.", total["rate_limited"]),
                    ("lodestore_qos_waited_seconds_total", "counter",
                     "Time calls spent waiting for admission.", total["waited_ms"] / 1000.0),
                ]
                for name, kind, help_, value in rows:
                    if value is None:
                        continue
                    add(f"# HELP {name} {help_}")
                    add(f"# TYPE {name} {kind}")
                    add(f"{name} {float(value):g}")
        return "\n".join(out) + "\n"
