/* The native HTTP/2 codec over libnghttp2; see h2_codec.h for the contract. */
#include "h2_codec.h"
#include "h2_taker.h"

#include <nghttp2/nghttp2.h>
#include <stdlib.h>
#include <string.h>
#include "grow_buf.h"
#include "protocol_facts.h" /* generated: HTTP/2 connection-specific names */


/* One stream's outbound DATA not yet taken by nghttp2, and trailers to follow it. */
typedef struct pp_out {
    struct pp_out *prev, *next; /* every live pp_out of the session, freed with it */
    int32_t stream_id;
    pp_buf data;
    size_t off;
    int eof;       /* nothing more will be queued */
    int submitted; /* a data source is attached (nghttp2_submit_data) */
    pp_buf trailers;
    int has_trailers;
    int trailers_flags; /* PP_H2_PLAIN: the trailers are NUL-joined */
    uint32_t reset_after; /* 1 + the code of an RST_STREAM that waits for the END_STREAM */
} pp_out;

struct pp_h2 {
    nghttp2_session *session;
    pp_buf events;
    pp_buf headers; /* the header block being received */
    pp_buf joined;  /* the same block NUL-joined, while it stays plain */
    pp_buf out;
    size_t data_rec; /* offset of the DATA record the current frame appends to, or SIZE_MAX */
    size_t queued;   /* bytes in all pp_out queues */
    pp_out *outs;
    int64_t failed;
    int app_goaway;
    size_t handed; /* bytes of records pp_h2_recv returned: dropped at the next one */
    int frame_had_data;
    unsigned seen; /* SEEN_* of the header block being received */
    int not_plain;
    pp_h2_taker taker; /* take == NULL: every stream is Python's */
};

static long live_sessions;

long pp_h2_live(void) { return live_sessions; }

static int add_record(pp_h2 *h, uint32_t kind, int32_t sid, uint32_t a, uint32_t flags,
                      const void *payload, size_t len) {
    pp_h2_rec rec = {kind, sid, a, flags, (uint32_t)len};
    if (buf_reserve(&h->events, sizeof rec + len)) return NGHTTP2_ERR_CALLBACK_FAILURE;
    buf_add(&h->events, &rec, sizeof rec);
    if (len) buf_add(&h->events, payload, len);
    return 0;
}

/* ---- packed header blocks <-> nghttp2_nv ------------------------------------------------ */

/* A NUL-joined block (name NUL value NUL ...): 2n - 1 NULs for n fields. */
static nghttp2_nv *unpack_joined(const uint8_t *p, size_t len, size_t *count) {
    size_t nuls = 0;
    for (const uint8_t *q = p; len && (q = memchr(q, 0, len - (size_t)(q - p))) != NULL; q++)
        nuls++;
    if (len && nuls % 2 == 0) return NULL;
    size_t n = len ? (nuls + 1) / 2 : 0;
    nghttp2_nv *nva = malloc((n ? n : 1) * sizeof *nva);
    if (nva == NULL) return NULL;
    const uint8_t *pos = p, *end = p + len;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *name_end = memchr(pos, 0, (size_t)(end - pos));
        const uint8_t *value = name_end + 1;
        const uint8_t *value_end = memchr(value, 0, (size_t)(end - value));
        if (value_end == NULL) value_end = end;
        nva[i].name = (uint8_t *)pos;
        nva[i].namelen = (size_t)(name_end - pos);
        nva[i].value = (uint8_t *)value;
        nva[i].valuelen = (size_t)(value_end - value);
        nva[i].flags = NGHTTP2_NV_FLAG_NONE;
        pos = value_end + 1;
    }
    *count = n;
    return nva;
}

static nghttp2_nv *unpack_nv(const uint8_t *p, size_t len, int flags, size_t *count) {
    if (flags & PP_H2_PLAIN) return unpack_joined(p, len, count);
    size_t n = 0, pos = 0;
    while (pos + 8 <= len) {
        uint32_t nl, vl;
        memcpy(&nl, p + pos, 4);
        memcpy(&vl, p + pos + 4, 4);
        pos += 8 + (size_t)nl + vl;
        n++;
    }
    if (pos != len) return NULL;
    nghttp2_nv *nva = malloc((n ? n : 1) * sizeof *nva);
    if (nva == NULL) return NULL;
    pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t nl, vl;
        memcpy(&nl, p + pos, 4);
        memcpy(&vl, p + pos + 4, 4);
        nva[i].name = (uint8_t *)p + pos + 8;
        nva[i].namelen = nl;
        nva[i].value = (uint8_t *)p + pos + 8 + nl;
        nva[i].valuelen = vl;
        nva[i].flags = NGHTTP2_NV_FLAG_NONE; /* nghttp2 copies them when submitted */
        pos += 8 + (size_t)nl + vl;
    }
    *count = n;
    return nva;
}

/* ---- outbound queues ---------------------------------------------------------------------- */

static void out_free(pp_h2 *h, pp_out *q);

static pp_out *out_link(pp_h2 *h, int32_t sid) {
    pp_out *q = calloc(1, sizeof *q);
    if (q == NULL) return NULL;
    q->stream_id = sid;
    q->next = h->outs;
    if (h->outs) h->outs->prev = q;
    h->outs = q;
    return q;
}

static pp_out *out_get(pp_h2 *h, int32_t sid, int create) {
    pp_out *q = nghttp2_session_get_stream_user_data(h->session, sid);
    if (q != NULL) return q;
    /* A client stream whose HEADERS wait to be sent is not open in nghttp2 yet. */
    for (q = h->outs; q != NULL; q = q->next)
        if (q->stream_id == sid) return q;
    if (!create || nghttp2_session_find_stream(h->session, sid) == NULL) return NULL;
    q = out_link(h, sid);
    if (q != NULL && nghttp2_session_set_stream_user_data(h->session, sid, q) != 0) {
        out_free(h, q);
        return NULL;
    }
    return q;
}

static void out_free(pp_h2 *h, pp_out *q) {
    if (q->prev) q->prev->next = q->next;
    else h->outs = q->next;
    if (q->next) q->next->prev = q->prev;
    h->queued -= q->data.len - q->off;
    free(q->data.data);
    free(q->trailers.data);
    free(q);
}

static ssize_t read_data(nghttp2_session *session, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *data_flags, nghttp2_data_source *source, void *user_data) {
    pp_h2 *h = user_data;
    pp_out *q = source->ptr;
    size_t have = q->data.len - q->off;
    size_t n = have < length ? have : length;
    if (n) {
        memcpy(buf, q->data.data + q->off, n);
        q->off += n;
        h->queued -= n;
        if (q->off == q->data.len) q->off = q->data.len = 0;
    }
    if (q->off == q->data.len && q->eof) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        q->submitted = 0;
        if (q->has_trailers) {
            size_t count;
            nghttp2_nv *nva = unpack_nv(q->trailers.data, q->trailers.len, q->trailers_flags, &count);
            if (nva == NULL) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
            *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            int rv = nghttp2_submit_trailer(session, sid, nva, count);
            free(nva);
            q->has_trailers = 0;
            if (rv != 0) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        return (ssize_t)n;
    }
    if (!n) return NGHTTP2_ERR_DEFERRED;
    return (ssize_t)n;
}

static int out_kick(pp_h2 *h, pp_out *q) {
    if (nghttp2_session_find_stream(h->session, q->stream_id) == NULL)
        return 0; /* not open yet: on_frame_send of its HEADERS attaches the data source */
    if (q->submitted) {
        nghttp2_session_resume_data(h->session, q->stream_id); /* fails only when not deferred */
        return 0;
    }
    nghttp2_data_provider prd;
    prd.source.ptr = q;
    prd.read_callback = read_data;
    int rv = nghttp2_submit_data(h->session, NGHTTP2_FLAG_END_STREAM, q->stream_id, &prd);
    if (rv == 0) q->submitted = 1;
    return rv;
}

/* ---- callbacks: records only ------------------------------------------------------------ */

/* ---- the plain-header-block check --------------------------------------------------------
 * A conservative subset of what h2 accepts (RFC 9113 §8.2, §8.3): lower-case token names, values
 * of visible ASCII with inner spaces, pseudo-headers once each and first, none of the fields h2
 * rewrites or judges (connection-specific ones, a TE other than "trailers", host, cookie). A
 * block inside it is marked PP_H2_PLAIN and skips the Python check; anything else is judged by
 * h2's own rules there. */

enum { SEEN_METHOD = 1, SEEN_SCHEME = 2, SEEN_PATH = 4, SEEN_AUTHORITY = 8, SEEN_STATUS = 16,
       SEEN_REGULAR = 32 };

static int is_token_lower(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int plain_value(const uint8_t *v, size_t n) {
    if (n && (v[0] == ' ' || v[n - 1] == ' ')) return 0;
    for (size_t i = 0; i < n; i++)
        if (v[i] < 0x20 || v[i] > 0x7e) return 0;
    return 1;
}

static int is_name(const uint8_t *name, size_t len, const char *lit) {
    return len == strlen(lit) && memcmp(name, lit, len) == 0;
}

static unsigned pseudo_bit(const uint8_t *name, size_t len) {
    if (is_name(name, len, ":method")) return SEEN_METHOD;
    if (is_name(name, len, ":scheme")) return SEEN_SCHEME;
    if (is_name(name, len, ":path")) return SEEN_PATH;
    if (is_name(name, len, ":authority")) return SEEN_AUTHORITY;
    if (is_name(name, len, ":status")) return SEEN_STATUS;
    return 0;
}

static int judged_by_h2(const uint8_t *name, size_t len, const uint8_t *value, size_t vlen) {
    if (is_name(name, len, "host") || is_name(name, len, "cookie")) return 1;
    /* TE: trailers is the one TE that crosses (§8.2.2); gRPC sends it on every call. */
    if (is_name(name, len, "te")) return !is_name(value, vlen, PF_H2_TE_ALLOWED);
    return pf_h2_connection_specific((const char *)name, len);
}

static void check_field(pp_h2 *h, const uint8_t *name, size_t nlen, const uint8_t *value,
                        size_t vlen) {
    if (h->not_plain) return;
    if (nlen && name[0] == ':') {
        unsigned bit = pseudo_bit(name, nlen);
        if (!bit || (h->seen & (bit | SEEN_REGULAR)) || (bit == SEEN_PATH && !vlen) ||
            !plain_value(value, vlen))
            h->not_plain = 1;
        h->seen |= bit;
        return;
    }
    h->seen |= SEEN_REGULAR;
    if (!nlen || judged_by_h2(name, nlen, value, vlen) || !plain_value(value, vlen)) {
        h->not_plain = 1;
        return;
    }
    for (size_t i = 0; i < nlen; i++)
        if (!is_token_lower(name[i])) {
            h->not_plain = 1;
            return;
        }
}

/* Is the block just received plain: the pseudo-headers its kind needs, and no others? */
static int block_plain(pp_h2 *h, int server, nghttp2_headers_category cat) {
    unsigned pseudo = h->seen & ~(unsigned)SEEN_REGULAR;
    if (h->not_plain) return 0;
    if (server && cat == NGHTTP2_HCAT_REQUEST)
        /* h2 wants :authority or Host (§8.3.1); Host is never plain, so :authority it is. */
        return pseudo == (SEEN_METHOD | SEEN_SCHEME | SEEN_PATH | SEEN_AUTHORITY);
    if (!server && (pseudo & SEEN_STATUS)) return pseudo == SEEN_STATUS; /* a response */
    return pseudo == 0;                                                  /* trailers */
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) {
    pp_h2 *h = user_data;
    h->headers.len = 0;
    h->joined.len = 0;
    h->seen = 0;
    h->not_plain = 0;
    return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data) {
    pp_h2 *h = user_data;
    pp_buf *b = &h->headers;
    check_field(h, name, namelen, value, valuelen);
    uint32_t lens[2] = {(uint32_t)namelen, (uint32_t)valuelen};
    if (buf_reserve(b, 8 + namelen + valuelen)) return NGHTTP2_ERR_CALLBACK_FAILURE;
    buf_add(b, lens, 8);
    buf_add(b, name, namelen);
    buf_add(b, value, valuelen);
    if (!h->not_plain) { /* plain so far: no NUL in it (visible ASCII, token names) */
        pp_buf *j = &h->joined;
        if (buf_reserve(j, 2 + namelen + valuelen)) return NGHTTP2_ERR_CALLBACK_FAILURE;
        if (j->len) j->data[j->len++] = 0;
        buf_add(j, name, namelen);
        j->data[j->len++] = 0;
        buf_add(j, value, valuelen);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *user_data) {
    pp_h2 *h = user_data;
    h->frame_had_data = 1;
    if (h->data_rec != SIZE_MAX) {
        /* Chunks of one frame make one record, as h2 reports one DataReceived per frame; it
         * stays the last record (a stream closed while sending may add one after it). */
        pp_h2_rec rec;
        memcpy(&rec, h->events.data + h->data_rec, sizeof rec);
        if (h->data_rec + sizeof rec + rec.len == h->events.len) {
            if (buf_add(&h->events, data, len)) return NGHTTP2_ERR_CALLBACK_FAILURE;
            rec.len += (uint32_t)len;
            memcpy(h->events.data + h->data_rec, &rec, sizeof rec);
            return 0;
        }
    }
    h->data_rec = h->events.len;
    return add_record(h, PP_H2_DATA, sid, 0, 0, data, len);
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) {
    pp_h2 *h = user_data;
    int32_t sid = frame->hd.stream_id;
    int end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (frame->hd.type) {
    case NGHTTP2_DATA:
        if (!h->frame_had_data) { /* an empty frame is still an event, as in h2 */
            int rv = add_record(h, PP_H2_DATA, sid, 0, 0, NULL, 0);
            if (rv) return rv;
        }
        h->data_rec = SIZE_MAX;
        return end ? add_record(h, PP_H2_END, sid, 0, 0, NULL, 0) : 0;
    case NGHTTP2_HEADERS:
        if (block_plain(h, nghttp2_session_check_server_session(session), frame->headers.cat)) {
            if (end && h->taker.take != NULL && frame->headers.cat == NGHTTP2_HCAT_REQUEST &&
                h->taker.take(h->taker.opaque, sid, h->joined.data, h->joined.len))
                return 0;
            return add_record(h, PP_H2_HEADERS, sid, frame->headers.cat, end | PP_H2_PLAIN,
                              h->joined.data, h->joined.len);
        }
        return add_record(h, PP_H2_HEADERS, sid, frame->headers.cat, end, h->headers.data,
                          h->headers.len);
    case NGHTTP2_RST_STREAM:
        /* A stream below the highest opened that was never opened is closed (§5.1.1): its
         * RST_STREAM resets nothing, and h2 reports none. */
        if (nghttp2_session_find_stream(session, sid) == NULL) return 0;
        return add_record(h, PP_H2_RST, sid, frame->rst_stream.error_code, 0, NULL, 0);
    case NGHTTP2_WINDOW_UPDATE:
        return add_record(h, PP_H2_WINDOW, sid, (uint32_t)frame->window_update.window_size_increment,
                          0, NULL, 0);
    case NGHTTP2_SETTINGS:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK) return 0;
        return add_record(h, PP_H2_SETTINGS, 0, 0, 0, NULL, 0);
    }
    return 0;
}

static int on_begin_frame(nghttp2_session *session, const nghttp2_frame_hd *hd, void *user_data) {
    ((pp_h2 *)user_data)->data_rec = SIZE_MAX;
    ((pp_h2 *)user_data)->frame_had_data = 0;
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t sid, uint32_t error_code,
                           void *user_data) {
    pp_h2 *h = user_data;
    pp_out *q = nghttp2_session_get_stream_user_data(session, sid);
    if (q != NULL) out_free(h, q);
    if (h->taker.closed != NULL) h->taker.closed(h->taker.opaque, sid);
    return error_code ? add_record(h, PP_H2_CLOSED, sid, error_code, 0, NULL, 0) : 0;
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) {
    pp_h2 *h = user_data;
    if (frame->hd.type == NGHTTP2_GOAWAY && !h->app_goaway && h->failed < 0)
        h->failed = frame->goaway.error_code;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        pp_out *q = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        if (q != NULL && !q->submitted && (q->eof || q->off < q->data.len) && out_kick(h, q) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) &&
        (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        pp_out *q = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        if (q != NULL && q->reset_after)
            return nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, q->stream_id,
                                             q->reset_after - 1) == 0 ? 0 : NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

/* ---- the session ------------------------------------------------------------------------- */

pp_h2 *pp_h2_new(int server, uint32_t reset_burst) {
    pp_h2 *h = calloc(1, sizeof *h);
    if (h == NULL) return NULL;
    h->failed = -1;
    h->data_rec = SIZE_MAX;
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cb) != 0) goto fail;
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cb);
        goto fail;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    /* Windows open only when the other side of the proxy took the data (backpressure). */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* Field and message rules are checked above this codec with h2's own rules and answers
     * (a malformed request's answer and counter are the proxy's, whichever codec runs). */
    nghttp2_option_set_no_http_messaging(opt, 1);
    /* The proxy's own limits decide (rapid reset, header block bytes); nghttp2's stay above. */
    nghttp2_option_set_stream_reset_rate_limit(opt, reset_burst, reset_burst);
    nghttp2_option_set_max_continuations(opt, 1u << 20);
    int rv = server ? nghttp2_session_server_new2(&h->session, cb, h, opt)
                    : nghttp2_session_client_new2(&h->session, cb, h, opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    if (rv != 0) goto fail;
    live_sessions++;
    return h;
fail:
    free(h);
    return NULL;
}

void pp_h2_del(pp_h2 *h) {
    if (h == NULL) return;
    if (h->taker.release != NULL) h->taker.release(h->taker.opaque);
    /* nghttp2_session_del runs no stream-close callbacks: free the queues here. */
    while (h->outs) out_free(h, h->outs);
    nghttp2_session_del(h->session);
    free(h->events.data);
    free(h->headers.data);
    free(h->joined.data);
    free(h->out.data);
    free(h);
    live_sessions--;
}

static ssize_t drain(pp_h2 *h) {
    for (;;) {
        const uint8_t *p;
        ssize_t n = nghttp2_session_mem_send(h->session, &p);
        if (n < 0) return n;
        if (n == 0) return 0;
        if (buf_add(&h->out, p, (size_t)n)) return NGHTTP2_ERR_NOMEM;
    }
}

ssize_t pp_h2_recv(pp_h2 *h, const uint8_t *data, size_t len, const uint8_t **events,
                   size_t *events_len, size_t *pending) {
    /* Records made while sending (streams closed then) wait for this read, so none is lost. */
    if (h->handed) {
        memmove(h->events.data, h->events.data + h->handed, h->events.len - h->handed);
        h->events.len -= h->handed;
        if (h->data_rec != SIZE_MAX) h->data_rec -= h->handed;
    }
    ssize_t n = nghttp2_session_mem_recv(h->session, data, len);
    if (n >= 0) {
        /* Connection errors found while reading are only visible as the GOAWAY nghttp2 queues. */
        ssize_t rv = drain(h);
        if (rv < 0) n = rv;
    }
    /* A DATA frame the read ended in is held back until it is whole (one event per frame). */
    size_t whole = n >= 0 && h->data_rec != SIZE_MAX ? h->data_rec : h->events.len;
    if (h->taker.filter != NULL && n >= 0 && h->failed < 0 && whole) {
        /* The taker removes the records of the streams it takes; what is held back moves down. */
        size_t kept = h->taker.filter(h->taker.opaque, h->events.data, whole);
        if (kept < whole) {
            memmove(h->events.data + kept, h->events.data + whole, h->events.len - whole);
            h->events.len -= whole - kept;
            if (h->data_rec != SIZE_MAX) h->data_rec -= whole - kept;
            whole = kept;
        }
    }
    *events = h->events.data;
    *events_len = h->handed = whole;
    *pending = h->out.len;
    return n;
}

void pp_h2_set_taker(pp_h2 *h, const pp_h2_taker *taker) { h->taker = *taker; }

int64_t pp_h2_scan(const char *data, size_t len, uint32_t limit, uint32_t left, uint32_t block) {
    const uint8_t *p = (const uint8_t *)data;
    size_t pos = 0;
    while (pos < len) {
        if (left) {
            size_t step = left < len - pos ? left : len - pos;
            pos += step;
            left -= (uint32_t)step;
            continue;
        }
        if (len - pos < 9)
            return -1; /* a frame header split across reads: carried by FrameScanner */
        uint32_t length = (uint32_t)p[pos] << 16 | (uint32_t)p[pos + 1] << 8 | p[pos + 2];
        uint8_t kind = p[pos + 3];
        if (kind == NGHTTP2_GOAWAY)
            return -1;
        if (kind == NGHTTP2_HEADERS || kind == NGHTTP2_PUSH_PROMISE || kind == NGHTTP2_CONTINUATION) {
            uint64_t size = (kind == NGHTTP2_CONTINUATION ? (uint64_t)block : 0) + length + 9;
            if (size > limit)
                return -1;
            block = p[pos + 4] & NGHTTP2_FLAG_END_HEADERS ? 0 : (uint32_t)size;
        }
        pos += 9;
        left = length;
    }
    return (int64_t)left + ((int64_t)block << 24);
}

int64_t pp_h2_failed(pp_h2 *h) { return h->failed; }

int64_t pp_h2_new_stream_window(pp_h2 *h) {
    int64_t stream = nghttp2_session_get_remote_settings(h->session, NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE);
    int64_t conn = nghttp2_session_get_remote_window_size(h->session) - (int64_t)h->queued;
    return stream < conn ? stream : conn;
}

ssize_t pp_h2_send(pp_h2 *h, const uint8_t **out) {
    ssize_t rv = drain(h);
    *out = h->out.data;
    size_t n = h->out.len;
    h->out.len = 0;
    return rv < 0 ? rv : (ssize_t)n;
}

int pp_h2_settings(pp_h2 *h, const uint32_t *ids_values, size_t n) {
    nghttp2_settings_entry iv[8];
    if (n > 8) return NGHTTP2_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; i < n; i++) {
        iv[i].settings_id = (int32_t)ids_values[2 * i];
        iv[i].value = ids_values[2 * i + 1];
    }
    return nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, n);
}

int pp_h2_set_connection_window(pp_h2 *h, int32_t size) {
    return nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, size);
}

int32_t pp_h2_submit_headers(pp_h2 *h, int32_t sid, const uint8_t *packed, size_t len,
                             int flags) {
    size_t count;
    int end_stream = flags & PP_H2_END_STREAM;
    nghttp2_nv *nva = unpack_nv(packed, len, flags, &count);
    if (nva == NULL) return NGHTTP2_ERR_INVALID_ARGUMENT;
    /* A client stream gets its send queue now: DATA may be queued before its HEADERS leave. */
    pp_out *q = NULL;
    if (sid == -1 && !end_stream && (q = out_link(h, 0)) == NULL) {
        free(nva);
        return NGHTTP2_ERR_NOMEM;
    }
    int32_t rv = nghttp2_submit_headers(h->session, end_stream ? NGHTTP2_FLAG_END_STREAM : 0, sid,
                                        NULL, nva, count, q);
    free(nva);
    if (q != NULL) {
        if (rv < 0) out_free(h, q);
        else q->stream_id = rv;
    }
    return rv;
}

int pp_h2_queue_data(pp_h2 *h, int32_t sid, const uint8_t *data, size_t len, int end_stream) {
    pp_out *q = out_get(h, sid, 1);
    if (q == NULL) return NGHTTP2_ERR_STREAM_CLOSED;
    if (q->eof) return NGHTTP2_ERR_STREAM_SHUT_WR;
    if (len) {
        if (q->off && q->off * 2 >= q->data.len) {
            memmove(q->data.data, q->data.data + q->off, q->data.len - q->off);
            q->data.len -= q->off;
            q->off = 0;
        }
        if (buf_add(&q->data, data, len)) return NGHTTP2_ERR_NOMEM;
        h->queued += len;
    }
    q->eof = end_stream;
    return out_kick(h, q);
}

int pp_h2_queue_trailers(pp_h2 *h, int32_t sid, const uint8_t *packed, size_t len, int flags) {
    pp_out *q = out_get(h, sid, 0);
    /* No DATA to wait for; a client stream whose HEADERS have not left yet keeps its trailers
     * queued: on_frame_send of those HEADERS sends them. */
    if (q == NULL || (!q->submitted && q->off == q->data.len &&
                      nghttp2_session_find_stream(h->session, sid) != NULL))
        return pp_h2_submit_headers(h, sid, packed, len, (flags & PP_H2_PLAIN) | PP_H2_END_STREAM);
    if (q == NULL) return NGHTTP2_ERR_STREAM_CLOSED;
    if (q->eof) return NGHTTP2_ERR_STREAM_SHUT_WR;
    q->trailers.len = 0;
    if (buf_add(&q->trailers, packed, len)) return NGHTTP2_ERR_NOMEM;
    q->has_trailers = 1;
    q->trailers_flags = flags & PP_H2_PLAIN;
    q->eof = 1;
    return out_kick(h, q);
}

int pp_h2_reset(pp_h2 *h, int32_t sid, uint32_t error_code) {
    /* NO_ERROR after a complete response (RFC 9113 §8.1) must follow its END_STREAM, which
     * nghttp2 would drop once the stream is reset: it waits for it. Other codes cut at once. */
    if (error_code == 0 && nghttp2_session_get_stream_local_close(h->session, sid) == 0) {
        pp_out *q = out_get(h, sid, 1);
        if (q != NULL) {
            q->reset_after = 1;
            return 0;
        }
    }
    return nghttp2_submit_rst_stream(h->session, NGHTTP2_FLAG_NONE, sid, error_code);
}

int pp_h2_consume(pp_h2 *h, int32_t sid, size_t n) {
    int rv = nghttp2_session_consume(h->session, sid, n);
    return rv < 0 ? rv : nghttp2_session_want_write(h->session) != 0;
}

int pp_h2_goaway(pp_h2 *h, uint32_t error_code, const uint8_t *opaque, size_t len) {
    h->app_goaway = 1;
    return nghttp2_submit_goaway(h->session, NGHTTP2_FLAG_NONE,
                                 nghttp2_session_get_last_proc_stream_id(h->session), error_code,
                                 opaque, len);
}

int64_t pp_h2_window(pp_h2 *h, int32_t sid) {
    int64_t stream = nghttp2_session_get_stream_remote_window_size(h->session, sid);
    int64_t conn = nghttp2_session_get_remote_window_size(h->session);
    pp_out *q = out_get(h, sid, 0);
    if (stream < 0 && q != NULL) /* not open yet: the peer's initial window */
        stream = nghttp2_session_get_remote_settings(h->session, NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE);
    if (stream < 0) return -1;
    if (q != NULL) stream -= (int64_t)(q->data.len - q->off);
    conn -= (int64_t)h->queued;
    return stream < conn ? stream : conn;
}

uint32_t pp_h2_remote_setting(pp_h2 *h, int id) {
    return nghttp2_session_get_remote_settings(h->session, (nghttp2_settings_id)id);
}

int32_t pp_h2_next_stream_id(pp_h2 *h) { return (int32_t)nghttp2_session_get_next_stream_id(h->session); }

int32_t pp_h2_last_proc_stream_id(pp_h2 *h) { return nghttp2_session_get_last_proc_stream_id(h->session); }
