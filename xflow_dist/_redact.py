"""Secrets kept out of everything shown: messages, logs, reprs, the CLI's output."""

from __future__ import annotations

import re

__all__ = ["redact_text", "redact_url"]

MASK = "***"

_USER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:")
# password=, and prefixed ones such as sentinel_password= or ssl_password=
_QUERY_SECRET = re.compile(
    r"(^|&)((?:[A-Za-z0-9]+_)*(?:password|pass|pwd|secret|token|api_key|apikey)=)[^&]*", re.IGNORECASE
)
# scheme://user:password@ anywhere in a text; the password runs to the last "@" before a space or quote
_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*@")


def redact_url(url: str) -> str:
    """``url`` with its password (``user:password@`` or a ``password=`` query parameter) as ``***``.

    The scheme, user, host, port, path and other parameters stay, so the URL still says where it
    points. Read as text, never parsed, so that no malformed URL (an unencoded ``@`` or ``/`` in the
    password, a bad port) can make it fail or show a piece of the password."""
    out = url
    user = _USER.match(url)
    if user is not None:
        rest = url[user.end() :]
        query = rest.find("?")
        at = rest.rfind("@", 0, query if query >= 0 else len(rest))
        if at >= 0:  # the password runs to the last "@" of the authority, whatever it holds
            out = url[: user.end()] + MASK + rest[at:]
    base, mark, tail = out.partition("?")
    if mark:
        query_text, hash_mark, fragment = tail.partition("#")
        masked = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", query_text)
        out = f"{base}?{masked}{hash_mark}{fragment}"
    return out


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it as ``***``."""
    return _IN_TEXT.sub(lambda m: f"{m.group(1)}{MASK}@", text)
