"""One path measured end to end: the direct routed path, or masqued in stream or datagram
mode over HTTP/3 or datagram mode over HTTP/2, each in a fresh namespace lab
(client -> relay -> target)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import measure
from bench.lab import PYTHON, TARGET_V4, Daemon, Lab, NotReady, client_config, sh, wait_ready
from bench.measure import CpuMeter, MeasureError, summary

IPERF_PORT = 5201


@dataclass(frozen=True)
class Settings:
    """Durations and sizes of one harness run."""

    tcp_seconds: float
    udp_seconds: float
    udp_loads_mbps: tuple[float, ...]
    ping_count: int
    loaded_ping_seconds: float
    repeats: int
    mtu: int
    scale_clients: tuple[int, ...]
    scale_load_mbps: float
    scale_seconds: float
    cores_clients: int
    peer_seconds: float
    budget_s: float
    # bench-peers' quiet.sh may wait 120 s before each script; capped so that four peers
    # on a busy machine still fit the budget (the harness waited for quiet at the start)
    peer_quiet_wait_s: float = 20

    @property
    def udp_payload(self) -> int:
        """UDP payload that fills one tunnel-MTU packet (IPv4 + UDP headers = 28 bytes)."""
        return self.mtu - 28

    def repeat_seconds(self) -> float:
        """Rough wall time of one repeat of the path tests."""
        udp = len(self.udp_loads_mbps) * (self.udp_seconds + 1)
        return (
            2 * (self.tcp_seconds + 1)
            + udp
            + self.ping_count * 0.012
            + 1
            + (self.loaded_ping_seconds + 1)
        )


class PathFailed(Exception):
    """The path could not be set up, or a daemon died while it was measured."""


def _start_iperf_server(lab: Lab, port: int) -> None:
    lab.spawn(lab.target_ns, "iperf3", "-s", "-p", str(port))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = lab.run(lab.target_ns, "ss", "-Hltn", check=False).stdout
        if f":{port} " in out:
            return
        time.sleep(0.05)
    raise PathFailed(f"iperf3 server on port {port} did not start")


def _check_alive(daemons: list[Daemon]) -> None:
    for d in daemons:
        if not d.alive():
            raise PathFailed(f"{d.name} exited {d.proc.returncode}:\n{d.log_tail()}")


def _role_cpu(meter: CpuMeter, daemons: list[Daemon]) -> dict[str, float]:
    return {d.name: meter.proc_pct.get(d.pid, 0.0) for d in daemons}


# Kinds that run masqued on another QUIC engine or event loop: kind -> (transport,
# config lines for both the relay and the client).
ENGINE_KINDS: dict[str, tuple[str, str]] = {
    "uvloop-stream": ("stream", 'event_loop = "uvloop"\n'),
    "qh3-stream": ("stream", 'quic_engine = "qh3"\n'),
    "qh3-datagram": ("datagram", 'quic_engine = "qh3"\n'),
    "qh3-uvloop-stream": ("stream", 'quic_engine = "qh3"\nevent_loop = "uvloop"\n'),
    "qh3-uvloop-datagram": ("datagram", 'quic_engine = "qh3"\nevent_loop = "uvloop"\n'),
}


def split_kind(kind: str) -> tuple[str, str]:
    """(masqued transport kind, extra config lines) of path kind ``kind``."""
    return ENGINE_KINDS.get(kind, (kind, ""))


def measure_path(
    kind: str,
    settings: Settings,
    pki: Path,
    workdir: Path,
    time_left: Callable[[], float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Measure ``kind`` ("direct", "stream", "datagram", "h2" or one of ENGINE_KINDS);
    never raises PathFailed."""
    lab = Lab(workdir / kind, pki, clients=1)
    result: dict[str, Any] = {"status": "ok", "errors": []}
    try:
        lab.up()
        _start_iperf_server(lab, IPERF_PORT)
        daemons: list[Daemon] = []
        c = lab.client_ns(1)
        if kind == "direct":
            lab.enable_direct_path()
        else:
            transport, extra = split_kind(kind)
            relay = lab.start_daemon(
                "relay", lab.relay_ns, lab.relay_config(settings.mtu) + extra
            )
            wait_ready([relay], 20)
            client = lab.start_daemon(
                "client", c, lab.client_config(settings.mtu, transport) + extra
            )
            wait_ready([client], 20)
            result["connect_s"] = round(client.notify.ready_at - client.started_at, 3)  # type: ignore[operator]
            daemons = [relay, client]
        lab.wait_ping(c, TARGET_V4)
        time.sleep(0.5)
        result["rss_idle_mb"] = {
            d.name: (measure.vm_kb(d.pid, "VmRSS") or 0) / 1024 for d in daemons
        }
        _run_repeats(kind, lab, daemons, settings, result, time_left, log)
        result["peak_rss_mb"] = {
            d.name: (measure.vm_kb(d.pid, "VmHWM") or 0) / 1024 for d in daemons
        }
        _check_alive(daemons)
    except (PathFailed, NotReady, MeasureError, OSError) as exc:
        result["status"] = "failed"
        result["errors"].append(str(exc)[-1500:])
    except Exception as exc:  # a subprocess error: keep the run going, say what it was
        result["status"] = "failed"
        result["errors"].append(f"{type(exc).__name__}: {exc}"[-1500:])
    finally:
        lab.down()
    return result


def _run_repeats(
    kind: str,
    lab: Lab,
    daemons: list[Daemon],
    settings: Settings,
    result: dict[str, Any],
    time_left: Callable[[], float],
    log: Callable[[str], None],
) -> None:
    c = lab.client_ns(1)
    pids = [d.pid for d in daemons]
    tcp1: list[float] = []
    tcp4: list[float] = []
    cpu1: list[float] = []
    cpu4: list[float] = []
    machine1: list[float] = []
    role1: dict[str, list[float]] = {d.name: [] for d in daemons}
    udp: dict[float, dict[str, list[float]]] = {
        load: {"recv_mbps": [], "loss_pct": [], "receiver_drops": [], "cpu_pct": []}
        for load in settings.udp_loads_mbps
    }
    ping: dict[str, list[float]] = {"min_ms": [], "avg_ms": [], "p99_ms": [], "loss_pct": []}
    loaded: dict[str, list[float]] = {"avg_ms": [], "p99_ms": [], "max_ms": [], "load_mbps": []}
    errors: list[str] = result["errors"]

    def attempt(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except MeasureError as exc:
            errors.append(f"{what}: {exc}")
            log(f"    {kind} {what}: {exc}")
        _check_alive(daemons)

    done = 0
    for rep in range(settings.repeats):
        if rep > 0 and time_left() < settings.repeat_seconds():
            errors.append(f"stopped after {rep} repeat(s): time budget")
            break

        def t1() -> None:
            with CpuMeter(pids) as m:
                r = measure.tcp(c, TARGET_V4, settings.tcp_seconds, 1, IPERF_PORT)
            tcp1.append(r["mbps"])
            cpu1.append(m.total_pct)
            machine1.append(m.machine_pct)
            for name, pct in _role_cpu(m, daemons).items():
                role1[name].append(pct)

        def t4() -> None:
            with CpuMeter(pids) as m:
                r = measure.tcp(c, TARGET_V4, settings.tcp_seconds, 4, IPERF_PORT)
            tcp4.append(r["mbps"])
            cpu4.append(m.total_pct)

        attempt("tcp1", t1)
        attempt("tcp4", t4)
        for load in settings.udp_loads_mbps:

            def u(load: float = load) -> None:
                with CpuMeter(pids) as m:
                    r = measure.udp(
                        c,
                        TARGET_V4,
                        settings.udp_seconds,
                        load,
                        settings.udp_payload,
                        IPERF_PORT,
                        receiver_ns=lab.target_ns,
                    )
                udp[load]["recv_mbps"].append(r["recv_mbps"])
                udp[load]["loss_pct"].append(r["loss_pct"])
                udp[load]["receiver_drops"].append(r["receiver_drops"])
                udp[load]["cpu_pct"].append(m.total_pct)

            attempt(f"udp {load:g}M", u)

        def p() -> None:
            r = measure.ping(c, TARGET_V4, settings.ping_count, 0.01)
            for k in ping:
                ping[k].append(r[k])

        def pl() -> None:
            r = measure.ping_under_load(c, TARGET_V4, settings.loaded_ping_seconds, 0.05)
            for k in loaded:
                loaded[k].append(r[k])

        attempt("ping", p)
        attempt("ping under load", pl)
        done += 1
        log(
            f"    {kind} repeat {rep + 1}/{settings.repeats}: tcp1 "
            + (f"{tcp1[-1]:.0f} Mbit/s" if tcp1 else "-")
            + (f", ping avg {ping['avg_ms'][-1]:.3f} ms" if ping["avg_ms"] else "")
        )

    result["repeats"] = done
    result["tcp1_mbps"] = summary(tcp1)
    result["tcp4_mbps"] = summary(tcp4)
    if daemons:
        result["cpu_pct"] = summary(cpu1)
        result["cpu_pct_tcp4"] = summary(cpu4)
        result["cpu_pct_by_role"] = {k: summary(v) for k, v in role1.items()}
    result["machine_cpu_pct"] = summary(machine1)
    result["udp"] = [
        {
            "offered_mbps": load,
            "payload": settings.udp_payload,
            **{k: summary(v) for k, v in vals.items() if daemons or k != "cpu_pct"},
        }
        for load, vals in udp.items()
    ]
    result["ping"] = {k: summary(v) for k, v in ping.items()}
    result["ping_loaded"] = {k: summary(v) for k, v in loaded.items()}
    if split_kind(kind)[0] == "datagram":
        _below_capacity(lab, daemons, settings, result, time_left, log)


def _below_capacity(
    lab: Lab,
    daemons: list[Daemon],
    settings: Settings,
    result: dict[str, Any],
    time_left: Callable[[], float],
    log: Callable[[str], None],
) -> None:
    """Datagram mode: loss at half the highest UDP rate it delivered (below capacity)."""
    delivered = [u["recv_mbps"]["median"] for u in result["udp"] if u.get("recv_mbps", {}).get("n")]
    if not delivered or time_left() < settings.repeats * (settings.udp_seconds + 1):
        result["below_capacity"] = {"note": "not measured (no UDP figures or no time left)"}
        return
    load = max(1.0, round(max(delivered) / 2))
    losses: list[float] = []
    recv: list[float] = []
    lost = 0.0
    sent = 0.0
    at_receiver = 0.0
    for _ in range(settings.repeats):
        try:
            r = measure.udp(
                lab.client_ns(1),
                TARGET_V4,
                settings.udp_seconds,
                load,
                settings.udp_payload,
                receiver_ns=lab.target_ns,
            )
        except MeasureError as exc:
            result["errors"].append(f"below-capacity udp: {exc}")
            continue
        losses.append(r["loss_pct"])
        recv.append(r["recv_mbps"])
        lost += r["lost"]
        sent += r["packets"]
        at_receiver += r["receiver_drops"]
        _check_alive(daemons)
    result["below_capacity"] = {
        "offered_mbps": load,
        "recv_mbps": summary(recv),
        "loss_pct": summary(losses),
        "packets_sent": sent,
        "packets_lost": lost,
        "packets_dropped_by_receiver": at_receiver,
    }
    log(
        f"    datagram below capacity ({load:g} Mbit/s): loss {lost:.0f}/{sent:.0f} packets"
        f" ({at_receiver:.0f} in the receiver's socket)"
    )


def datagram_supported(pki: Path, workdir: Path, mtu: int) -> tuple[bool, str]:
    """Ask ``masqued check`` whether a client config with transport = "datagram" is valid."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "dgcheck.conf"
    conf.write_text(client_config(pki, mtu, "datagram"))
    conf.chmod(0o600)
    res = sh(PYTHON, "-m", "masqued", "check", "--config", str(conf), check=False, timeout=30)
    text = (res.stdout + res.stderr).strip()
    last = text.splitlines()[-1] if text else f"exit {res.returncode}"
    # "masqued: /tmp/.../dgcheck.conf: transport: ..." -> "transport: ..."
    return res.returncode == 0, last.split(f"{conf}: ", 1)[-1]
