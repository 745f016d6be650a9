"""Relay workers without root: merging the workers' status snapshots, and the socket
pair protocol between a worker and the main process."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from masqued.observe.metrics import LatencyHistogram, TrafficCounters
from masqued.runtime.workers import Uplink, WorkerProcess, mark_worker, merge_snapshots


def snapshot(
    sessions: int, rx: int, drops: dict[str, int], handshakes: list[float]
) -> dict[str, Any]:
    counters = TrafficCounters()
    counters.rx_packets, counters.rx_bytes = rx, rx * 100
    counters.drops.update(drops)
    hist = LatencyHistogram()
    for h in handshakes:
        hist.observe(h)
    return {
        "role": "relay",
        "time": 100.0 + sessions,
        "started": 50.0,
        "uptime": 50.0,
        "sessions": [
            {"id": f"s{sessions}-{i}", "connected_since": 60.0 + i + sessions / 10}
            for i in range(sessions)
        ],
        "pool": {"used": sessions, "capacity": 125},
        "results": {"accepted": sessions, "refused": 1},
        "handshake": hist.snapshot(),
        "totals": counters.snapshot(),
    }


def test_merged_snapshot_adds_everything_up() -> None:
    a = mark_worker(snapshot(2, 10, {"queue_full": 3}, [0.001, 0.2]), 0)
    b = mark_worker(snapshot(1, 5, {"queue_full": 1, "spoofed": 2}, [0.05]), 1)
    m = merge_snapshots([a, b])
    assert [s["id"] for s in m["sessions"]] == ["s1-0", "s2-0", "s2-1"]  # by connected_since
    assert [s["worker"] for s in m["sessions"]] == [1, 0, 0]
    assert m["pool"] == {"used": 3, "capacity": 250}
    assert m["results"] == {"accepted": 3, "refused": 2}
    assert m["totals"]["rx_packets"] == 15 and m["totals"]["rx_bytes"] == 1500
    assert m["totals"]["drops"] == {"queue_full": 4, "spoofed": 2}
    assert m["handshake"]["count"] == 3
    assert m["handshake"]["sum"] == pytest.approx(0.251)
    # Cumulative buckets stay cumulative: the last one counts every handshake.
    assert m["handshake"]["buckets"][-1]["count"] == 3
    one = merge_snapshots([a])
    assert one["totals"] == a["totals"] and one["sessions"] == a["sessions"]


def test_merging_nothing_or_unlike_histograms_is_refused() -> None:
    with pytest.raises(ValueError):
        merge_snapshots([])
    a = snapshot(1, 1, {}, [])
    b = snapshot(1, 1, {}, [])
    b["handshake"]["buckets"] = b["handshake"]["buckets"][:-1]
    with pytest.raises(ValueError):
        merge_snapshots([a, b])


async def test_uplink_sends_ready_and_only_changed_snapshots() -> None:
    ours, theirs = socket.socketpair()
    # Keep both writers: a StreamWriter closes its transport when collected.
    reader, our_writer = await asyncio.open_unix_connection(sock=ours)
    _, writer = await asyncio.open_unix_connection(sock=theirs)
    state = {"sessions": [], "time": 1.0}
    uplink = Uplink(writer, lambda: dict(state))
    uplink.send({"ready": True})
    uplink.changed()
    uplink.changed()  # nothing new: nothing sent
    state["time"] = 2.0
    uplink.changed()  # only the clock moved: nothing sent
    state["sessions"] = [{"id": "x"}]
    uplink.changed()
    await writer.drain()
    lines = [json.loads(await reader.readline()) for _ in range(3)]
    assert lines == [
        {"ready": True},
        {"snapshot": {"sessions": [], "time": 1.0}},
        {"snapshot": {"sessions": [{"id": "x"}], "time": 2.0}},
    ]
    uplink.close()
    assert await reader.read() == b""
    our_writer.close()


async def test_worker_process_supervises_and_restarts_a_child(tmp_path: Any) -> None:
    """A stand-in child (python -c) speaks the protocol: ready, a snapshot, then dies;
    the supervisor records both, marks the snapshot, and starts it again."""
    import sys

    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys, time\n"
        "fd = int(sys.argv[sys.argv.index('--ipc-fd') + 1])\n"
        "out = os.fdopen(fd, 'wb', buffering=0)\n"
        "out.write(b'{\"ready\": true}\\n')\n"
        "out.write(json.dumps({'snapshot': {'sessions': [{'id': 'a'}]}}).encode() + b'\\n')\n"
        "time.sleep(0.2)\n"
        "sys.exit(3)\n"
    )
    changes: list[int] = []
    tun_r, tun_w = socket.socketpair()  # any fds to pass through
    proc = WorkerProcess(
        index=1,
        count=2,
        config_path="/nonexistent.conf",
        name="relay",
        tun_fd=tun_r.fileno(),
        udp_fd=tun_w.fileno(),
        vnet=True,
        log_level="info",
        on_change=lambda: changes.append(1),
    )
    proc.argv = lambda ipc_fd: [sys.executable, str(script), "--ipc-fd", str(ipc_fd)]  # type: ignore[method-assign]
    import masqued.runtime.workers as w

    old = w.RESTART_INITIAL
    w.RESTART_INITIAL = 0.1
    try:
        await proc.start()
        assert proc.state == "running"
        await asyncio.sleep(0.05)
        assert proc.snapshot == {"sessions": [{"id": "a", "worker": 1}]}
        first = proc.describe()["pid"]
        deadline = asyncio.get_running_loop().time() + 5
        while proc.restarts < 1 or proc.state != "running":
            assert asyncio.get_running_loop().time() < deadline, proc.describe()
            await asyncio.sleep(0.05)
        assert proc.describe()["pid"] != first
        assert changes  # the status was told about the snapshot and the exit
    finally:
        w.RESTART_INITIAL = old
        await proc.stop()
        tun_r.close()
        tun_w.close()
    assert proc.proc is not None and proc.proc.returncode is not None


async def test_uplink_says_alive_when_there_is_nothing_else_to_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import masqued.runtime.workers as w

    monkeypatch.setattr(w, "SNAPSHOT_INTERVAL", 0.01)
    monkeypatch.setattr(w, "HEARTBEAT", 0.05)
    ours, theirs = socket.socketpair()
    reader, our_writer = await asyncio.open_unix_connection(sock=ours)
    _, writer = await asyncio.open_unix_connection(sock=theirs)
    uplink = Uplink(writer, lambda: {"sessions": []})
    task = asyncio.get_running_loop().create_task(uplink.tick())
    try:
        first = json.loads(await asyncio.wait_for(reader.readline(), 1))
        assert first == {"snapshot": {"sessions": []}}  # the first look sends it
        # Then nothing changes: heartbeats only, about every HEARTBEAT.
        t0 = asyncio.get_running_loop().time()
        lines = [json.loads(await asyncio.wait_for(reader.readline(), 1)) for _ in range(3)]
        assert lines == [{"alive": True}] * 3
        assert asyncio.get_running_loop().time() - t0 >= 2 * 0.05
    finally:
        task.cancel()
        uplink.close()
        our_writer.close()
