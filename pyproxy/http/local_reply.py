"""Responses the proxy makes itself (errors, no route, limits), with fixed, precomputed framing."""

from __future__ import annotations

from http import HTTPStatus

from pyproxy.codec.events import ResponseHead

_CONTENT_TYPE = (b"content-type", b"text/plain")
_CLOSE = (b"connection", b"close")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def local_reply_head(status: int, length: int, keep_alive: bool) -> ResponseHead:
    headers = [_CONTENT_TYPE, (b"content-length", b"%d" % length)]
    if not keep_alive:
        headers.append(_CLOSE)
    return ResponseHead(status, _REASONS.get(status, b"Unknown"), headers)
