#!/usr/bin/env bash
# Start Lodestore on its embedded default store: a round trip through the store, then
# the MCP server over streamable HTTP on 127.0.0.1 as a development agent.
set -euo pipefail
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export LODESTORE_HOME="${LODESTORE_HOME:-$HOME/.local/share/lodestore}"
PORT="${LODESTORE_PORT:-8765}"
"$BIN/lodestore" init
"$BIN/lodestore" tenant add demo 2>/dev/null || true
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'Hello from Lodestore at %s\n' "$(date)" > "$tmp/hello.txt"
"$BIN/lodestore" put "$tmp/hello.txt" /notes/hello.txt --tenant demo
"$BIN/lodestore" get /notes/hello.txt - --tenant demo
"$BIN/lodestore" status
echo
echo "Starting the MCP server at http://127.0.0.1:$PORT/mcp (Ctrl-C to stop)."
echo "The bearer token for agent 'demo' is printed below; for Claude Desktop run:"
echo "  $BIN/lodestore claude-config --tenant demo --agent desktop"
exec "$BIN/lodestore" serve --transport http --port "$PORT" --tenant demo --agent demo
