"""The operator's documentation: generated parts up to date, masqued(8) complete,
the bash completion working, the unit files and the CLI's exit codes as documented."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from masqued import cli
from masqued.config import CLIENT_KEY_DOCS, CLIENT_KEYS, RELAY_KEY_DOCS, RELAY_KEYS

REPO = Path(__file__).resolve().parents[2]
MAN8 = (REPO / "packaging/man/masqued.8").read_text()
MAN5 = (REPO / "packaging/man/masqued.conf.5").read_text()


def test_generated_docs_are_up_to_date() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "packaging/gen-docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr  # run `make docs`


def test_man5_documents_every_key_check_accepts() -> None:
    assert [k.name for k in RELAY_KEY_DOCS] == list(RELAY_KEYS)
    assert [k.name for k in CLIENT_KEY_DOCS] == list(CLIENT_KEYS)
    relay, client = MAN5.split(".SH CLIENT KEYS")
    for name in RELAY_KEYS:
        assert f"\\fB{name}\\fR = " in relay, name
    for name in CLIENT_KEYS:
        assert f"\\fB{name}\\fR = " in client, name


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_man8_has_every_command_and_option() -> None:
    text = MAN8.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")
    for name, sub in _commands(cli.build_parser()).items():
        assert f"masqued {name}" in text, name
        parsers = _commands(sub) or {"": sub}
        for subname, p in parsers.items():
            if subname:
                assert f"{name} {subname}" in text, (name, subname)
            for action in p._actions:
                longs = [o for o in action.option_strings if o.startswith("--")]
                if longs and longs[0] != "--help":
                    assert longs[0] in text, (name, subname, longs[0])
    for field in ("MASQUED_INSTANCE", "MASQUED_CLIENT", "MASQUED_PEER", "MASQUED_SESSION"):
        assert field in MAN8


def test_help_does_not_offer_the_worker_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "status" in out and "worker" not in out
    with pytest.raises(SystemExit) as info:
        cli.main(["bogus"])
    assert info.value.code == 2
    assert "worker" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["check", "doctor", "run", "reload"])
def test_missing_name_is_bad_usage(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command]) == cli.EXIT_USAGE
    assert "give an instance NAME" in capsys.readouterr().err


def test_missing_config_exits_2_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MASQUED_CONFIG_DIR", str(tmp_path))
    assert cli.main(["check", "typo"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{tmp_path}/typo.conf: no such file: instance typo has no config" in err
    assert cli.main(["check", "bad/name"]) == cli.EXIT_USAGE


def test_pki_messages_use_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["pki", "relay", str(tmp_path), "--name", "relay"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"make one first: masqued pki init {tmp_path}" in err
    assert "init_ca" not in err
    assert cli.main(["pki", "init", str(tmp_path)]) == cli.EXIT_OK
    assert cli.main(["pki", "init", str(tmp_path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "add --force to replace" in err and "force=True" not in err
    assert cli.main(["pki", "init", str(tmp_path), "--force"]) == cli.EXIT_OK


def test_reload_of_a_stopped_instance_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert cli.main(["reload", "relay"]) == cli.EXIT_FAILURE
    assert "instance relay is not running" in capsys.readouterr().err


COMPLETE = r"""
source /usr/share/bash-completion/bash_completion
source "$1"
export MASQUED_CONFIG_DIR=$2
t() {
    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
    _masqued; echo "${COMPREPLY[*]}"
}
t masqued ""
t masqued check ""
t masqued run --log-level ""
t masqued pki ""
t masqued pki relay --
"""


def test_bash_completion(tmp_path: Path) -> None:
    if shutil.which("bash") is None or not Path("/usr/share/bash-completion").is_dir():
        pytest.skip("needs bash-completion (make deps)")
    (tmp_path / "relay.conf").touch()
    (tmp_path / "c1.conf").touch()
    res = subprocess.run(
        ["bash", "-c", COMPLETE, "t", str(REPO / "packaging/completion/masqued"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    commands, names, levels, pki, pki_opts = res.stdout.splitlines()
    assert commands.split()[:8] == [
        "run", "check", "cleanup", "reload", "status", "doctor", "pki", "token"
    ]
    assert "worker" not in commands
    assert sorted(names.split()) == ["c1", "relay"]
    assert levels.split() == ["debug", "info", "warning", "error"]
    assert pki.split()[:4] == ["init", "relay", "client", "revoke"]
    assert set(pki_opts.split()) >= {"--name", "--san", "--force"}


def test_units_as_documented() -> None:
    template = (REPO / "systemd/masqued@.service").read_text()
    umbrella = (REPO / "systemd/masqued.service").read_text()
    assert "\nConditionPathExists=" not in template  # a missing config fails, loudly
    for line in (
        "PartOf=masqued.service",
        "ReloadPropagatedFrom=masqued.service",
        "LogExtraFields=OBJECT_SYSTEMD_UNIT=masqued.service",
        "RestartPreventExitStatus=2",
        "ExecReload=/usr/sbin/masqued reload %i\n",
    ):
        assert line in template, line
    assert "RemainAfterExit=yes" in umbrella
