"""RFC 9484 §3 URI templates: validate one, expand it (client), match a request (proxy).

A CONNECT-IP client is configured with a URI template (RFC 6570, level 3 at most) that
may hold the variables ``target`` and ``ipproto``; it sends the expansion as :scheme,
:authority and :path. The proxy serves the template it chose: a request matches when
its :path is an expansion of that template, and the variables' values are read back
from it. Only the expansions RFC 9484 allows exist here: simple ``{var}``, form-style
query ``{?var,...}`` and query continuation ``{&var,...}``. Written here because
uritemplate (python-hyper) only expands: it neither matches a path nor knows §3's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TEMPLATE = "https://{authority}/.well-known/masque/ip/{target}/{ipproto}/"
VARIABLES = frozenset(("target", "ipproto"))

# RFC 6570 §1.5: characters simple expansion leaves as they are.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_EXPRESSION = re.compile(r"\{([^{}]*)\}")
_VARNAME = re.compile(r"^(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*$")
# Operators RFC 9484 §3 forbids: reserved, fragment, label, path segment, path-style.
_FORBIDDEN_OPERATORS = {
    "+": "reserved",
    "#": "fragment",
    ".": "label",
    "/": "path segment",
    ";": "path-style",
}
_RESERVED_FOR_FUTURE = frozenset("=,!@|")


class TemplateError(ValueError):
    """A URI template RFC 9484 §3 does not allow; the message says which rule."""


@dataclass(frozen=True)
class _Expr:
    operator: str  # "", "?" or "&"
    names: tuple[str, ...]


@dataclass(frozen=True)
class UriTemplate:
    """A validated CONNECT-IP URI template."""

    text: str
    scheme: str
    authority: str
    parts: tuple[str | _Expr, ...]  # the path and query: literals and expressions

    @classmethod
    def parse(cls, text: str) -> UriTemplate:
        if not text or any(not 0x21 <= ord(c) <= 0x7E for c in text):
            raise TemplateError("must be ASCII characters 0x21-0x7E only, and not empty")
        scheme, sep, rest = text.partition("://")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            raise TemplateError("must be absolute: scheme://authority/path")
        if scheme.lower() != "https":
            raise TemplateError(f"scheme {scheme!r}: CONNECT-IP runs over https")
        slash = rest.find("/")
        authority, tail = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not authority or "{" in authority or "}" in authority or "@" in authority:
            raise TemplateError("needs a literal authority (host[:port]), without variables")
        if not tail.startswith("/"):
            raise TemplateError("needs a path starting with '/'")
        if "#" in tail.replace("{#", ""):
            raise TemplateError("must not have a fragment")
        parts: list[str | _Expr] = []
        pos = 0
        for match in _EXPRESSION.finditer(tail):
            if match.start() > pos:
                parts.append(_literal(tail[pos : match.start()]))
            parts.append(_expression(match.group(1)))
            pos = match.end()
        if pos < len(tail):
            parts.append(_literal(tail[pos:]))
        return cls(text, scheme.lower(), authority, tuple(parts))

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(n for p in self.parts if isinstance(p, _Expr) for n in p.names)

    def expand(self, values: dict[str, str]) -> str:
        """The path (with query) for ``values``; variables without a value vanish."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            defined = [(n, values[n]) for n in part.names if n in values]
            if not defined:
                continue
            if part.operator == "":
                out.append(",".join(_encode(v) for _, v in defined))
            else:
                out.append(part.operator + "&".join(f"{n}={_encode(v)}" for n, v in defined))
        return "".join(out)

    def match(self, path: str) -> dict[str, str] | None:
        """The variables' values if ``path`` is an expansion of this template (with
        every variable this template has), else None. Values stay percent-encoded
        (the caller decodes them strictly)."""
        resource, qmark, query = path.partition("?")
        path_parts, query_parts = self._split()
        values: dict[str, str] = {}
        regex, names = _path_regex(path_parts)
        found = re.fullmatch(regex, resource)
        if found is None:
            return None
        for name, raw in zip(names, found.groups(), strict=True):
            values[name] = raw  # empty: the caller reads it as "*"
        params: dict[str, str] = {}
        for item in query.split("&") if qmark else ():
            key, _, value = item.partition("=")
            if key in params:
                return None
            params[key] = value
        wanted = _query_items(query_parts)
        for key, expected in wanted:
            if key not in params:
                return None
            got = params.pop(key)
            if isinstance(expected, str):
                if got != expected:
                    return None
            else:
                values[expected.names[0]] = got
        return values

    def _split(self) -> tuple[list[str | _Expr], list[str | _Expr]]:
        """The parts of the path and those of the query."""
        for i, part in enumerate(self.parts):
            if isinstance(part, _Expr) and part.operator in ("?", "&"):
                return list(self.parts[:i]), list(self.parts[i:])
            if isinstance(part, str) and "?" in part:
                head, _, rest = part.partition("?")
                return [*self.parts[:i], head], ["?" + rest, *self.parts[i + 1 :]]
        return list(self.parts), []


def _literal(text: str) -> str:
    if "{" in text or "}" in text:
        raise TemplateError("unbalanced '{' or '}'")
    for m in re.finditer(r"%(.{0,2})", text):
        if not re.fullmatch(r"[0-9A-Fa-f]{2}", m.group(1)):
            raise TemplateError(f"bad percent-encoding in {text!r}")
    return text


def _expression(body: str) -> _Expr:
    if not body:
        raise TemplateError("empty expression '{}'")
    operator = body[0] if not (body[0].isalnum() or body[0] in "_%") else ""
    if operator in _FORBIDDEN_OPERATORS:
        raise TemplateError(
            f"{_FORBIDDEN_OPERATORS[operator]} expansion '{{{body}}}' is not allowed"
        )
    if operator in _RESERVED_FOR_FUTURE or (operator and operator not in "?&"):
        raise TemplateError(f"unknown operator in '{{{body}}}'")
    names = []
    for spec in body[len(operator) :].split(","):
        if ":" in spec or spec.endswith("*"):
            raise TemplateError(f"value modifiers are level 4: '{{{body}}}'")
        if not _VARNAME.match(spec):
            raise TemplateError(f"bad variable name {spec!r}")
        names.append(spec)
    return _Expr(operator, tuple(names))


def _encode(value: str) -> str:
    """Simple string expansion: everything outside the unreserved set percent-encoded,
    except a lone ``*`` (the wildcard is sent as is, as RFC 9484's examples show and
    peers expect; a proxy decodes ``%2A`` to the same)."""
    if value == "*":
        return value
    return "".join(
        c if c in _UNRESERVED else "".join(f"%{b:02X}" for b in c.encode()) for c in value
    )


def _path_regex(parts: list[str | _Expr]) -> tuple[str, list[str]]:
    regex: list[str] = []
    names: list[str] = []
    for part in parts:
        if isinstance(part, str):
            regex.append(re.escape(part))
        elif len(part.names) == 1:
            regex.append(r"([^/?#&,]*)")
            names.append(part.names[0])
        else:
            regex.append(",".join(r"([^/?#&,]*)" for _ in part.names))
            names.extend(part.names)
    return "".join(regex), names


def _query_items(parts: list[str | _Expr]) -> list[tuple[str, str | _Expr]]:
    """The query as (key, literal value or a one-variable expression) pairs."""
    items: list[tuple[str, str | _Expr]] = []
    pending: str | None = None  # a literal "key=" waiting for its expression
    for part in parts:
        if isinstance(part, _Expr):
            if pending is not None:
                items.append((pending, _Expr("", part.names[:1])))
                pending = None
                continue
            for name in part.names:
                items.append((name, _Expr("", (name,))))
            continue
        text = part.lstrip("?&")
        for piece in text.split("&"):
            if not piece:
                continue
            key, eq, value = piece.partition("=")
            if eq and not value:
                pending = key
            else:
                items.append((key, value))
    return items
