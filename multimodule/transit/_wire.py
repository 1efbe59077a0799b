"""Wire format of one message, and the copy made for in-process delivery.

A message on a System V queue is::

    b"MM" | version (1 byte, currently 1) | kind (1 byte) | body

``kind`` is ``b"J"`` when ``body`` is the message as a JSON object (``orjson``), or ``b"S"`` when
the message was too large for one System V message and ``body`` is the name of a spill file
(ASCII) holding the JSON. Anything else on a queue is reported as :class:`BadMessage`.

Every sent message carries ``.ipc_transit_meta``: ``send_ts`` (float seconds since the epoch),
``source_hostname`` and the caller's extra meta keys (the key name comes from IPC::Transit).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson

from multimodule.errors import BadMessage, UnserializableMessage

MAGIC = b"MM"
VERSION = 1
KIND_JSON = b"J"
KIND_SPILL = b"S"
HEADER_JSON = MAGIC + bytes([VERSION]) + KIND_JSON
HEADER_SPILL = MAGIC + bytes([VERSION]) + KIND_SPILL
HEADER_LEN = len(HEADER_JSON)

META_KEY = ".ipc_transit_meta"

_hostname: str | None = None


def hostname() -> str:
    """This machine's host name, looked up once."""
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname()
    return _hostname


def make_meta(extra: dict[str, Any]) -> dict[str, Any]:
    """The ``.ipc_transit_meta`` object for a message sent now, with ``extra`` keys merged in."""
    if extra:
        return {"send_ts": _time(), "source_hostname": _hostname or hostname(), **extra}
    return {"send_ts": _time(), "source_hostname": _hostname or hostname()}


_time = time.time


def check_is_object(message: object) -> None:
    """Raise :class:`UnserializableMessage` unless ``message`` is a ``dict``."""
    if type(message) is not dict and not isinstance(message, dict):
        raise UnserializableMessage(
            f"a message must be a dict (a JSON object), not {type(message).__name__}"
        )


def encode_body(message: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """The JSON body of ``message`` with ``meta`` set as its ``.ipc_transit_meta``.

    Raises :class:`UnserializableMessage` for non-``str`` keys or values JSON cannot carry.
    The caller's dict is not modified.
    """
    check_is_object(message)
    out = dict(message)
    out[META_KEY] = meta
    try:
        return orjson.dumps(out)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise UnserializableMessage(f"message is not JSON-serialisable: {exc}") from exc


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def decode_body(body: bytes | memoryview, qname: str | None = None, *,
                raw: bytes | None = None, what: str = "body") -> dict[str, Any]:
    """Parse a JSON body into a ``dict``; raise :class:`BadMessage` if it is not a JSON object.

    ``raw``: what the error holds instead of the body (a spill reference: the content of a
    spill file never reaches an error, nor is the parser's exception, which holds its input,
    chained to it). ``what``: how the error names the body.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if raw is not None:
            raise BadMessage(f"{what} is not valid JSON ({exc})", qname=qname,
                             raw=raw) from None
        raise BadMessage(f"{what} is not valid JSON ({exc})", qname=qname,
                         raw=bytes(body)) from exc
    if type(value) is not dict:
        raise BadMessage(f"{what} is JSON {_json_type(value)}, not an object", qname=qname,
                         raw=bytes(body) if raw is None else raw)
    return value


def split_header(raw: bytes, qname: str | None = None) -> tuple[bytes, memoryview]:
    """Check the header of a raw System V message; return ``(kind, body)``.

    Raises :class:`BadMessage` for a missing magic, an unknown version or an unknown kind.
    """
    if raw[:2] != MAGIC or len(raw) < HEADER_LEN:
        raise BadMessage("no multimodule header", qname=qname, raw=raw)
    if raw[2] != VERSION:
        raise BadMessage(f"unsupported wire format version {raw[2]}", qname=qname, raw=raw)
    kind = raw[3:4]
    if kind != KIND_JSON and kind != KIND_SPILL:
        raise BadMessage(f"unknown message kind {kind!r}", qname=qname, raw=raw)
    return kind, memoryview(raw)[HEADER_LEN:]


def copy_message(message: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The receiver's own copy of ``message``, exactly as a System V receiver would see it,
    with ``meta`` set as its ``.ipc_transit_meta``.

    The copy is made by orjson in C (``loads(dumps(message))``): no system call and no wire
    header, about 2.5 times faster than a Python walk of the message, and equal by
    construction to what the System V path delivers (tuples become lists, NaN becomes null,
    datetimes become strings). Raises :class:`UnserializableMessage` for what JSON cannot
    carry (non-``str`` keys, integers beyond 64 bits, lone surrogates, nesting deeper than
    orjson's limit of 254).
    """
    try:
        out = _loads(_dumps(message))
    except (TypeError, orjson.JSONEncodeError) as exc:
        check_is_object(message)
        raise UnserializableMessage(f"message is not JSON-serialisable: {exc}") from exc
    if out.__class__ is not dict:
        check_is_object(message)
    out[META_KEY] = meta
    return out


_loads = orjson.loads
_dumps = orjson.dumps
