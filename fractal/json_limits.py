"""Request JSON that cannot reach a 500: bounded nesting, finite numbers, text PostgreSQL can store.

Flask parses request bodies with ``app.json.loads``; a ``ValueError`` there becomes Flask's 400, which the error
handler answers as ``VALIDATION_ERROR``. The nesting depth is measured on the raw text before the parser runs, so
no body can drive the parser (or the recursive validators and serialisers after it) into a RecursionError.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from flask.json.provider import DefaultJSONProvider
from flask.sansio.app import App

# Deeper than any Fractal body needs (a heartbeat's metrics are a few levels); far below Python's recursion limit.
MAX_JSON_DEPTH = 32
# Integers beyond a signed 64-bit value fit no column and no counter.
MAX_JSON_INT = 2**63 - 1

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# In UTF-8 text (what json.loads decodes, with surrogatepass), a parsed string can hold a lone surrogate only from a
# \u escape of D800-DFFF or from the bytes that encode one (ED A0-BF): without either, the walk over every parsed
# string (check_storable_strings, a few percent of a heartbeat's CPU) has nothing to find. A false alarm (an escaped
# backslash before "ud800", a valid surrogate pair) only costs the walk.
_MAY_HOLD_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in ``raw`` (strings skipped), without parsing it."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return max(accumulate(1 if b in b"[{" else -1 for b in brackets), default=0)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise ValueError("number out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # before int(): a long digit string costs quadratic time to convert
        raise ValueError("number out of range")
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        raise ValueError("number out of range")
    return value


def check_storable_strings(value: Any) -> None:
    """Refuse strings (keys included) that are not valid UTF-8 text: lone surrogates from ``\\ud800`` escapes."""
    stack = [value]
    while stack:  # iterative: the depth is already bounded, but nothing here needs the call stack
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError("strings must be valid Unicode (no lone surrogates)") from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_limited(data: str | bytes | bytearray) -> Any:
    """``json.loads`` for untrusted bodies: ValueError for too deep, NaN/Infinity, huge numbers, lone surrogates."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    if not json.detect_encoding(raw).startswith("utf-8") or _MAY_HOLD_SURROGATE.search(raw) is not None:
        check_storable_strings(value)
    return value


class LimitedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider with :func:`loads_limited` for parsing; serialising is unchanged."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_limited(s)


def install_json_limits(app: App) -> None:
    """Parse this app's request bodies with :func:`loads_limited`, keeping the serialising options already set."""
    if isinstance(app.json, LimitedJSONProvider):
        return
    provider = LimitedJSONProvider(app)
    for option in ("ensure_ascii", "sort_keys", "compact", "mimetype"):
        setattr(provider, option, getattr(app.json, option))
    app.json = provider
