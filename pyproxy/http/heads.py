"""How heads change on their way through: the request toward the upstream, the response back.

Pure functions of the heads (no session state), so each rule lives here once
and a test can check it without a connection.
"""

from __future__ import annotations

from pyproxy.chain.api import HeaderMap
from pyproxy.codec.events import RequestHead, ResponseHead
from pyproxy.codec.http1 import CodecUsageError, HeadFacts, facts_of, strip_hop_by_hop
from pyproxy.codec.http1_fast import request_head_bytes
from pyproxy.counters import STAGES
from pyproxy.protocol import FRAMING_FIELDS, framing_allowed, has_body

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
CHUNKED = (b"transfer-encoding", b"chunked")


def upstream_head(request: RequestHead, multiplexed: bool) -> RequestHead:
    """The request head as it goes upstream (hop-by-hop fields off, framing for the hop)."""
    if request.wire is not None and not multiplexed:
        # An HTTP/1 upstream gets the wire bytes, which hold no hop-by-hop line (a
        # serialiser that cannot use them strips the list): the request goes as it is.
        return request
    headers = strip_hop_by_hop(request.headers)
    if request.chunked:
        if request.content_length is not None and not multiplexed:
            # An HTTP/2 request that announced trailers: chunked carries them (RFC 9112 §7.1).
            headers = [field for field in headers if field[0] != b"content-length"]
        headers.append(CHUNKED)
    if request.upgrade:
        # The Upgrade offer is hop-by-hop but must reach the app for it to switch (RFC 9110 §7.8).
        headers.append((b"connection", b"upgrade"))
        headers.extend((name, value) for name, value in request.headers if name == b"upgrade")
    return RequestHead(request.method, request.target, headers, request.http_version)


def filtered_request(request: RequestHead, headers: HeaderMap) -> RequestHead:
    """The request as the decode filters left it (the same object if none changed it)."""
    if not headers.changed:
        return request
    pseudo = headers.pseudo
    chunked = request.chunked
    if request.content_length is not None and not chunked and not _has_length(headers.headers):
        # A filter dropped the length (it will change the body, as body-rewriting Proxy-Wasm
        # modules do): chunked frames what it sends instead.
        chunked = True
    # Built field by field: dataclasses.replace costs several times more per request.
    return RequestHead(
        pseudo[b":method"],
        pseudo[b":path"],
        headers.headers,
        request.http_version,
        request.keep_alive,
        request.content_length,
        chunked,
        request.expect_continue,
        request.upgrade,
        None,  # wire: the received bytes no longer say what goes on
    )


def downstream_head(
    head: ResponseHead, method: bytes, filtered: HeaderMap | None, trace: list[int] | None
) -> ResponseHead:
    """The response head as it goes downstream: the filters' version of it if they had one,
    hop-by-hop fields off, framing for the hop, Server-Timing when ``trace`` is given."""
    wire = None
    content_length = head.content_length
    if filtered is not None:
        status = int(filtered.pseudo.get(b":status", b"%d" % head.status))
        headers = filtered.headers
        if not framing_allowed(status):  # a filter made it a 204: the body's framing goes
            headers = [field for field in headers if field[0] not in FRAMING_FIELDS]
            content_length = None
        elif content_length is not None and not _has_length(headers):
            content_length = None  # a filter dropped the length (the body changes): chunked
    else:
        status = head.status
        headers = strip_hop_by_hop(head.headers)
        wire = head.wire  # forwarded unchanged: an HTTP/1 downstream sends these bytes
    if status == 101:
        headers.append((b"connection", b"upgrade"))
        headers.extend((name, value) for name, value in head.headers if name == b"upgrade")
    elif (
        not _has_length(headers)
        and (head.chunked or content_length is None)
        and has_body(status, method)
    ):
        headers.append(CHUNKED)
    if trace is not None:
        headers.append((b"server-timing", server_timing(trace)))
        wire = None
    return ResponseHead(
        status,
        head.reason,
        headers,
        head.http_version,
        content_length=content_length,
        wire=wire,
    )


# The native pair forwards a whole message's body as read, so it can carry a head its filters
# changed only as bytes that frame that body the same way; anything else goes the general way.
# For what the pair carries (HTTP/1.1 both ways, Content-Length framing, no upgrade, a request
# that is not HEAD) upstream_head(filtered_request(...)) and downstream_head(...) reduce to the
# start line as read and the filters' fields (less hop-by-hop ones on a request), which the
# pair writes itself (composed_head in native/express_lane.c), or, for a request whose target
# changed, to paired_request_head; tests/test_native_lane_heads.py holds both to the general
# path's bytes.


def paired_request_head(
    method: bytes, target: bytes, content_length: int | None, headers: HeaderMap
) -> bytes | None:
    """The head the general path would send upstream for a request read whole (``method``,
    ``content_length``) whose filters left ``headers``; None when the pair cannot carry it
    (the method or the body's framing changed, or the head cannot be sent)."""
    pseudo = headers.pseudo
    if pseudo[b":method"] != method:
        return None
    fields = strip_hop_by_hop(headers.headers)
    if not _frames(fields, content_length):
        return None
    return request_head_bytes(method, pseudo[b":path"], fields)


def paired_request_edit(
    method: bytes, target: bytes, content_length: int | None, headers: HeaderMap
) -> bytes | list | None:
    """What the native pair is told to send for a request whose filters changed ``headers``:
    their field list while the start line stays as read (the pair writes the head from it,
    as paired_request_head would, or hands the request over when that head would not frame
    the body as read), else paired_request_head's bytes (None: hand it over)."""
    pseudo = headers.pseudo
    if pseudo[b":method"] == method and pseudo[b":path"] == target:
        return headers.headers
    return paired_request_head(method, target, content_length, headers)


def paired_response_edit(as_read: bytes, headers: HeaderMap) -> list | None:
    """The same for a response whose status was ``as_read`` (b"200"): its filters' field list
    while the status stays as read (the pair writes the head from the status line as read,
    as the general path would, or hands the response over when that head would not frame
    the body as read or would close the connection); None (hand it over) when it changed."""
    if headers.pseudo.get(b":status", as_read) == as_read:
        return headers.headers
    return None


def _frames(fields, content_length: int | None) -> bool:
    """Whether a head sent with these fields frames its body by ``content_length`` as read."""
    try:
        facts: HeadFacts = facts_of(fields)
    except CodecUsageError:
        return False  # the general path refuses to send it, and says so
    return facts.content_length == content_length and not (facts.chunked or facts.upgrade_field)


def retryable(request: RequestHead) -> bool:
    """A request that can be sent again safely: idempotent and complete with its head."""
    return (
        request.method in IDEMPOTENT
        and not request.chunked
        and not request.content_length
        and not request.upgrade
    )


def _has_length(headers) -> bool:
    for name, _ in headers:
        if name == b"content-length" or name == b"transfer-encoding":
            return True
    return False


def server_timing(trace: list[int]) -> bytes:
    """W3C Server-Timing: this request's stages so far, in milliseconds."""
    parts = [f"{name};dur={trace[i] / 1e6:.3f}" for i, name in enumerate(STAGES) if trace[i]]
    return ", ".join(parts).encode() if parts else b"total;dur=0"
