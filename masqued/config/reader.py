"""Reading TOML values one key at a time, every problem collected as ``KEY: WHAT``;
the small parsers (host:port, networks, metrics endpoints) behind it."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from masqued.config.keys import (
    CLIENT_KEYS,
    DEFAULT_PORT,
    IFNAMSIZ,
    MAX_PEM_BYTES,
    RELAY_KEYS,
    IPAddress,
    Network,
)
from masqued.config.model import MetricsEndpoint

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def parse_metrics(text: str) -> MetricsEndpoint | None:
    """``"off"``, ``"IP:PORT"`` / ``"[V6]:PORT"``, or an absolute unix socket path."""
    if text == "off":
        return None
    if text.startswith("/"):
        if "\0" in text or len(text.encode()) > SUN_PATH_MAX or text.endswith("/"):
            raise ValueError(
                f"{text!r} is not a usable unix socket path (at most {SUN_PATH_MAX} bytes)"
            )
        return MetricsEndpoint(path=Path(text))
    if "/" in text:
        raise ValueError(f"{text!r}: a unix socket path must be absolute")
    host, port = parse_host_port(text, default_port=None)
    ip = ip_or_none(host)
    if ip is None:
        raise ValueError(
            f"{text!r}: use an IP address and port (e.g. '127.0.0.1:9810'), "
            'a unix socket path or "off"'
        )
    return MetricsEndpoint(host=str(ip), port=port)


# --- small parsers; each raises ValueError with a message fit for an operator ---

_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (str, "string"),
    (int, "integer"),
    (float, "float"),
    (list, "array"),
    (dict, "table"),
)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# Characters str.splitlines() breaks at, shown escaped in error messages.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def show(value: object) -> str:
    """A value for an error message: repr, cut short."""
    tname = next(
        (n for t, n in _TOML_TYPES if isinstance(value, t)),
        type(value).__name__,  # datetime, date, time
    )
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{tname} {text}"


def is_hostname(name: str) -> bool:
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_host_port(text: str, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` / ``HOST`` (port ``default_port``).

    Returns the host without brackets. Does not check what kind of host it is.
    """
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        ip = ip_or_none(host)
        if ip is None or ip.version != 6:
            raise ValueError(f"{text!r}: only IPv6 addresses go in brackets")
    elif ip_or_none(text) is not None:
        host, port_text = text, None  # a bare address, IPv6 included
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. '[2001:db8::1]:443'")
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1..65535")
    return host, port


def parse_network(text: str) -> Network:
    """A CIDR with an explicit prefix length and no host bits set."""
    if "/" not in text:
        raise ValueError(f"{text!r} is not a valid CIDR (missing '/PREFIX')")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid CIDR") from None
    raise ValueError(f"{text!r} has host bits set (did you mean '{loose}'?)")


def check_egress(name: str) -> str:
    if name != "auto":
        check_ifname(name)
    return name


def check_ifname(name: str) -> None:
    """Linux ``dev_valid_name()``: 1..15 bytes, not '.'/'..', no '/', ':' or whitespace."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"{name!r} is not a valid interface name (1-15 characters)")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"{name!r} is not a valid interface name (no '/', ':' or spaces)")
    if not name.isprintable():
        raise ValueError(f"{name!r} is not a valid interface name (no control characters)")


# --- the reader: one key at a time, errors collected ---

T = TypeVar("T")


class Reader:
    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.base = Path(os.path.abspath(path)).parent
        self.data = data
        self.errors: list[str] = []

    def error(self, key: str, what: str) -> None:
        # One line per problem, whatever a value held (a file name with a newline).
        what = what.translate(_LINE_BREAKS)
        self.errors.append(f"{key}: {what}" if key else what)

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, types: tuple[type, ...], expected: str, required: bool) -> Any:
        """The raw value if present with the right type; None if absent or wrong."""
        if key not in self.data:
            if required:
                self.error("", f"missing required key {key!r}")
            return None
        value = self.data[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            self.error(key, f"expected {expected}, got {show(value)}")
            return None
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key, (str,), "a string", default is None)
        return cast(str | None, value) if value is not None else default

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.string(key, default)
        if value is None or value in choices:
            return value or default
        allowed = ", ".join(f'"{c}"' for c in choices)
        self.error(key, f"{value!r} is not one of {allowed}")
        return default

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, (int,), "an integer", False)
        if value is None:
            return default
        if not lo <= value <= hi:
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return cast(int, value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false", False)
        return default if value is None else bool(value)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self._get(key, (int, float), "a number", False)
        if value is None:
            return default
        if not lo <= value <= hi:  # also false for NaN
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return float(value)

    def parsed(self, key: str, parse: Callable[[str], T], default: str | None = None) -> T | None:
        text = self.string(key, default)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as e:
            self.error(key, str(e))
            return None

    def networks(self, key: str, required: bool) -> tuple[Network, ...] | None:
        value = self._get(key, (list,), "an array of CIDR strings", required)
        if value is None:
            return None
        if not value:
            self.error(key, "must not be empty")
            return None
        # Keep the good entries even when others are bad, so that checks built on
        # them (mtu, routing loop) still run and every problem shows in one pass.
        nets: list[Network] = []
        for item in value:
            if not isinstance(item, str):
                self.error(key, f"expected CIDR strings, got {show(item)}")
                continue
            try:
                net = parse_network(item)
            except ValueError as e:
                self.error(key, str(e))
                continue
            if net in nets:
                self.error(key, f"{net} is listed twice")
                continue
            nets.append(net)
        return tuple(nets)

    def file(self, key: str) -> tuple[Path, bytes] | None:
        """A path (resolved against the config's directory) and its contents."""
        text = self.string(key)
        if text is None:
            return None
        if not text or "\0" in text:
            self.error(key, f"{text!r} is not a valid file name")
            return None
        path = self.base / text
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PEM_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            self.error(key, f"file {path} does not exist")
            return None
        except IsADirectoryError:
            self.error(key, f"{path} is a directory, not a file")
            return None
        except PermissionError:
            self.error(key, f"file {path} is not readable (permission denied)")
            return None
        except OSError as e:
            self.error(key, f"cannot read {path}: {e.strerror or e}")
            return None
        if len(data) > MAX_PEM_BYTES:
            self.error(key, f"file {path} is too large for a PEM file")
            return None
        return path, data

    def certificates(self, key: str) -> tuple[Path, list[x509.Certificate]] | None:
        loaded = self.file(key)
        if loaded is None:
            return None
        path, data = loaded
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if not certs:
            self.error(key, f"{path} is not a PEM X.509 certificate")
            return None
        return path, certs

    def private_key(self, key: str) -> tuple[Path, PrivateKeyTypes] | None:
        loaded = self.file(key)
        if loaded is None:
            return None
        path, data = loaded
        try:
            return path, serialization.load_pem_private_key(data, password=None)
        except TypeError:
            self.error(key, f"{path} is encrypted; masqued needs an unencrypted PEM key")
        except (ValueError, UnsupportedAlgorithm):
            self.error(key, f"{path} is not a PEM private key")
        return None


def spki(key: Any) -> bytes:
    return cast(
        bytes,
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def unknown_keys(data: dict[str, Any], mode: str | None) -> list[str]:
    allowed: tuple[str, ...]
    other: tuple[str, tuple[str, ...]]
    if mode == "relay":
        allowed, other = RELAY_KEYS, ("client", CLIENT_KEYS)
    elif mode == "client":
        allowed, other = CLIENT_KEYS, ("relay", RELAY_KEYS)
    else:
        allowed, other = tuple(dict.fromkeys(RELAY_KEYS + CLIENT_KEYS)), ("", ())
    problems = []
    for key, value in data.items():
        if key in allowed:
            continue
        if key in other[1]:
            problems.append(f"key {key!r} is only valid in a {other[0]} config (mode = {mode!r})")
            continue
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if isinstance(value, dict):
            problems.append(f"invalid table [{key}]{hint}; masqued configs use top-level keys only")
        else:
            problems.append(f"invalid key {key!r}{hint}")
    return problems
