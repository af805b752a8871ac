"""The native HTTP/2 codec: libnghttp2 (native/h2_codec.c) behind the subset of hyper-h2's
H2Connection that pyproxy.http uses, emitting h2's own event classes, so the sessions, HTTP mode,
gRPC mode and every filter run unchanged on either codec.

One C call per read: nghttp2's callbacks only append records to a buffer, read here after
`pp_h2_recv` returns. Outbound DATA waits in C and leaves through a data source within the peer's
windows; `local_flow_control_window` already counts what waits there, so the sessions' own send
queues (and the backpressure they signal) work as with h2.
"""

from __future__ import annotations

import struct
from itertools import chain
from typing import Any

from h2.events import (
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import InvalidBodyLengthError, ProtocolError, StreamClosedError
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers

from pyproxy.codec.events import Headers
from pyproxy.native import effective_http2_codec, native_extension

_h2: Any = native_extension("_h2")
AVAILABLE = _h2 is not None
if _h2 is not None:
    ffi, lib = _h2.ffi, _h2.lib

# Record kinds (h2_codec.h).
_HEADERS, _DATA, _END, _RST, _WINDOW, _SETTINGS, _CLOSED = 1, 2, 3, 4, 5, 6, 7
_HCAT_REQUEST, _HCAT_RESPONSE = 0, 1  # nghttp2_headers_category
_END_STREAM, _PLAIN = 1, 2  # PP_H2_END_STREAM, PP_H2_PLAIN (a NUL-joined block)
_REC = struct.Struct("=IiIII")
_LENS = struct.Struct("=II")
# SETTINGS identifiers (RFC 9113 §6.5.2).
ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_HEADER_LIST_SIZE = 0x2, 0x3, 0x4, 0x6
_NO_LIMIT = 1 << 31  # nghttp2 cuts DATA into frames itself: only the window bounds a send


effective_codec = effective_http2_codec


def pack_headers(headers: Headers) -> tuple[bytes, int]:
    """A header list as one buffer for one crossing, and its form's flag (h2_codec.h): NUL-joined
    (PP_H2_PLAIN) when no name or value holds a NUL byte, else length-prefixed."""
    flat = list(chain.from_iterable(headers))
    joined = b"\0".join(flat)
    if flat and joined.count(0) == len(flat) - 1:
        return joined, _PLAIN
    pack = _LENS.pack
    return b"".join([pack(len(name), len(value)) + name + value for name, value in headers]), 0


def split_headers(buf: bytes, start: int, end: int) -> Headers:
    """A NUL-joined block (a plain one: no NUL can be in it) as the header list."""
    if start == end:
        return []
    fields = iter(buf[start:end].split(b"\0"))
    return list(zip(fields, fields, strict=False))  # 2n fields: C joined n pairs


def _unpack_headers(buf: bytes, start: int, end: int) -> Headers:
    headers: Headers = []
    add = headers.append
    unpack = _LENS.unpack_from
    pos = start
    while pos < end:
        nlen, vlen = unpack(buf, pos)
        pos += 8
        name_end = pos + nlen
        pos = name_end + vlen
        add((buf[name_end - nlen : name_end], buf[name_end:pos]))
    return headers


class _RemoteSettings:
    __slots__ = ("_session",)

    def __init__(self, session) -> None:
        self._session = session  # the cdata, not the connection: no cycle delays the free

    @property
    def max_concurrent_streams(self) -> int:
        return lib.pp_h2_remote_setting(self._session, MAX_CONCURRENT_STREAMS)


class NativeH2Connection:
    """One nghttp2 session, freed with this object (never referenced from C)."""

    __slots__ = (
        "session",
        "client_side",
        "remote_settings",
        "_quiet",
        "_lengths",
        "_informational",
        "_heads",
        "_out",
        "_events",
        "window_events",
        "output_pending",
        "_pending",
    )

    def __init__(self, client_side: bool, reset_burst: int) -> None:
        session = lib.pp_h2_new(0 if client_side else 1, reset_burst)
        if session == ffi.NULL:
            raise MemoryError("nghttp2 session")
        self.session = ffi.gc(session, lib.pp_h2_del)
        self.client_side = client_side
        self.remote_settings = _RemoteSettings(self.session)
        # Streams whose close with an error code is already reported (RST received or sent).
        self._quiet: set[int] = set()
        # Request bodies still expected per Content-Length (§8.1.1), as h2 tracks them.
        self._lengths: dict[int, int] = {}
        # Client streams whose last response head was informational: no DATA or END may follow.
        self._informational: set[int] = set()
        # Client streams that asked HEAD: their responses carry no body (h2's rule).
        self._heads: set[int] = set()
        self._out = ffi.new("const uint8_t **")
        self._events = ffi.new("size_t *")
        # False: the owner has nothing waiting for flow-control credit, so WINDOW_UPDATE frames
        # make no event (C's own queues move on them without one). The owner sets it per read.
        self.window_events = True
        # Did the last read or acknowledgement leave anything to send (a flush to do)?
        self.output_pending = True
        self._pending = ffi.new("size_t *")

    def initiate(self, settings: dict[int, int], connection_window: int) -> None:
        """Preface (client) and SETTINGS; the connection window opened past 65,535 (§6.9.2)."""
        flat = [v for item in settings.items() for v in item]
        lib.pp_h2_settings(self.session, ffi.new("uint32_t[]", flat), len(settings))
        if connection_window > 65535:
            lib.pp_h2_set_connection_window(self.session, connection_window)

    # ---- bytes in --------------------------------------------------------------------

    def receive_data(self, data) -> list:
        n = lib.pp_h2_recv(
            self.session, ffi.from_buffer(data), len(data), self._out, self._events, self._pending
        )
        return self.received(n)

    def received(self, n: int) -> list:
        """The events of the read pp_h2_recv (or a lane's pp_glane_recv) returned n for."""
        out = self._out
        self.output_pending = self._pending[0] != 0
        size = self._events[0]
        try:
            # One copy of the records, then plain bytes slicing (cheaper than a cffi buffer's).
            events = self._decode(ffi.buffer(out[0], size)[:]) if size else []
        except ProtocolError:
            lib.pp_h2_goaway(self.session, 0x1, ffi.NULL, 0)  # §5.4.1, as h2 answers it
            raise
        if n < 0 or lib.pp_h2_failed(self.session) >= 0:
            if n < 0:
                lib.pp_h2_goaway(self.session, 0x1, ffi.NULL, 0)  # PROTOCOL_ERROR
            raise ProtocolError(ffi.string(lib.nghttp2_strerror(n)).decode() if n < 0 else "")
        return events

    def _decode(self, buf) -> list:
        events: list = []
        add = events.append
        unpack = _REC.unpack_from
        quiet = self._quiet
        pos, end = 0, len(buf)
        while pos < end:
            kind, sid, a, flags, length = unpack(buf, pos)
            pos += 20
            if kind == _DATA:
                data = buf[pos : pos + length]
                if sid in self._informational:
                    raise ProtocolError("cannot receive data before headers")
                if sid in self._lengths:
                    self._count_body(sid, length, False)
                add(DataReceived(stream_id=sid, data=data, flow_controlled_length=length))
            elif kind == _HEADERS:
                if flags & _PLAIN:
                    headers = split_headers(buf, pos, pos + length)
                else:
                    headers = _unpack_headers(buf, pos, pos + length)
                self._headers(events, sid, a, flags, headers)
            elif kind == _END:
                if sid in self._informational:
                    raise ProtocolError("cannot receive data before headers")
                if sid in self._lengths:
                    self._count_body(sid, 0, True)
                self._heads.discard(sid)
                add(StreamEnded(stream_id=sid))
            elif kind == _WINDOW:
                if self.window_events:
                    add(WindowUpdated(stream_id=sid, delta=a))
            elif kind == _RST:
                self._lengths.pop(sid, None)
                self._informational.discard(sid)
                self._heads.discard(sid)
                if a:
                    quiet.add(sid)
                add(StreamReset(stream_id=sid, error_code=a, remote_reset=True))
            elif kind == _CLOSED:
                self._lengths.pop(sid, None)
                self._informational.discard(sid)
                self._heads.discard(sid)
                if sid in quiet:
                    quiet.discard(sid)
                else:  # nghttp2 reset it (a malformed message, a flow-control error)
                    add(StreamReset(stream_id=sid, error_code=a, remote_reset=False))
            elif kind == _SETTINGS:
                add(RemoteSettingsChanged())
            pos += length
        return events

    def _headers(self, events: list, sid: int, category: int, flags: int, headers: Headers) -> None:
        """Checked and normalised by h2's rules (§8.2, §8.3), then reported as h2 reports it.
        A block the C side found plain is one those rules pass unchanged: not judged again."""
        client = self.client_side
        ended = flags & 1
        if client:
            # As h2 tells them: trailers follow a final response; until one came, a block is
            # a response, whatever it holds (the checks below judge a misplaced :status).
            trailers = category != _HCAT_RESPONSE and sid not in self._informational
            if trailers == (bool(headers) and headers[0][0] == b":status"):
                flags &= ~_PLAIN
        else:
            trailers = category != _HCAT_REQUEST
        if trailers and not ended:
            raise ProtocolError("Trailers must have END_STREAM set")
        if not flags & _PLAIN:
            rules = HeaderValidationFlags(client, trailers, client and not trailers, False)
            headers = list(validate_headers(normalize_inbound_headers(headers, rules), rules))
        # h2 reads Content-Length from every block: digits, one value; a HEAD's answers expect
        # no body whatever they say. A response's or request's value bounds the body after it.
        heads = self._heads
        expected = 0 if heads and sid in heads else _content_length(headers)
        if trailers:
            self._lengths.pop(sid, None)
            heads.discard(sid)
        elif client:
            if headers[0][1][:1] == b"1":
                if ended:
                    raise ProtocolError("Cannot set END_STREAM on informational responses")
                self._informational.add(sid)
            else:
                self._informational.discard(sid)
                if expected is not None:
                    self._lengths[sid] = expected
                else:
                    self._lengths.pop(sid, None)
                if ended:
                    heads.discard(sid)
        elif expected is not None:
            self._lengths[sid] = expected
            if ended:  # stricter than h2: a request that ends here has no body (§8.1.1)
                self._count_body(sid, 0, True)
        add_headers(events, client, sid, trailers, ended, headers, flags & _PLAIN)

    def _count_body(self, sid: int, length: int, ended: bool) -> None:
        left = self._lengths[sid] - length
        if left < 0 or (ended and left):
            raise InvalidBodyLengthError(self._lengths[sid], length)
        if ended:
            del self._lengths[sid]
        else:
            self._lengths[sid] = left

    # ---- bytes out -------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        n = lib.pp_h2_send(self.session, self._out)
        if n <= 0:
            return b""
        return ffi.buffer(self._out[0], n)[:]

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        packed, form = pack_headers(headers)
        opens = self._opens(stream_id)  # one look: a new client stream, else trailers or a head
        if end_stream and not opens:
            rv = lib.pp_h2_queue_trailers(self.session, stream_id, packed, len(packed), form)
        else:
            sid = -1 if opens else stream_id
            flags = form | _END_STREAM if end_stream else form
            rv = lib.pp_h2_submit_headers(self.session, sid, packed, len(packed), flags)
            if opens and rv >= 0 and _method(headers) == b"HEAD":
                self._heads.add(rv)
        if rv < 0:
            raise StreamClosedError(stream_id)

    def _opens(self, stream_id: int) -> bool:
        """A client's HEADERS on the id get_next_available_stream_id gave: a new stream."""
        return self.client_side and stream_id == lib.pp_h2_next_stream_id(self.session)

    def send_data(self, stream_id: int, data, end_stream: bool = False) -> None:
        rv = lib.pp_h2_queue_data(
            self.session, stream_id, ffi.from_buffer(data), len(data), end_stream
        )
        if rv < 0:
            raise StreamClosedError(stream_id)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        self._lengths.pop(stream_id, None)
        if error_code:
            self._quiet.add(stream_id)
        if lib.pp_h2_reset(self.session, stream_id, error_code) < 0:
            raise StreamClosedError(stream_id)

    def acknowledge_received_data(self, n: int, stream_id: int) -> None:
        self.output_pending = lib.pp_h2_consume(self.session, stream_id, n) != 0

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None) -> None:
        opaque = additional_data or b""
        lib.pp_h2_goaway(self.session, error_code, opaque, len(opaque))

    # ---- state -----------------------------------------------------------------------

    def local_flow_control_window(self, stream_id: int) -> int:
        window = lib.pp_h2_window(self.session, stream_id)
        if window < 0:
            raise StreamClosedError(stream_id)
        return window

    @property
    def max_outbound_frame_size(self) -> int:
        return _NO_LIMIT

    @property
    def highest_inbound_stream_id(self) -> int:
        return lib.pp_h2_last_proc_stream_id(self.session)

    def get_next_available_stream_id(self) -> int:
        sid = lib.pp_h2_next_stream_id(self.session)
        if sid > 0x7FFFFFFF or sid <= 0:
            raise ProtocolError("stream ids exhausted")
        return sid


def _method(headers: Headers) -> bytes | None:
    for name, value in headers:
        if name == b":method":
            return value
        if name[:1] != b":":
            return None  # pseudo-header fields come first (§8.3)
    return None


def _content_length(headers: Headers) -> int | None:
    """A request's Content-Length; conflicting or non-digit values are h2's ProtocolError."""
    found = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (found is not None and int(value) != found):
                raise ProtocolError(f"Invalid content-length header: {value!r}")
            found = int(value)
    return found


def add_headers(
    events: list,
    client: bool,
    sid: int,
    trailers: bool,
    ended: int,
    headers: Headers,
    plain: int = 0,
) -> None:
    """A header block as h2 reports it: request, (informational) response or trailers. A plain
    block's event says so (`fields_checked`): its names are lower-case tokens and its values
    visible ASCII, so the proxy's own per-field checks have nothing left to find."""
    end = StreamEnded(stream_id=sid) if ended else None
    event: Any
    if trailers:
        event = TrailersReceived(stream_id=sid, headers=headers, stream_ended=end)
    elif not client:
        event = RequestReceived(stream_id=sid, headers=headers, stream_ended=end)
    elif headers[0][1][:1] == b"1":
        event = InformationalResponseReceived(stream_id=sid, headers=headers)
    else:
        event = ResponseReceived(stream_id=sid, headers=headers, stream_ended=end)
    if plain:
        event.fields_checked = True
    events.append(event)
    if end is not None:
        events.append(end)


def fields_checked(event) -> bool:
    """Did the native codec find this header block plain (see add_headers)? Never for h2's."""
    return getattr(event, "fields_checked", False)
