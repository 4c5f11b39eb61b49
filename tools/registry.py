"""The contract between tool modules and the MCP server.

A tool is a plain async function ``fn(ctx: ToolContext, **typed_args) -> BaseModel`` plus
the metadata a model needs (description, annotations). Tool modules validate input,
call the gateway, and shape the answer; the server turns each ``ToolSpec`` into an MCP
tool with input and output schemas taken from the function's signature and return type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from governance.gateway import Gateway
from governance.principals import Principal

Progress = Callable[[float, float | None, str | None], Awaitable[None]]


@dataclass
class ToolContext:
    """Who is calling and through which door; one per call."""

    gateway: Gateway
    principal: Principal
    progress: Progress | None = None  # report (done, total, message) on long calls
    limits: dict[str, Any] = field(default_factory=dict)  # e.g. max_reply_bytes


class ToolError(Exception):
    """An error a model can act on: becomes an MCP result with isError and this text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolSpec:
    name: str
    fn: Callable[..., Awaitable[Any]]
    description: str
    read_only: bool
    destructive: bool
    idempotent: bool
    title: str | None = None


TOOLS: list[ToolSpec] = []


def tool(name: str, description: str, *, read_only: bool, destructive: bool = False,
         idempotent: bool = False, title: str | None = None
         ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Register a tool function in ``TOOLS``."""
    def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        TOOLS.append(ToolSpec(name, fn, description, read_only, destructive, idempotent,
                              title))
        return fn
    return deco
