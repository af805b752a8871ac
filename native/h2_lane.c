/* The native HTTP/2 lane; see h2_lane.h for the contract. */
#include "h2_lane.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include "grow_buf.h"
#include "h2_taker.h"
#include "lane_fields.h"
#include "http1_scan.h" /* the HTTP/1 lane's head scan, for the responses */

/* A slot's connection: none; at rest; a request to send; its answer awaited; the answer's head
 * sent, its body coming; the stream reset by the client (Python closes the connection); waiting
 * for Python to carry the request on. */
enum { SLOT_EMPTY, SLOT_IDLE, SLOT_QUEUED, SLOT_WAITING, SLOT_BODY, SLOT_ABANDONED, SLOT_HANDED };

#define READ_SIZE 65536
/* The largest body the lane streams to a client: what the default stream window (65,535) lets
 * go at once, so what waits in C per stream stays bounded; a larger one is the general path's,
 * which stops reading the upstream while the client's window is shut. */
#define MAX_BODY 65536
#define INTERNAL_ERROR 0x2

typedef struct {
    int fd;
    int state;
    int32_t sid;
    int64_t started_ns, idle_since_ns;
    pp_buf request;  /* the HTTP/1.1 request, as it goes upstream */
    pp_buf block;    /* the stream's header block as received, for a handover */
    pp_buf handed;   /* what a handover carries (bytes read, or the request's unsent rest) */
    size_t sent;
    int kind, err;
    int head; /* the request is a HEAD: its answer has no body whatever it says */
    int status;        /* the answer's, once its head is sent */
    Py_ssize_t left;   /* body bytes still to come */
} lane_slot;

struct pp_lane {
    pp_lane_state state;
    pp_h2 *h;
    int64_t *block;
    int32_t slot[PP_LANE_N_SLOTS];
    int timed;
    uint32_t max_streams, max_headers, max_header_bytes;
    lane_slot *slots;
    int nslots;
    int queued;  /* slots taken by the current read, to send */
    int dropped; /* slots whose stream the client reset during the current read */
};

/* One event loop per process: every lane can share the read buffer and the response block. */
static uint8_t in_buf[READ_SIZE];
static pp_buf response_block;
static long live_lanes;
static unsigned char path_ok[256], authority_ok[256];

long pp_lane_live(void) { return live_lanes; }

pp_lane_state *pp_lane_state_of(pp_lane *l) { return &l->state; }

#define SLOT(l, s) ((l)->block[(l)->slot[s]])

static int64_t claimed(pp_lane *l)
{
    int64_t sum = 0;
    for (int32_t i = l->slot[PP_LANE_CLAIM_START]; i < l->slot[PP_LANE_CLAIM_END]; i++) sum += l->block[i];
    return sum;
}

static int buf_set(pp_buf *b, const void *p, size_t n)
{
    b->len = 0;
    return buf_add(b, p, n);
}

/* ---- taking a request (inside the session's read) ----------------------------------------- */

/* Whether the general path would send this request on as it is (request_from_h2 and the
 * listener's limits accept it, and it is one the lane carries: a GET or HEAD without a body);
 * its :method, :path and :authority when so. The block is plain (h2_codec.c): each pseudo-header once,
 * first, no Host, Cookie or connection-specific field. */
static int carried(pp_lane *l, const uint8_t *block, size_t len, nv_span *method, nv_span *path,
                   nv_span *authority)
{
    nv_span f;
    size_t pos = 0, count = 0, size = 0;
    int plain_method = 0, scheme = 0;
    path->name = authority->name = NULL;
    while (next_field(block, len, &pos, &f)) {
        count++;
        size += f.name_len + f.value_len + 4; /* header_list_size's measure */
        if (is(&f, ":method")) {
            *method = f;
            plain_method = value_is(&f, "GET") || value_is(&f, PF_NO_BODY_METHOD);
        }
        else if (is(&f, ":scheme")) scheme = value_is(&f, "http") || value_is(&f, "https");
        else if (is(&f, ":path")) *path = f;
        else if (is(&f, ":authority")) *authority = f;
        else if (is(&f, "content-length")) return 0; /* the general path judges it */
    }
    return plain_method && scheme && path->name != NULL && authority->name != NULL && path->value_len &&
           path->value[0] == '/' && chars_ok(path_ok, path->value, path->value_len) &&
           chars_ok(authority_ok, authority->value, authority->value_len) && count <= l->max_headers &&
           size <= l->max_header_bytes;
}

/* The request as the general path writes it (request_from_h2, upstream_head): the request
 * line, Host from :authority, then the regular fields in order less the hop-by-hop ones. */
static int http1_request(pp_buf *out, const uint8_t *block, size_t len, const nv_span *method,
                         const nv_span *path, const nv_span *authority)
{
    nv_span f;
    size_t pos = 0;
    out->len = 0;
    int bad = buf_add(out, method->value, method->value_len) | buf_add(out, " ", 1) |
              buf_add(out, path->value, path->value_len) |
              buf_add(out, " HTTP/1.1\r\nhost: ", 17) | buf_add(out, authority->value, authority->value_len) |
              buf_add(out, "\r\n", 2);
    while (next_field(block, len, &pos, &f)) {
        if (f.name_len && f.name[0] == ':') continue;
        if (pf_hop_by_hop((const char *)f.name, f.name_len)) continue;
        bad |= buf_add(out, f.name, f.name_len) | buf_add(out, ": ", 2) | buf_add(out, f.value, f.value_len) |
               buf_add(out, "\r\n", 2);
    }
    return bad | buf_add(out, "\r\n", 2);
}

static int lane_take(void *opaque, int32_t sid, const uint8_t *block, size_t len)
{
    pp_lane *l = opaque;
    nv_span method, path, authority;
    if (l->state.closed || (uint32_t)(l->state.in_flight + l->state.others) >= l->max_streams ||
        !carried(l, block, len, &method, &path, &authority))
        return 0;
    lane_slot *s = NULL;
    for (int i = l->nslots - 1; i >= 0; i--) /* the newest lent: the warmest */
        if (l->slots[i].state == SLOT_IDLE) { s = &l->slots[i]; break; }
    if (s == NULL) {
        l->state.starved++;
        return 0;
    }
    if (http1_request(&s->request, block, len, &method, &path, &authority) || buf_set(&s->block, block, len))
        return 0; /* out of memory: Python's */
    s->state = SLOT_QUEUED;
    s->sid = sid;
    s->head = pf_no_body_method((const char *)method.value, method.value_len);
    s->sent = 0;
    s->started_ns = now_ns();
    l->state.in_flight++;
    if (sid > l->state.last_sid) l->state.last_sid = sid;
    l->queued++;
    SLOT(l, PP_LANE_REQUESTS) += 1;
    return 1;
}

static void lane_closed(void *opaque, int32_t sid)
{
    pp_lane *l = opaque;
    for (int i = 0; i < l->nslots; i++) {
        lane_slot *s = &l->slots[i];
        if (s->sid != sid || (s->state != SLOT_QUEUED && s->state != SLOT_WAITING && s->state != SLOT_BODY))
            continue;
        /* Reset by the client before its answer ended: a request not sent yet never goes; the
         * connection of one sent is closed, and it ends as the general path's does (DR). */
        l->state.in_flight--;
        if (s->state == SLOT_QUEUED) {
            s->state = SLOT_IDLE;
            s->sid = 0;
            s->idle_since_ns = now_ns();
            l->queued--;
            return;
        }
        SLOT(l, PP_LANE_FLAG_DR) += 1;
        pf_account_response(l->block, s->state == SLOT_BODY ? s->status : 0, now_ns() - s->started_ns);
        s->state = SLOT_ABANDONED;
        l->dropped++;
        return;
    }
}

static void lane_free(void *opaque)
{
    pp_lane *l = opaque;
    for (int i = 0; i < l->nslots; i++) {
        free(l->slots[i].request.data);
        free(l->slots[i].block.data);
        free(l->slots[i].handed.data);
    }
    free(l->slots);
    free(l);
    live_lanes--;
}

pp_lane *pp_lane_attach(pp_h2 *h, int64_t *block, const int32_t *slots, int timed, const uint32_t *limits)
{
    if (!path_ok['/']) {
        for (const char *c = PF_PATH_CHARS; *c; c++) path_ok[(unsigned char)*c] = 1;
        for (const char *c = PF_AUTHORITY_CHARS; *c; c++) authority_ok[(unsigned char)*c] = 1;
        init_tables();
    }
    pp_lane *l = calloc(1, sizeof *l);
    if (l == NULL) return NULL;
    l->h = h;
    l->block = block;
    memcpy(l->slot, slots, sizeof l->slot);
    l->timed = timed;
    l->max_streams = limits[0];
    l->max_headers = limits[1];
    l->max_header_bytes = limits[2];
    pp_h2_taker taker = {lane_take, lane_closed, lane_free, l, NULL};
    pp_h2_set_taker(h, &taker);
    live_lanes++;
    return l;
}

int pp_lane_add_upstream(pp_lane *l, int fd)
{
    int idx = -1;
    for (int i = 0; i < l->nslots; i++)
        if (l->slots[i].state == SLOT_EMPTY) { idx = i; break; }
    if (idx < 0) {
        lane_slot *grown = realloc(l->slots, (size_t)(l->nslots + 1) * sizeof *grown);
        if (grown == NULL) return -1;
        l->slots = grown;
        idx = l->nslots++;
        memset(&l->slots[idx], 0, sizeof l->slots[idx]);
    }
    lane_slot *s = &l->slots[idx];
    s->fd = fd;
    s->state = SLOT_IDLE;
    s->sid = 0;
    s->idle_since_ns = now_ns();
    return idx;
}

/* ---- handing over ------------------------------------------------------------------------ */

static int hand_over(pp_lane *l, lane_slot *s, int kind, int err, const void *data, size_t n)
{
    s->kind = kind;
    s->err = err;
    if (buf_set(&s->handed, data, n)) s->handed.len = 0; /* no memory: Python sees an EOF */
    s->state = SLOT_HANDED;
    return PP_LANE_HANDOVER;
}

int pp_lane_next_handover(pp_lane *l)
{
    for (int i = 0; i < l->nslots; i++) {
        lane_slot *s = &l->slots[i];
        if (s->state == SLOT_ABANDONED) s->kind = PP_LANE_ABANDONED;
        if (s->state == SLOT_HANDED || s->state == SLOT_ABANDONED) return i;
    }
    return -1;
}

void pp_lane_handover_of(pp_lane *l, int idx, pp_lane_handover *out)
{
    lane_slot *s = &l->slots[idx];
    out->stream_id = s->sid;
    out->kind = s->kind;
    out->err = s->err;
    out->started_ns = s->started_ns;
    out->block = s->block.data;
    out->block_len = s->block.len;
    out->data = s->handed.data;
    out->data_len = s->handed.len;
}

int pp_lane_release(pp_lane *l, int idx)
{
    lane_slot *s = &l->slots[idx];
    int idle = s->state == SLOT_IDLE;
    if (s->state == SLOT_QUEUED || s->state == SLOT_WAITING || s->state == SLOT_BODY ||
        (s->state == SLOT_HANDED && s->kind != PP_LANE_ABANDONED))
        l->state.in_flight--;
    s->state = SLOT_EMPTY;
    s->sid = 0;
    return idle;
}

/* ---- upstream I/O ---------------------------------------------------------------------- */

int pp_lane_send(pp_lane *l)
{
    int handed = l->dropped;
    l->dropped = 0;
    if (!l->queued) return handed;
    l->queued = 0;
    for (int i = 0; i < l->nslots; i++) {
        lane_slot *s = &l->slots[i];
        if (s->state != SLOT_QUEUED) continue;
        int64_t t0 = l->timed ? now_ns() : 0;
        ssize_t sent = send(s->fd, s->request.data, s->request.len, MSG_NOSIGNAL);
        int err = errno;
        if (l->timed) {
            SLOT(l, PP_LANE_UP_WRITE_NS) += now_ns() - t0;
            SLOT(l, PP_LANE_UP_WRITE_EV) += 1;
        }
        if (sent < 0 && err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
            handed += hand_over(l, s, PP_LANE_UP_FAILED, err, NULL, 0) == PP_LANE_HANDOVER;
            continue;
        }
        if (sent < 0) sent = 0;
        SLOT(l, PP_LANE_UP_TX) += sent;
        if ((size_t)sent < s->request.len) {
            handed += hand_over(l, s, PP_LANE_REQUEST_UNSENT, 0, s->request.data + sent,
                                s->request.len - (size_t)sent) == PP_LANE_HANDOVER;
            continue;
        }
        s->state = SLOT_WAITING;
    }
    return handed;
}

/* The response's header block for the downstream (h2_relayed_response_headers): :status, then
 * the fields less Host and the connection-specific ones, and less every hop-by-hop one when
 * the head has a Connection field; names in lower case. -1: out of memory. */
static int h2_response(const head_t *h)
{
    pp_buf *b = &response_block;
    char status[4] = {(char)('0' + h->status / 100), (char)('0' + h->status / 10 % 10),
                      (char)('0' + h->status % 10), 0};
    b->len = 0;
    int bad = buf_add(b, ":status", 8) | buf_add(b, status, 3);
    int connection = 0;
    for (Py_ssize_t i = 0; i < h->nfields; i++)
        if (name_is((const char *)in_buf + h->fields[i].name, h->fields[i].name_len, "connection"))
            connection = 1;
    for (Py_ssize_t i = 0; i < h->nfields; i++) {
        const field_t *f = &h->fields[i];
        const char *name = (const char *)in_buf + f->name;
        if (name_is(name, f->name_len, "host") || pf_h2_connection_specific(name, (size_t)f->name_len) ||
            (connection && pf_hop_by_hop(name, (size_t)f->name_len)))
            continue;
        size_t at = b->len + 1;
        bad |= buf_add(b, "", 1) | buf_add(b, name, (size_t)f->name_len) | buf_add(b, "", 1) |
               buf_add(b, in_buf + f->value, (size_t)f->value_len);
        if (!bad) lower_copy((char *)b->data + at, name, f->name_len);
    }
    return bad ? -1 : 0;
}

/* A plain response head read whole, its body (*body bytes) in this read or, up to MAX_BODY, to
 * follow: what the lane answers the stream with itself. */
static int plain_response(pp_lane *l, const lane_slot *s, Py_ssize_t n, head_t *h, Py_ssize_t *body)
{
    int64_t t0 = l->timed ? now_ns() : 0;
    int ok = scan_head((const char *)in_buf, n, 0, l->max_header_bytes, l->max_headers, h) && h->v11 &&
             !h->close && !h->named && h->status >= PF_FIRST_FINAL_STATUS;
    if (ok) {
        *body = pf_status_has_body(h->status) && !s->head ? h->content_length : 0;
        ok = *body >= 0 && h->head_len + *body >= n && (h->head_len + *body == n || *body <= MAX_BODY);
        for (Py_ssize_t i = 0; ok && i < h->nfields; i++) /* a gRPC-shaped answer: the general path's */
            if (name_is((const char *)in_buf + h->fields[i].name, h->fields[i].name_len, "grpc-status")) ok = 0;
    }
    if (l->timed) {
        SLOT(l, PP_LANE_PARSE_NS) += now_ns() - t0;
        SLOT(l, PP_LANE_PARSE_EV) += 1;
    }
    return ok;
}

/* The exchange is over: accounted as the general path's, the connection at rest again. */
static void answered(pp_lane *l, lane_slot *s, int64_t now)
{
    SLOT(l, PP_LANE_EXPRESS) += 1;
    SLOT(l, PP_LANE_NATIVE) += 1;
    pf_account_response(l->block, s->status, now - s->started_ns);
    l->state.in_flight--;
    l->state.served++;
    s->state = SLOT_IDLE;
    s->sid = 0;
    s->idle_since_ns = now;
}

/* Submit the answer's head and the body read with it (n bytes in in_buf). -1: out of memory. */
static int respond(pp_lane *l, lane_slot *s, const head_t *h, Py_ssize_t body, Py_ssize_t n)
{
    int64_t t0 = l->timed ? now_ns() : 0;
    if (h2_response(h) < 0) return -1;
    Py_ssize_t here = n - h->head_len;
    int rv = pp_h2_submit_headers(l->h, s->sid, response_block.data, response_block.len,
                                  PP_H2_PLAIN | (body ? 0 : PP_H2_END_STREAM));
    if (rv >= 0 && here) pp_h2_queue_data(l->h, s->sid, in_buf + h->head_len, (size_t)here, here == body);
    int64_t done = now_ns();
    if (l->timed) {
        SLOT(l, PP_LANE_PARSE_NS) += done - t0;
        SLOT(l, PP_LANE_PARSE_EV) += 1;
    }
    s->status = h->status;
    s->left = body - here;
    if (s->left) s->state = SLOT_BODY;
    else answered(l, s, done);
    return 0;
}

/* The upstream broke (or went past the route timeout, flag) with the answer's head sent: the
 * stream is reset and the exchange ends as the general path ends it. */
static void cut(pp_lane *l, lane_slot *s, int flag)
{
    pp_h2_reset(l->h, s->sid, INTERNAL_ERROR);
    SLOT(l, flag) += 1;
    pf_account_response(l->block, s->status, now_ns() - s->started_ns);
    l->state.in_flight--;
    s->state = SLOT_HANDED;
    s->kind = PP_LANE_ABANDONED;
}

/* More of a body on its way (n bytes in in_buf). */
static int body_read(pp_lane *l, lane_slot *s, Py_ssize_t n)
{
    Py_ssize_t take = n < s->left ? n : s->left;
    int64_t t0 = l->timed ? now_ns() : 0;
    pp_h2_queue_data(l->h, s->sid, in_buf, (size_t)take, take == s->left);
    int64_t done = now_ns();
    if (l->timed) {
        SLOT(l, PP_LANE_PARSE_NS) += done - t0;
        SLOT(l, PP_LANE_PARSE_EV) += 1;
    }
    s->left -= take;
    if (s->left) return PP_LANE_FLUSH;
    answered(l, s, done);
    return take == n ? PP_LANE_FLUSH : PP_LANE_DROP; /* bytes past the answer: not reusable */
}

int pp_lane_upstream_readable(pp_lane *l, int idx)
{
    lane_slot *s = &l->slots[idx];
    int state = s->state;
    if (state != SLOT_WAITING && state != SLOT_BODY)
        return state == SLOT_IDLE ? PP_LANE_IDLE_READABLE
               : state == SLOT_ABANDONED ? PP_LANE_DROP
               : PP_LANE_QUIET; /* handed over: Python takes it back at once */
    int64_t t0 = l->timed ? now_ns() : 0;
    ssize_t n = recv(s->fd, in_buf, READ_SIZE, 0);
    int err = errno;
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)) return PP_LANE_QUIET;
    if (n <= 0 && state == SLOT_BODY) {
        cut(l, s, PP_LANE_FLAG_UR);
        return PP_LANE_DROP;
    }
    if (n < 0) return hand_over(l, s, PP_LANE_UP_FAILED, err, NULL, 0);
    int64_t t1 = 0;
    if (l->timed) {
        t1 = now_ns();
        SLOT(l, PP_LANE_UP_READ_NS) += t1 - t0;
        SLOT(l, PP_LANE_UP_READ_EV) += 1;
        SLOT(l, PP_LANE_NOTIFY_EV) += 1;
    }
    SLOT(l, PP_LANE_UP_RX) += n;
    int64_t before = l->timed ? claimed(l) : 0;
    head_t h;
    Py_ssize_t body = 0;
    int answer;
    if (state == SLOT_BODY) answer = body_read(l, s, n);
    else if (n == 0 || !plain_response(l, s, n, &h, &body) || respond(l, s, &h, body, n) < 0)
        answer = hand_over(l, s, PP_LANE_UP_DATA, 0, in_buf, (size_t)n);
    else answer = PP_LANE_FLUSH;
    if (l->timed) SLOT(l, PP_LANE_OTHER_NS) += now_ns() - t1 - (claimed(l) - before);
    return answer;
}

int pp_lane_expired(pp_lane *l, int64_t now, int64_t timeout_ns, int64_t idle_ns, int64_t *next_due,
                    int *handed)
{
    *handed = 0;
    int64_t next = 0;
    for (int i = 0; i < l->nslots; i++) {
        lane_slot *s = &l->slots[i];
        int64_t due;
        if (s->state == SLOT_IDLE) due = s->idle_since_ns + idle_ns;
        else if ((s->state == SLOT_WAITING || s->state == SLOT_BODY) && timeout_ns)
            due = s->started_ns + timeout_ns;
        else continue;
        if (due <= now) {
            if (s->state == SLOT_WAITING) *handed = hand_over(l, s, PP_LANE_OVERDUE, 0, NULL, 0) == PP_LANE_HANDOVER;
            else if (s->state == SLOT_BODY) cut(l, s, PP_LANE_FLAG_UT); /* a stalled stream: reset */
            return i;
        }
        if (next == 0 || due < next) next = due;
    }
    *next_due = next;
    return -1;
}
