"""Issue 14: instance names map to distinct nft tables, and an instance whose
16-bit routing table / fwmark (or shortened names) meet a running one's is refused
at start, before its cleanup could tear down the other's routes and rules."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqued.host.naming import InstanceIds
from masqued.runtime.instance import StartupError, refuse_collisions


def test_nft_tables_are_as_distinct_as_the_names() -> None:
    names = ["relay-1", "relay_1", "relay.1", "relay1"]
    tables = {InstanceIds(n).nft_table for n in names}
    assert len(tables) == len(names)
    assert InstanceIds("relay").nft_table == "masqued_relay"  # unchanged for plain names


def test_what_two_instances_share() -> None:
    assert InstanceIds("r1623").table == InstanceIds("r8000").table  # a 16-bit hash
    assert InstanceIds("r1623").shared_with(InstanceIds("r8000")) == [
        f"routing table and fwmark {InstanceIds('r1623').table:#x}"
    ]
    assert InstanceIds("relay-1").shared_with(InstanceIds("relay_1")) == []
    assert InstanceIds("relay").shared_with(InstanceIds("relay")) == []
    long_a, long_b = "a-rather-long-name-one", "a-rather-long-name-two"
    shared = InstanceIds(long_a).shared_with(InstanceIds(long_b))
    assert all(not s.startswith("nftables") for s in shared)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("MASQUED_RUN_DIR", str(d))
    yield d


def _serve(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


def test_a_colliding_running_instance_is_refused(run_dir: Path) -> None:
    live = _serve(run_dir / "r1623.sock")  # r1623 is running
    try:
        with pytest.raises(StartupError, match=r"r8000 would share its routing table .* r1623"):
            refuse_collisions(InstanceIds("r8000"))
        refuse_collisions(InstanceIds("r1623"))  # itself: that is start_status's check
        refuse_collisions(InstanceIds("r1624"))  # no collision
    finally:
        live.close()


def test_a_dead_instances_socket_is_no_collision(run_dir: Path) -> None:
    _serve(run_dir / "r1623.sock").close()  # the file of a crashed instance
    refuse_collisions(InstanceIds("r8000"))
