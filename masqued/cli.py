"""``masqued run|check|cleanup|pki`` — the command line.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid configuration.
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


def _add_target(p: argparse.ArgumentParser, name_required: bool = False) -> None:
    p.add_argument("name", nargs="?", help="instance name: reads /etc/masque/NAME.conf")
    p.add_argument("-c", "--config", type=Path, help="read this config file instead")


def _resolve(args: argparse.Namespace) -> tuple[Path, str | None]:
    if args.config is not None:
        return args.config, args.name
    if not args.name:
        raise SystemExit("masqued: give an instance NAME or --config PATH")
    return config_path(check_instance_name(args.name)), args.name


def _load(args: argparse.Namespace) -> RelayConfig | ClientConfig:
    path, name = _resolve(args)
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
    from masqued import daemon
    from masqued.service import setup_logging

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


def cmd_pki(args: argparse.Namespace) -> int:
    from masqued import pki

    directory: Path = args.dir
    try:
        if args.pki_command == "init":
            cert, key = pki.init_ca(directory, name=args.name or "masqued CA")
        else:
            cert, key = pki.issue(
                directory, args.name, args.pki_command, sans=args.san or (), force=args.force
            )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"masqued: pki: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {cert}")
    print(f"wrote {key}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masqued", description="IP VPN over HTTP/3 (MASQUE CONNECT-IP, RFC 9484)"
    )
    parser.add_argument("--version", action="version", version=f"masqued {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an instance in the foreground")
    _add_target(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config file")
    _add_target(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cleanup", help="remove every TUN, route, rule and NAT rule of an instance")
    _add_target(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("pki", help="make a CA and relay/client certificates")
    pki_sub = p.add_subparsers(dest="pki_command", required=True)
    q = pki_sub.add_parser("init", help="create DIR/ca.pem and DIR/ca.key")
    q.add_argument("dir", type=Path)
    q.add_argument("--name", help="CA common name")
    for kind in ("relay", "client"):
        q = pki_sub.add_parser(kind, help=f"issue DIR/NAME.pem and DIR/NAME.key for a {kind}")
        q.add_argument("dir", type=Path)
        q.add_argument("--name", required=True)
        q.add_argument("--san", action="append", help="extra DNS name or IP (repeatable)")
        q.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_pki)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except InvalidInstanceName as exc:
        print(f"masqued: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
