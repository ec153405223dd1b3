"""The encoding rules of everything the engine writes for people and programs: terminal text,
the failures report and JSON. One place, so that every output follows the same rules.

Text (``printable``): one line per record, safe to print on a terminal. Control characters
(C0, DEL, C1), line and paragraph separators and bidirectional-override characters are written
as visible escapes (``\\n``, ``\\t``, ``\\r``, ``\\x1b``, ``\\u202e``); a backslash is doubled,
so the escaping can be read back without ambiguity; every other character, non-ASCII letters
included, is kept as it is.

Undecodable bytes: a file name that is not valid UTF-8 reaches Python as surrogate escapes
(``os.fsdecode``); each such byte is written as the four characters ``\\xNN`` in text and in JSON
alike. Valid UTF-8 names are written unchanged in JSON (so they can be opened as given).

JSON (``to_json``): strict UTF-8 (``ensure_ascii=False``, encoded strictly), one object per line:
no lone surrogate, no NaN or Infinity (non-finite numbers become ``null``), and the characters
JSON allows raw but that split lines or move a terminal (C1 controls, U+2028, U+2029, bidi
overrides) escaped as ``\\uXXXX``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

# Bidirectional formatting characters: they reorder what a terminal shows ("Trojan Source").
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# What text output escapes: C0 controls, backslash, DEL, C1 controls, separators, bidi, surrogates.
_TEXT_UNSAFE = re.compile("[\x00-\x1f\\\\\x7f-\x9f\u2028\u2029" + _BIDI + "\ud800-\udfff]")
# What JSON text may hold raw but must not (json.dumps already escapes C0, quote and backslash).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029" + _BIDI + "]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` (any object: ``str()`` of it) as one terminal-safe line: see the module rules."""
    return _TEXT_UNSAFE.sub(lambda m: _escape_char(m.group()), text if isinstance(text, str) else str(text))


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as text output shows it: ``printable`` of its decoded form (bytes decoded as
    the file system does, undecodable bytes as ``\\xNN``)."""
    return printable(os.fsdecode(path))


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(text: str) -> str:
    """A string as JSON output holds it: valid text unchanged; each undecodable byte (a
    surrogate escape) as the text ``\\xNN``; any other lone surrogate as the text ``\\udXXX``."""
    return _SURROGATE.sub(lambda m: _escape_char(m.group()), text)


def json_ready(obj: Any) -> Any:
    """``obj`` with every string made valid (``json_text``), every non-finite float made None,
    tuples as lists and dict keys as strings; other objects are left for ``default=str``."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {json_text(k) if isinstance(k, str) else k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return json_text(os.fsdecode(obj))
    return obj


def _default(obj: Any) -> Any:
    return json_text(str(obj))


def to_json(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (one line unless ``indent``): see the module rules. The result
    always encodes as UTF-8 with ``errors="strict"``."""
    text = json.dumps(json_ready(obj), ensure_ascii=False, allow_nan=False, default=_default, indent=indent)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def to_json_bytes(obj: Any, *, indent: int | None = None) -> bytes:
    """``to_json`` encoded as UTF-8 (strictly: it cannot fail)."""
    return to_json(obj, indent=indent).encode("utf-8")
