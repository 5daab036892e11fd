"""FastCGI records and name-value pairs: the wire format, pure functions.

flup6 parses records one ``recv`` at a time into ``Record`` objects; we
parse them in place from large reads (see :mod:`.transport`), and decode
PARAMS once, at the end of the stream.  Bug numbers refer to
``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import struct
from typing import Any

from flup.server.fcgi_base import FCGI_VERSION_1

HEADER = struct.Struct("!BBHHBx")
BEGIN_BODY = struct.Struct("!HB5x")
END_BODY = struct.Struct("!LB3x")
UNKNOWN_BODY = struct.Struct("!B7x")
HEADER_LEN = HEADER.size
_LENGTH = struct.Struct("!L")
PADDING = tuple(b"\0" * n for n in range(8))

# Largest record content that needs no padding (FastCGI lengths are 16 bit).
MAX_CONTENT = 65528
# Most bytes of PARAMS one request may send (nginx sends a few KB).
MAX_PARAMS = 1024 * 1024


class ProtocolError(Exception):
    """Malformed input from the web server: close this connection only."""


def _pair_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """One name or value length of a FastCGI pair at ``pos`` (1 byte, or 4
    with the high bit set); returns (length, position after it)."""
    if pos >= end:
        raise ProtocolError("truncated name-value pair")
    if data[pos] & 0x80:
        if pos + 4 > end:
            raise ProtocolError("truncated name-value length")
        return _LENGTH.unpack_from(data, pos)[0] & 0x7FFFFFFF, pos + 4
    return data[pos], pos + 1


def decode_params(data: bytes) -> dict:
    """FastCGI name-value pairs as a ``str -> str`` dict (latin-1, as CGI
    values are bytes); raises ProtocolError on a truncated pair (flup's
    ``decode_pair`` silently returns short names and values, bug 13).  The
    whole block is decoded once: latin-1 maps byte offsets to the same
    character offsets, so names and values are plain slices of one string.

    The loop inlines the case of two one-byte lengths (nearly every CGI
    pair) rather than calling :func:`_pair_length`: this runs ~30 times per
    request, and the call doubles its cost."""
    text = data.decode("latin-1")
    out = {}
    pos, end = 0, len(data)
    while pos < end:
        nlen = data[pos]
        if nlen < 128 and pos + 1 < end:
            vlen = data[pos + 1]
            if vlen < 128:
                mid = pos + 2 + nlen
                stop = mid + vlen
                if stop > end:
                    raise ProtocolError("name-value pair longer than its record")
                out[text[pos + 2:mid]] = text[mid:stop]
                pos = stop
                continue
        nlen, pos = _pair_length(data, pos, end)
        vlen, pos = _pair_length(data, pos, end)
        mid = pos + nlen
        stop = mid + vlen
        if stop > end:
            raise ProtocolError("name-value pair longer than its record")
        out[text[pos:mid]] = text[mid:stop]
        pos = stop
    return out


def decode_pairs(data: bytes) -> list:
    """FastCGI name-value pairs as (name, value) bytes, in order (see
    :func:`decode_params` for the errors)."""
    pairs = []
    pos, end = 0, len(data)
    while pos < end:
        nlen, pos = _pair_length(data, pos, end)
        vlen, pos = _pair_length(data, pos, end)
        if pos + nlen + vlen > end:
            raise ProtocolError("name-value pair longer than its record")
        pairs.append((bytes(data[pos:pos + nlen]), bytes(data[pos + nlen:pos + nlen + vlen])))
        pos += nlen + vlen
    return pairs


def encode_pair(name: bytes, value: bytes) -> bytes:
    out = bytearray()
    for length in (len(name), len(value)):
        out += bytes([length]) if length < 128 else struct.pack("!L", length | 0x80000000)
    return bytes(out) + name + value


def encode_record(rtype: int, request_id: int, content: Any = b"") -> bytes:
    """One record, padded to a multiple of 8; ``content`` may be a memoryview."""
    length = len(content)
    padding = -length & 7
    return b"".join((HEADER.pack(FCGI_VERSION_1, rtype, request_id, length, padding),
                     content, b"\0" * padding))
