/* The native HTTP/2 codec: one libnghttp2 session per connection, driven from Python through cffi.
 *
 * Contract (pyproxy/codec/http2_native.py is the only caller):
 *   - no Python object is ever reachable from C: the session's user data is the pp_h2 struct;
 *   - callbacks never call into Python: they append fixed-size records (pp_h2_rec, then `len`
 *     payload bytes) to one event buffer that Python reads after pp_h2_recv, one crossing a read;
 *   - header blocks travel packed: per field a uint32 name length, a uint32 value length, the
 *     name, the value (native byte order) - both in received HEADERS records and in submits;
 *     a block that holds no NUL byte may travel in the PP_H2_PLAIN form instead, the names and
 *     values joined by single NUL bytes (name NUL value NUL name ...): a plain received block
 *     always does (plain values are visible ASCII), a submit says so in its flags;
 *   - outbound DATA is queued per stream in C (a copy) and handed to nghttp2 by a data source
 *     callback within the peer's windows; trailers queued behind it go out at its end;
 *   - every function returns >= 0 or a negative nghttp2 error code; nothing raises.
 */
#ifndef PYPROXY_H2_CODEC_H
#define PYPROXY_H2_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum {
    PP_H2_HEADERS = 1,  /* a = nghttp2_headers_category; flags: END_STREAM, PP_H2_PLAIN */
    PP_H2_DATA = 2,     /* payload: the bytes of one DATA frame (flow-controlled length = len) */
    PP_H2_END = 3,      /* END_STREAM on a DATA frame */
    PP_H2_RST = 4,      /* RST_STREAM received, a = error code */
    PP_H2_WINDOW = 5,   /* WINDOW_UPDATE received, a = increment */
    PP_H2_SETTINGS = 6, /* the peer's SETTINGS (not an ACK) */
    PP_H2_CLOSED = 7,   /* a stream closed with a = error code != 0 */
};

/* HEADERS flag: the block is plain (h2_codec.c says which); h2's rules need not judge it, and it
 * travels NUL-joined. Submit flags: PP_H2_END_STREAM, and PP_H2_PLAIN for a NUL-joined block. */
#define PP_H2_END_STREAM 1
#define PP_H2_PLAIN 2

typedef struct {
    uint32_t kind;
    int32_t stream_id;
    uint32_t a;
    uint32_t flags;
    uint32_t len;
} pp_h2_rec;

typedef struct pp_h2 pp_h2;

/* reset_burst: the RST_STREAM bucket of nghttp2's own rapid-reset guard (the proxy counts its own). */
pp_h2 *pp_h2_new(int server, uint32_t reset_burst);
void pp_h2_del(pp_h2 *h);
long pp_h2_live(void);

/* Feed bytes; then *events / *events_len hold the records of this read, and *pending the bytes
 * the read itself left to send (SETTINGS or PING acknowledgements, DATA a window let go...; 0:
 * the read needs no flush of its own). >= 0 or an error. */
ssize_t pp_h2_recv(pp_h2 *h, const uint8_t *data, size_t len, const uint8_t **events, size_t *events_len,
                   size_t *pending);
/* FrameScanner.feed's walk (pyproxy/codec/http2.py) over a read that needs nothing cut: from
 * its state (left: payload bytes of the current frame still to come, block: bytes of the header
 * block in progress), the state after the read, left + (block << 24); -1 when the read holds a
 * GOAWAY, ends inside a frame header, or takes a header block past limit (FrameScanner.feed
 * then walks it itself, from the state it had). */
int64_t pp_h2_scan(const char *data, size_t len, uint32_t limit, uint32_t left, uint32_t block);
/* The library's own GOAWAY error code after a connection error it found, else -1. */
int64_t pp_h2_failed(pp_h2 *h);
/* Everything nghttp2 has to send now: *out valid until the next call. */
ssize_t pp_h2_send(pp_h2 *h, const uint8_t **out);

int pp_h2_settings(pp_h2 *h, const uint32_t *ids_values, size_t n);
int pp_h2_set_connection_window(pp_h2 *h, int32_t size);
/* stream_id -1 opens a client stream and returns its id. */
int32_t pp_h2_submit_headers(pp_h2 *h, int32_t stream_id, const uint8_t *packed, size_t len, int flags);
int pp_h2_queue_data(pp_h2 *h, int32_t stream_id, const uint8_t *data, size_t len, int end_stream);
int pp_h2_queue_trailers(pp_h2 *h, int32_t stream_id, const uint8_t *packed, size_t len, int flags);
int pp_h2_reset(pp_h2 *h, int32_t stream_id, uint32_t error_code);
/* Give n received bytes' window back: 1 when the session now has something to send (the
 * WINDOW_UPDATE nghttp2 sends once half a window is consumed, or other frames), 0 when not. */
int pp_h2_consume(pp_h2 *h, int32_t stream_id, size_t n);
int pp_h2_goaway(pp_h2 *h, uint32_t error_code, const uint8_t *opaque, size_t len);
/* What may be queued on the stream now: min(stream, connection window) less what waits in C. */
int64_t pp_h2_window(pp_h2 *h, int32_t stream_id);
uint32_t pp_h2_remote_setting(pp_h2 *h, int id);
int32_t pp_h2_next_stream_id(pp_h2 *h);
int32_t pp_h2_last_proc_stream_id(pp_h2 *h);

#endif
