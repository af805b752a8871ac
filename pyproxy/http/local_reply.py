"""Responses the proxy makes itself (errors, no route, limits), with fixed, precomputed framing."""

from __future__ import annotations

from http import HTTPStatus

from pyproxy.codec.events import ResponseHead
from pyproxy.protocol import status_has_body

_CONTENT_TYPE = (b"content-type", b"text/plain")
_CLOSE = (b"connection", b"close")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def local_reply_head(status: int, length: int, keep_alive: bool) -> ResponseHead:
    """The head of a reply of ``length`` body bytes; a status that carries no content gets no
    content fields at all (RFC 9110 §8.6: no Content-Length in a 1xx or 204, and a 304's would
    describe a representation the proxy does not have)."""
    if status_has_body(status):
        headers = [_CONTENT_TYPE, (b"content-length", b"%d" % length)]
    else:
        headers = []
    if not keep_alive:
        headers.append(_CLOSE)
    return ResponseHead(status, _REASONS.get(status, b"Unknown"), headers)
