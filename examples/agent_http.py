"""An agent talking to Lodestore over MCP streamable HTTP with a bearer token.

Start a server and get a token (local development shortcut):

    lodestore serve --transport http --tenant demo --agent notes-bot
    # prints:  LODESTORE_TOKEN=lds_...

then, in another shell:

    LODESTORE_TOKEN=lds_... python examples/agent_http.py [http://127.0.0.1:8765/mcp]

It writes a note, searches for it, and reads it back, through the SDK's ``mcp.Client``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def show(label: str, result: object) -> None:
    if getattr(result, "is_error", False):
        text = " ".join(getattr(c, "text", "") for c in result.content)  # type: ignore[attr-defined]
        print(f"{label}: ERROR {text}")
    else:
        print(f"{label}: {getattr(result, 'structured_content', result)}")


async def main(url: str, token: str) -> None:
    # the token goes in the Authorization header of every request, never in tool arguments
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        print("tools:", ", ".join(sorted(tools)))
        show("write_file", await client.call_tool("write_file", {
            "path": "/notes/standup.md",
            "content": "Standup: ship the quarterly budget report on Friday.\n"}))
        if "search" in tools:
            show("search", await client.call_tool("search", {"query": "quarterly budget"}))
        show("read_file", await client.call_tool("read_file", {"path": "/notes/standup.md"}))
        res = await client.read_resource("lodestore://files/notes/standup.md")
        print("resource:", res.contents[0].text.strip())  # type: ignore[union-attr]


if __name__ == "__main__":
    token = os.environ.get("LODESTORE_TOKEN")
    if not token:
        sys.exit("error: set LODESTORE_TOKEN (see `lodestore serve --tenant T --agent A`)")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8765/mcp", token))
