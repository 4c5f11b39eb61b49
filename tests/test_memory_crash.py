"""No acknowledged session append or memory is lost when the server is SIGKILLed (issue #5).

A real ``lodestore serve --transport stdio`` subprocess on a fresh embedded store is driven
with raw newline-delimited JSON-RPC (so the test, not a client library, decides exactly
what counts as acknowledged: a result without ``isError``). Calls are pipelined, several in
flight, and the process is killed with SIGKILL at a random moment; the next round starts a
new server on the same store. At the end, every acknowledged turn must be in its session in
order, and every acknowledged memory must be recallable.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mcp_support as ms  # noqa: E402

ROUNDS = int(os.environ.get("LODESTORE_MEMORY_CRASH_ROUNDS", "6"))
pytestmark = pytest.mark.timeout(60 + ROUNDS * 20)


class Server:
    def __init__(self, home: Path, token: str) -> None:
        self.p = subprocess.Popen(
            [*ms.lodestore_argv(), "serve", "--transport", "stdio"],
            env=ms.env_for(home, token), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=str(ms.ROOT))
        self.lock = threading.Lock()
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                   "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                              "clientInfo": {"name": "crash-test", "version": "1"}}})
        assert json.loads(self.p.stdout.readline())["id"] == 0
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, msg: dict) -> None:
        with self.lock:
            self.p.stdin.write((json.dumps(msg) + "\n").encode())
            self.p.stdin.flush()

    def call(self, rid: int, name: str, args: dict) -> None:
        self.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                   "params": {"name": name, "arguments": args}})

    def replies(self):
        for line in self.p.stdout:
            yield json.loads(line)


def test_sigkill_loses_no_acknowledged_turn_or_memory(tmp_path):
    home = tmp_path / "home"
    token = ms.make_agents(home, [("acme", "bot", "agent")])["acme/bot"]
    rng = random.Random(int(os.environ.get("LODESTORE_CRASH_SEED", "5")))
    session: str | None = None
    acked_turns: list[str] = []
    acked_memories: list[str] = []
    sent = killed_mid = 0
    for rnd in range(ROUNDS):
        srv = Server(home, token)
        if session is None:  # the first call of the first round creates the session
            srv.call(1, "session_append", {"content": "turn r0-start"})
            first = next(srv.replies())
            session = first["result"]["structuredContent"]["session"]
            acked_turns.append("turn r0-start")
        pending: dict[int, tuple[str, str]] = {}
        stop = threading.Event()

        def pump(srv=srv, rnd=rnd, pending=pending, stop=stop, session=session) -> None:
            rid = 100
            try:
                while not stop.is_set():
                    while len(pending) < 8:
                        rid += 1
                        if rid % 3 == 0:
                            text = f"memory r{rnd}-{rid} about topic{rnd}x{rid}"
                            pending[rid] = ("memory", text)
                            srv.call(rid, "remember", {"content": text, "key": f"k{rnd}-{rid}"})
                        else:
                            text = f"turn r{rnd}-{rid}"
                            pending[rid] = ("turn", text)
                            srv.call(rid, "session_append",
                                     {"content": text, "session": session})
                    time.sleep(0.001)
            except (BrokenPipeError, OSError):
                pass

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        killer = threading.Timer(rng.uniform(0.2, 1.2), srv.p.send_signal, [signal.SIGKILL])
        killer.start()
        for msg in srv.replies():
            kind_text = pending.pop(msg.get("id"), None)
            if kind_text is None:
                continue
            res = msg.get("result") or {}
            assert not res.get("isError"), res  # an error is acceptable only as a crash
            (acked_turns if kind_text[0] == "turn" else acked_memories).append(kind_text[1])
        stop.set()
        killer.join()
        t.join(5)
        assert srv.p.wait(10) == -signal.SIGKILL
        sent += len(pending)
        killed_mid += 1 if pending else 0
    print(f"{ROUNDS} kills: {len(acked_turns)} turns and {len(acked_memories)} memories "
          f"acknowledged, {sent} calls in flight at the kills")
    assert len(acked_turns) > ROUNDS and acked_memories
    assert killed_mid >= ROUNDS // 2, "the kills should land with calls in flight"

    # check in-process, through the gateway, on the store the server left behind
    import anyio

    from server.wiring import open_app

    app = open_app(home)
    try:
        p = app.gateway.authenticate(token)
        door = app.gateway.memory
        ctx = anyio.run(door.asession_context, p, session, 1_000_000)
        stored = [t.content for t in ctx.turns]
        missing = [x for x in acked_turns if x not in set(stored)]
        assert not missing, f"{len(missing)} acknowledged turns lost, e.g. {missing[:3]}"
        assert len(stored) == len(set(stored))  # nothing doubled by a restart
        for text in acked_memories:
            topic = text.split()[-1]
            hits = door.recall(p, topic, limit=3)
            assert any(h.content == text for h in hits), f"acknowledged memory lost: {text}"
    finally:
        app.close()
