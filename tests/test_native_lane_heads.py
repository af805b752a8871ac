"""A head its filters changed, as the native pair sends it, against the general path's bytes.

The native pair sends a head its filters changed as the bytes the general path
would write: filtered_request + upstream_head through a client codec, and
downstream_head through a server codec. The pair writes such a head itself from
the start line as read and the filters' fields (heads.paired_request_edit /
paired_response_edit answer it the field list), or, for a request whose target
changed, sends heads.paired_request_head's bytes. Each case here runs the real
pair over socketpairs (or paired_request_head) and the general path and
compares; where the framing would change the pair hands the message over.
"""

from __future__ import annotations

import pytest
from pyproxy.native import express_pair
from test_native_pair import Rig

from pyproxy.chain.api import HeaderMap
from pyproxy.codec.events import RequestHead, ResponseHead
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.codec.http1_backend import make_http1_codec
from pyproxy.http.heads import (
    downstream_head,
    filtered_request,
    paired_request_edit,
    paired_request_head,
    paired_response_edit,
    upstream_head,
)

_express = express_pair()
needs_pair = pytest.mark.skipif(_express is None, reason="native extension not built")

REQUEST_FIELDS = [(b"host", b"svc"), (b"connection", b"keep-alive"), (b"x-a", b"1")]


def _edited(fields, pseudo, edit) -> HeaderMap:
    headers = HeaderMap(list(fields), dict(pseudo))
    edit(headers)
    return headers


REQUEST_EDITS = {
    "add": lambda h: h.add(b"x-lua", b"1"),
    "remove": lambda h: h.remove(b"x-a"),
    "path": lambda h: h.set(b":path", b"/rewritten?q=1"),
    "hop-by-hop added": lambda h: h.add(b"te", b"trailers"),
    "chunked added": lambda h: h.add(b"transfer-encoding", b"chunked"),  # hop-by-hop: dropped
    "length kept": lambda h: h.set(b"x-b", b"2"),
}


@pytest.mark.parametrize("edit", REQUEST_EDITS, ids=list(REQUEST_EDITS))
@pytest.mark.parametrize("length", [None, 5])
def test_a_paired_request_head_is_the_general_paths(edit, length):
    fields = REQUEST_FIELDS + ([(b"content-length", b"5")] if length else [])
    pseudo = {b":method": b"POST", b":path": b"/a", b":authority": b"svc"}
    headers = _edited(fields, pseudo, REQUEST_EDITS[edit])
    read = RequestHead(b"POST", b"/a", list(fields), content_length=length)
    general = make_http1_codec("fast", "client").send(
        upstream_head(filtered_request(read, headers), False)
    )
    assert paired_request_head(b"POST", b"/a", length, headers) == general


@needs_pair
@pytest.mark.parametrize("edit", REQUEST_EDITS, ids=list(REQUEST_EDITS))
@pytest.mark.parametrize("length", [None, 5])
def test_the_pair_sends_a_changed_request_head_as_the_general_path_does(edit, length):
    fields = REQUEST_FIELDS + ([(b"content-length", b"5")] if length else [])
    read = RequestHead(b"POST", b"/a", list(fields), content_length=length)
    general = make_http1_codec("fast", "client").send(
        upstream_head(
            filtered_request(read, _edited(fields, _POST_PSEUDO, REQUEST_EDITS[edit])), False
        )
    )
    body = b"hello" if length else b""
    wire = b"POST /a HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\nX-A: 1\r\n"
    wire += (b"Content-Length: 5\r\n" if length else b"") + b"\r\n" + body
    rig = Rig()
    try:
        seen = []

        def request_hook(method, target, read_fields, authority, content_length):
            seen.append(read_fields)
            headers = _edited(read_fields, _POST_PSEUDO, REQUEST_EDITS[edit])
            cl = content_length if content_length >= 0 else None
            return paired_request_edit(method, target, cl, headers)

        rig.pair.set_hooks(request_hook, None, None)
        rig.request(wire)
        assert seen == [fields] and rig.handovers == []
        assert rig.app.recv(65536) == general + body
    finally:
        rig.close()


_POST_PSEUDO = {b":method": b"POST", b":path": b"/a", b":authority": b"svc"}


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.set(b":method", b"HEAD"),  # the response's framing would differ
        lambda h: h.set(b"content-length", b"7"),
        lambda h: h.remove(b"content-length"),
    ],
)
def test_a_request_head_whose_framing_changes_is_handed_over(edit):
    fields = REQUEST_FIELDS + [(b"content-length", b"5")]
    headers = _edited(fields, {b":method": b"GET", b":path": b"/a"}, edit)
    assert paired_request_head(b"GET", b"/a", 5, headers) is None


RESPONSE_EDITS = {
    "add": lambda h: h.add(b"x-lua", b"1"),
    "remove": lambda h: h.remove(b"x-a"),
    "replace": lambda h: h.set(b"x-a", b"2"),
}


def _paired_response(status: int, read_fields: list, body: bytes, edit) -> tuple[list, bytes]:
    """Through a real pair: a GET, then this response with ``edit`` applied to its head by the
    response hook; the pair's handovers and what the downstream received."""
    rig = Rig()
    try:

        def response_hook(read_status, fields, content_length):
            as_read = b"%d" % read_status
            return paired_response_edit(as_read, _edited(fields, {b":status": as_read}, edit))

        rig.pair.set_hooks(None, response_hook, None)
        rig.request(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        rig.app.recv(65536)
        lines = b"".join(b"%s: %s\r\n" % (name.title(), value) for name, value in read_fields)
        rig.respond(b"HTTP/1.1 %d Reason\r\n%s\r\n%s" % (status, lines, body))
        if rig.handovers:
            return rig.handovers, b""
        return rig.handovers, rig.client.recv(65536)
    finally:
        rig.close()


@needs_pair
@pytest.mark.parametrize("edit", RESPONSE_EDITS, ids=list(RESPONSE_EDITS))
@pytest.mark.parametrize("status,length", [(200, 2), (404, 0), (204, None), (304, None)])
def test_the_pair_sends_a_changed_response_head_as_the_general_path_does(edit, status, length):
    read_fields = [(b"x-a", b"1"), (b"keep-alive", b"timeout=5")]
    if length is not None:
        read_fields.append((b"content-length", b"%d" % length))
    read = ResponseHead(status, b"Reason", read_fields, content_length=length)
    headers = _edited(
        strip_hop_by_hop(read_fields), {b":status": b"%d" % status}, RESPONSE_EDITS[edit]
    )
    server = make_http1_codec("fast", "server")
    server.receive_data(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    general = server.send(downstream_head(read, b"GET", headers, None))
    body = b"ok"[: length or 0]
    handovers, sent = _paired_response(status, read_fields, body, RESPONSE_EDITS[edit])
    assert handovers == [] and sent == general + body


@needs_pair
@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.remove(b"content-length"),  # the general path would send it chunked
        lambda h: h.add(b"connection", b"close"),  # and close the connection after it
        lambda h: h.set(b"content-length", b"x"),  # and refuse to send it
    ],
)
def test_a_response_head_whose_framing_changes_is_handed_over(edit):
    handovers, _ = _paired_response(200, [(b"content-length", b"2")], b"ok", edit)
    assert [kind for kind, _ in handovers] == [_express.RESPONSE_TAKEN]


def test_a_response_whose_status_changes_is_handed_over():
    headers = _edited(
        [(b"content-length", b"2")], {b":status": b"200"}, lambda h: h.set(b":status", b"201")
    )
    assert paired_response_edit(b"200", headers) is None
