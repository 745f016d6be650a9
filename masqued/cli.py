"""``masqued run|check|cleanup|reload|status|doctor|pki|token`` — the command line.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid configuration.
``masqued worker`` (a relay worker process, started by ``masqued run``) is parsed
apart from the public commands, so ``--help`` and usage errors do not offer it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from masqued import __version__
from masqued.config import (
    ClientConfig,
    ConfigError,
    RelayConfig,
    check_permissions,
    config_path,
    load_config,
)
from masqued.host.naming import InstanceIds, InvalidInstanceName, check_instance_name

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("masqued")
EXAMPLES_DIR = "/usr/share/doc/masqued/examples"


class UsageError(Exception):
    """Bad usage: printed as ``masqued: MESSAGE``, exit 2."""


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="instance name: reads /etc/masque/NAME.conf")
    p.add_argument("-c", "--config", type=Path, help="read this config file instead")


def _resolve(args: argparse.Namespace) -> tuple[Path, str | None]:
    if args.config is not None:
        return args.config, args.name
    if not args.name:
        raise UsageError(f"{args.command}: give an instance NAME or --config PATH")
    return config_path(check_instance_name(args.name)), args.name


def _load(args: argparse.Namespace) -> RelayConfig | ClientConfig:
    path, name = _resolve(args)
    if args.config is None and not path.exists():
        # The usual first mistake (a typo in masqued@NAME, or no config yet): say so.
        raise ConfigError(
            path,
            f"no such file: instance {name} has no config (examples: {EXAMPLES_DIR}/)",
        )
    return load_config(path, name)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"masqued: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for warning in check_permissions(config.path, config):
        print(f"masqued: warning: {warning}", file=sys.stderr)
    print(f"{config.path}: ok ({config.mode} {config.name})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from masqued.runtime import daemon
    from masqued.runtime.service import setup_logging

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"masqued: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(args.log_level or config.log_level, config.name, config.mode)
    for warning in check_permissions(config.path, config):
        log.warning("%s", warning)
    if os.geteuid() != 0 and not _has_net_admin():
        log.error("masqued needs CAP_NET_ADMIN (run as root or from masqued@.service)")
        return EXIT_FAILURE
    return daemon.run(config)


def cmd_worker(args: argparse.Namespace) -> int:
    """A relay worker process, started by ``masqued run`` with ``workers`` > 1
    (masqued.runtime.workers); not for direct use (it is not in ``--help``)."""
    import dataclasses
    import ipaddress
    import signal

    from masqued.runtime import daemon
    from masqued.runtime.service import setup_logging
    from masqued.runtime.workers import worker_env_fds

    # A reload may come before the event loop handles SIGHUP: not fatal meanwhile.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = load_config(args.config, args.name)
    except ConfigError as exc:
        print(f"masqued worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(config, RelayConfig):
        # What the main process runs with (the file may have changed since it started).
        running: dict[str, object] = {"workers": args.workers}
        if args.pool:
            running["pool"] = tuple(ipaddress.ip_network(n) for n in args.pool.split(","))
        if args.mtu:
            running["mtu"] = args.mtu
        config = dataclasses.replace(config, **running)  # type: ignore[arg-type]
    if not isinstance(config, RelayConfig) or not 0 < args.index < config.workers:
        print("masqued worker: only relay instances with workers > 1 have workers", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(args.log_level, config.name, config.mode, worker=args.index)
    try:
        fds = worker_env_fds(args)
    except OSError as exc:
        log.error("relay worker %d: %s (start it through masqued run)", args.index, exc)
        return EXIT_USAGE
    try:
        return daemon.run_loop(
            daemon.run_worker(config, args.index, fds, args.vnet == 1, tcp_fd=args.tcp_fd),
            config.event_loop,
        )
    except daemon.StartupError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return False


def cmd_cleanup(args: argparse.Namespace) -> int:
    from masqued.host.cleanup import cleanup_instance

    if args.config is not None:
        name = args.name or args.config.stem
    elif args.name:
        name = args.name
    else:
        print("masqued: give an instance NAME or --config PATH", file=sys.stderr)
        return EXIT_USAGE
    try:
        ids = InstanceIds(check_instance_name(name))
    except InvalidInstanceName as exc:
        print(f"masqued: {exc}", file=sys.stderr)
        return EXIT_USAGE
    removed = cleanup_instance(ids)
    for line in removed:
        print(f"[#] {line}")
    if not args.quiet and not removed:
        print(f"masqued: nothing of instance {name} to clean up")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP the running instance and wait for its verdict (the unit's ExecReload=).

    The PID is the daemon's own answer on its control socket (``--pid`` overrides).
    The daemon writes the outcome to its runtime directory (``$RUNTIME_DIRECTORY``,
    i.e. ``/run/masqued/NAME`` under the unit); without one (outside systemd) the
    signal is sent and not waited for.
    """
    import signal
    import time

    from masqued.observe import control
    from masqued.runtime.service import read_reload_result, runtime_dir

    if not args.name:
        raise UsageError("reload: give an instance NAME")
    name = check_instance_name(args.name)
    pid = args.pid
    if pid is None:
        try:
            pid = int(control.request(control.socket_path(name), "hello")["pid"])
        except (OSError, control.ControlError, KeyError, TypeError, ValueError) as exc:
            return _status_error(name, exc)
    if pid <= 1:
        raise UsageError(f"reload: --pid {pid} is not a daemon's process ID")
    directory = runtime_dir()
    if directory is None and (control.run_dir() / name / "control.sock").exists():
        directory = control.run_dir() / name  # the unit's runtime directory, from a shell
    before = read_reload_result(directory) if directory is not None else None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"masqued: reload: no process {pid}", file=sys.stderr)
        return EXIT_FAILURE
    if directory is None:
        print(f"masqued: sent SIGHUP to {pid} (instance {name})")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        result = read_reload_result(directory)
        if result is not None and result != before and result.get("pid") == pid:
            message = str(result.get("message", ""))
            if result.get("ok"):
                print(f"masqued: {message}")
                return EXIT_OK
            print(f"masqued: reload rejected: {message}", file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(0.05)
    print(f"masqued: reload: no answer from {pid} within {args.timeout:g}s", file=sys.stderr)
    return EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    """``masqued status [NAME] [--json] [--watch]``: ask running instances over their socket."""
    import json

    from masqued.observe import control, status

    if args.name:
        names = [check_instance_name(args.name)]
    else:
        names = control.running_instances()
        if args.watch:
            print("masqued: status --watch needs an instance NAME", file=sys.stderr)
            return EXIT_USAGE
        if not names:
            print(f"masqued: no running instances (no sockets in {control.run_dir()})")
            return EXIT_OK
    if args.watch:
        try:
            status.watch(names[0], interval=args.interval, count=args.count)
        except KeyboardInterrupt:
            return EXIT_OK
        except (OSError, control.ControlError) as exc:
            return _status_error(names[0], exc)
        return EXIT_OK
    docs = []
    for name in names:
        try:
            docs.append(status.fetch(name))
        except (OSError, control.ControlError) as exc:
            return _status_error(name, exc)
    if args.json:
        print(json.dumps(docs[0] if args.name else docs, indent=2, sort_keys=True))
    else:
        print("\n".join(status.render_text(d) for d in docs), end="")
    return EXIT_OK


def _status_error(name: str, exc: Exception) -> int:
    from masqued.observe.control import socket_path

    path = socket_path(name)
    if isinstance(exc, PermissionError):
        print(f"masqued: {path}: permission denied (run as root)", file=sys.stderr)
    elif isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        print(
            f"masqued: instance {name} is not running (nothing answers on {path}); "
            f"try: systemctl status masqued@{name}",
            file=sys.stderr,
        )
    else:
        print(f"masqued: status of {name}: {exc}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_doctor(args: argparse.Namespace) -> int:
    from masqued import doctor

    path, name = _resolve(args)
    return doctor.main(path, name or path.stem, as_json=args.json)


def cmd_pki(args: argparse.Namespace) -> int:
    from masqued.gate import pki

    directory: Path = args.dir
    try:
        if args.pki_command == "init":
            cert, key = pki.init_ca(directory, name=args.name or "masqued CA", force=args.force)
        elif args.pki_command == "revoke":
            crl = pki.revoke(directory, args.name)
            print(f"wrote {crl} (point the relay's crl key at it, then reload the relay)")
            return EXIT_OK
        else:
            cert, key = pki.issue(
                directory, args.name, args.pki_command, sans=args.san or (), force=args.force
            )
    except pki.WouldOverwrite as exc:
        if args.pki_command == "init":
            what = "a new CA invalidates every certificate the old one issued"
        else:
            what = "the old certificate stays valid until it expires or is revoked"
        print(
            f"masqued: pki {args.pki_command}: {', '.join(exc.paths)} already exist(s); "
            f"add --force to replace ({what})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except pki.NoCa as exc:
        print(
            f"masqued: pki {args.pki_command}: no CA in {exc.dir} ({exc.missing} is missing); "
            f"make one first: masqued pki init {exc.dir}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except (pki.PkiError, ValueError) as exc:
        print(f"masqued: pki {args.pki_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"masqued: pki {args.pki_command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {cert}")
    print(f"wrote {key}")
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    """``masqued token new NAME [--file TOKENS]``: print a new token, store its hash."""
    from masqued.gate.auth import TokenFileError, TokenStore, new_token

    try:
        token, line = new_token(args.name)
    except ValueError as exc:
        print(f"masqued: token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.file is None:
        print(f"# add this line to the relay's tokens_file:\n{line}", file=sys.stderr)
    else:
        path: Path = args.file
        try:
            existing = path.read_text() if path.exists() else ""
            if args.name in TokenStore.parse(existing, path).names():
                print(
                    f"masqued: token: {path} already has {args.name}; remove its line to "
                    "replace it",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                if existing and not existing.endswith("\n"):
                    f.write("\n")
                f.write(line + "\n")
        except (OSError, TokenFileError) as exc:
            print(f"masqued: token: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"# added {args.name} to {path}; reload the relay to apply", file=sys.stderr)
    print(token)
    return EXIT_OK


def worker_parser() -> argparse.ArgumentParser:
    """``masqued worker ...``: started by ``masqued run`` for relays with workers > 1."""
    p = argparse.ArgumentParser(prog="masqued worker", add_help=False)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--tun-fd", type=int, required=True)
    p.add_argument("--udp-fd", type=int, required=True)
    p.add_argument("--tcp-fd", type=int, default=-1)
    p.add_argument("--ipc-fd", type=int, required=True)
    p.add_argument("--vnet", type=int, choices=(0, 1), default=1)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--pool", default="")
    p.add_argument("--mtu", type=int, default=0)
    p.set_defaults(func=cmd_worker, command="worker")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masqued", description="IP VPN over HTTP/3 (MASQUE CONNECT-IP, RFC 9484)"
    )
    parser.add_argument("--version", action="version", version=f"masqued {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run an instance in the foreground")
    _add_target(p)
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="instead of log_level"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config file")
    _add_target(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cleanup", help="remove every TUN, route, rule and NAT rule of an instance")
    _add_target(p)
    p.add_argument("-q", "--quiet", action="store_true", help="say nothing if nothing was left")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("reload", help="make a running instance re-read its config and wait")
    p.add_argument("name", nargs="?", help="instance name")
    p.add_argument("--pid", type=int, help="signal this process (default: the instance's own)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="show running instances: sessions, traffic, NAT, routes")
    p.add_argument("name", nargs="?", help="instance name (default: every running instance)")
    p.add_argument("--json", action="store_true", help="machine-readable (docs/status.schema.json)")
    p.add_argument("-w", "--watch", action="store_true", help="refresh with rates, like watch(1)")
    p.add_argument("-n", "--interval", type=float, default=1.0, help="--watch period (s)")
    p.add_argument("--count", type=int, help="--watch: stop after this many refreshes")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check an instance for the usual failures, with fixes")
    _add_target(p)
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("pki", help="make a CA and relay/client certificates")
    pki_sub = p.add_subparsers(dest="pki_command", required=True)
    q = pki_sub.add_parser("init", help="create DIR/ca.pem and DIR/ca.key")
    q.add_argument("dir", type=Path, help="the CA's directory (e.g. /etc/masque/pki)")
    q.add_argument("--name", help="CA common name")
    q.add_argument(
        "--force", action="store_true", help="replace an existing CA (and so its certificates)"
    )
    for kind in ("relay", "client"):
        q = pki_sub.add_parser(kind, help=f"issue DIR/NAME.pem and DIR/NAME.key for a {kind}")
        q.add_argument("dir", type=Path, help="the CA's directory")
        q.add_argument("--name", required=True, help=f"the {kind}'s name (certificate CN)")
        q.add_argument("--san", action="append", help="extra DNS name or IP (repeatable)")
        q.add_argument("--force", action="store_true", help="overwrite existing files")
    q = pki_sub.add_parser("revoke", help="add DIR/NAME.pem to DIR/crl.pem (re-signed)")
    q.add_argument("dir", type=Path, help="the CA's directory")
    q.add_argument("--name", required=True, help="whose certificate to revoke")
    p.set_defaults(func=cmd_pki)

    p = sub.add_parser("token", help="make bearer tokens for auth = token")
    token_sub = p.add_subparsers(dest="token_command", required=True)
    q = token_sub.add_parser("new", help="print a new token for NAME; append its hash to FILE")
    q.add_argument("name", help="the client's identity")
    q.add_argument("--file", type=Path, help="the relay's tokens_file (created 0600)")
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        args = worker_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except (InvalidInstanceName, UsageError) as exc:
        print(f"masqued: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
