#!/usr/bin/env bash
# A first round trip through an embedded Lodestore store: init, put, get, status.
set -euo pipefail
BIN="$(dirname "$0")/../.venv/bin"
export LODESTORE_HOME="${LODESTORE_HOME:-$HOME/.local/share/lodestore}"
"$BIN/lodestore" init
"$BIN/lodestore" tenant add demo 2>/dev/null || true
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'Hello from Lodestore at %s\n' "$(date)" > "$tmp/hello.txt"
head -c 12000000 /dev/urandom > "$tmp/blob.bin"
"$BIN/lodestore" put "$tmp/hello.txt" /notes/hello.txt --tenant demo
"$BIN/lodestore" put "$tmp/blob.bin" /data/blob.bin --tenant demo
"$BIN/lodestore" get /data/blob.bin "$tmp/blob.out" --tenant demo
cmp "$tmp/blob.bin" "$tmp/blob.out" && echo "round trip: 12 MB erasure-coded and read back identical"
"$BIN/lodestore" get /notes/hello.txt - --tenant demo
"$BIN/lodestore" ls / --tenant demo
"$BIN/lodestore" status
