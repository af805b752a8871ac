"""heads.paired_request_head / paired_response_head against the general path's own bytes.

The native pair sends a head its filters changed as the bytes the general path
would write: filtered_request + upstream_head through a client codec, and
downstream_head through a server codec. Each case here runs both and compares;
None (the pair hands the message over) where the framing would change.
"""

from __future__ import annotations

import pytest

from pyproxy.chain.api import HeaderMap
from pyproxy.codec.events import RequestHead, ResponseHead
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.codec.http1_backend import make_http1_codec
from pyproxy.http.heads import (
    downstream_head,
    filtered_request,
    paired_request_head,
    paired_response_head,
    upstream_head,
)

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


@pytest.mark.parametrize("edit", RESPONSE_EDITS, ids=list(RESPONSE_EDITS))
@pytest.mark.parametrize("status,length", [(200, 2), (404, 0), (204, None), (304, None)])
def test_a_paired_response_head_is_the_general_paths(edit, status, length):
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
    assert paired_response_head(status, b"Reason", length, headers) == general


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.set(b":status", b"201"),
        lambda h: h.remove(b"content-length"),  # the general path would send it chunked
        lambda h: h.add(b"connection", b"close"),  # and close the connection after it
        lambda h: h.set(b"content-length", b"x"),  # and refuse to send it
    ],
)
def test_a_response_head_whose_framing_changes_is_handed_over(edit):
    headers = _edited([(b"content-length", b"2")], {b":status": b"200"}, edit)
    assert paired_response_head(200, b"OK", 2, headers) is None
