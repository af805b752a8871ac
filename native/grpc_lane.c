/* The native gRPC lane; see grpc_lane.h for the contract. */
#include "grpc_lane.h"

#include <string.h>
#include <strings.h>
#include <time.h>
#include "grow_buf.h"
#include "h2_taker.h"
#include "lane_fields.h"
#include "protocol_facts.h"

enum { SLOT_EMPTY, SLOT_WAITING, SLOT_HANDED };
enum { REC_HEADERS = 1, REC_DATA = 2, REC_END = 3, REC_WINDOW = 5 }; /* h2_codec.h's kinds */
enum { HCAT_REQUEST = 0, HCAT_RESPONSE = 1, HCAT_HEADERS = 3 };   /* nghttp2_headers_category */
#define REC_SIZE sizeof(pp_h2_rec)
#define CANCEL 0x8
#define INTERNAL_ERROR 0x2
#define MAX_PER_READ 128 /* calls one read may take or finish (more wait for Python as today) */
#define GRPC_PREFIX 5

typedef struct {
    int state;
    int32_t down_sid, up_sid;
    int64_t started_ns, due_ns, hold_due_ns;
    int deadline_kind, kind;
    uint32_t requests;
    pp_buf block; /* the request's header block as received (the handover's head) */
    pp_buf head;  /* the response's head when it came alone (held, not yet sent downstream) */
    int held;
    size_t path_at, path_len;
} glane_slot;

#define LEARNED 8 /* methods per connection whose calls C accounts itself */

/* A method's entry in the listener's gRPC table, as Python found it for a :path. */
typedef struct {
    pp_buf path;
    int64_t entry;
} learned_t;

struct pp_glane {
    pp_glane_state state;
    pp_h2 *down, *up;
    int64_t *block;
    int32_t slot[PP_GLANE_N_SLOTS];
    uint32_t max_streams, max_headers, max_header_bytes, max_request, max_response;
    int64_t timeout_ns;
    int64_t watched_ns; /* the deadline Python's watchdog looks at next (0: none) */
    glane_slot *slots;
    int nslots;
    pp_buf done;
    pp_buf done_out; /* what pp_glane_done_records handed out last */
    int64_t metrics[PP_GLANE_N_METRICS]; /* grpc_metrics' layout (pp_glane_set_metrics) */
    int has_metrics;
    learned_t learned[LEARNED];
    int nlearned;
};

static pp_buf upstream_block; /* one event loop per process: one scratch block for all lanes */
static long live_lanes;
static unsigned char path_ok[256], authority_ok[256];

long pp_glane_live(void) { return live_lanes; }

pp_glane_state *pp_glane_state_of(pp_glane *g) { return &g->state; }

#define COUNT(g, s) ((g)->block[(g)->slot[s]])

static pp_h2_rec rec_at(const uint8_t *records, size_t pos)
{
    pp_h2_rec r;
    memcpy(&r, records + pos, REC_SIZE);
    return r;
}

/* grpc-timeout (codec/grpc.py parse_timeout): up to 8 digits and a unit; -1 when malformed. */
static int64_t timeout_ns_of(const nv_span *f)
{
    if (f->value_len < 2 || f->value_len > 9) return -1;
    int64_t n = 0;
    for (size_t i = 0; i + 1 < f->value_len; i++) {
        if (f->value[i] < '0' || f->value[i] > '9') return -1;
        n = n * 10 + (f->value[i] - '0');
    }
    int64_t unit;
    switch (f->value[f->value_len - 1]) {
    case 'H': unit = 3600000000000LL; break;
    case 'M': unit = 60000000000LL; break;
    case 'S': unit = 1000000000LL; break;
    case 'm': unit = 1000000LL; break;
    case 'u': unit = 1000LL; break;
    case 'n': unit = 1LL; break;
    default: return -1;
    }
    if (n > INT64_MAX / 4 / unit) return INT64_MAX / 4; /* far past any call's life */
    return n * unit;
}

/* A request head the general path would send on as it is (request_from_h2, GrpcCall, the
 * listener's limits) and that is a gRPC call: POST, application/grpc*, a Content-Length (if
 * any) of digits that the body must match (§8.1.1, checked by the caller). Its
 * upstream block, by upstream_h2's rules (h2_request_headers over upstream_head): :method,
 * :scheme http, :authority, :path, the regular fields in order less the hop-by-hop and
 * connection-specific ones, and te: trailers last when the client sent it. */
static int carried(pp_glane *g, const uint8_t *block, size_t len, int64_t *grpc_timeout,
                   nv_span *path, int64_t *content_length)
{
    nv_span f, method = {0}, authority = {0};
    size_t pos = 0, count = 0, size = 0;
    int scheme = 0, grpc = 0, te = 0;
    path->name = NULL;
    *grpc_timeout = 0;
    *content_length = -1;
    while (next_field(block, len, &pos, &f)) {
        count++;
        size += f.name_len + f.value_len + 4; /* header_list_size's measure */
        if (is(&f, ":method")) method = f;
        else if (is(&f, ":scheme")) scheme = value_is(&f, "http") || value_is(&f, "https");
        else if (is(&f, ":path")) *path = f;
        else if (is(&f, ":authority")) authority = f;
        else if (is(&f, "content-length")) { /* digits (request_from_h2), once: it goes along */
            if (*content_length >= 0 || !f.value_len || f.value_len > 15) return 0;
            *content_length = 0;
            for (size_t i = 0; i < f.value_len; i++) {
                if (f.value[i] < '0' || f.value[i] > '9') return 0;
                *content_length = *content_length * 10 + (f.value[i] - '0');
            }
        }
        else if (is(&f, "te")) te = 1;               /* plain: its value is "trailers" */
        else if (is(&f, "content-type"))
            grpc = f.value_len >= 16 && strncasecmp((const char *)f.value, "application/grpc", 16) == 0;
        /* malformed, or zero (already past: the general path ends it at once), is Python's */
        else if (is(&f, "grpc-timeout") && (*grpc_timeout = timeout_ns_of(&f)) <= 0) return 0;
    }
    if (!(method.name && value_is(&method, "POST") && scheme && grpc && path->name != NULL &&
          authority.name != NULL && authority.value_len && path->value_len && path->value[0] == '/' &&
          chars_ok(path_ok, path->value, path->value_len) &&
          chars_ok(authority_ok, authority.value, authority.value_len) && count <= g->max_headers &&
          size <= g->max_header_bytes))
        return 0;
    pp_buf *b = &upstream_block;
    b->len = 0;
    int bad = buf_add(b, ":method\0POST\0:scheme\0http\0:authority", 36) | buf_add(b, "", 1) |
              buf_add(b, authority.value, authority.value_len) | buf_add(b, "\0:path", 6) |
              buf_add(b, "", 1) | buf_add(b, path->value, path->value_len);
    pos = 0;
    while (next_field(block, len, &pos, &f)) {
        if (f.name[0] == ':' || pf_hop_by_hop((const char *)f.name, f.name_len) ||
            pf_h2_connection_specific((const char *)f.name, f.name_len))
            continue;
        bad |= buf_add(b, "", 1) | buf_add(b, f.name, f.name_len) | buf_add(b, "", 1) |
               buf_add(b, f.value, f.value_len);
    }
    if (te) bad |= buf_add(b, "\0te\0" PF_H2_TE_ALLOWED, 4 + strlen(PF_H2_TE_ALLOWED));
    return !bad;
}

/* ---- gRPC framing (codec/grpc.py MessageScanner: the flag, and the size at the prefix) ---- */

typedef struct {
    uint8_t prefix[GRPC_PREFIX];
    size_t have;    /* prefix bytes so far */
    uint64_t skip;  /* payload bytes of the message in progress still to come */
    uint32_t messages;
    int bad;
} scan_t;

static void scan_feed(scan_t *s, const uint8_t *p, size_t n, uint32_t max_size)
{
    size_t pos = 0;
    while (pos < n && !s->bad) {
        if (s->skip) {
            size_t take = s->skip < n - pos ? (size_t)s->skip : n - pos;
            s->skip -= take;
            pos += take;
            if (!s->skip) s->messages++;
            continue;
        }
        s->prefix[s->have++] = p[pos++];
        if (s->have < GRPC_PREFIX) continue;
        s->have = 0;
        uint32_t size = (uint32_t)s->prefix[1] << 24 | (uint32_t)s->prefix[2] << 16 |
                        (uint32_t)s->prefix[3] << 8 | s->prefix[4];
        if (s->prefix[0] > 1 || size > max_size) s->bad = 1;
        else if (size == 0) s->messages++;
        else s->skip = size;
    }
}

static int scan_whole(const scan_t *s) { return !s->bad && !s->have && !s->skip; }

/* ---- slots ---------------------------------------------------------------------------------- */

static glane_slot *free_slot(pp_glane *g)
{
    for (int i = 0; i < g->nslots; i++)
        if (g->slots[i].state == SLOT_EMPTY) return &g->slots[i];
    glane_slot *grown = realloc(g->slots, (size_t)(g->nslots + 1) * sizeof *grown);
    if (grown == NULL) return NULL;
    g->slots = grown;
    memset(&g->slots[g->nslots], 0, sizeof *grown);
    return &g->slots[g->nslots++];
}

static int64_t learned_entry(pp_glane *g, const uint8_t *path, size_t len)
{
    for (int i = 0; i < g->nlearned; i++)
        if (g->learned[i].path.len == len && memcmp(g->learned[i].path.data, path, len) == 0)
            return g->learned[i].entry;
    return -1;
}

/* grpc_metrics.record_finished for a call of a learned method, its status as GrpcLane._account
 * reads it (none: CANCELLED when the client reset it, else UNKNOWN; past the known: UNKNOWN). */
static void record_call(pp_glane *g, int64_t entry, int status, int dr, uint32_t requests,
                        uint32_t responses, int64_t elapsed)
{
    const int64_t *m = g->metrics;
    int64_t *b = g->block;
    if (status < 0) status = (int)(dr ? m[PP_GLANE_M_CANCELLED] : m[PP_GLANE_M_UNKNOWN]);
    else if (status >= m[PP_GLANE_M_N_STATUS]) status = (int)m[PP_GLANE_M_UNKNOWN];
    b[entry + m[PP_GLANE_M_E_STARTED]] += 1;
    b[entry + m[PP_GLANE_M_E_STATUS] + status] += 1;
    b[m[PP_GLANE_M_RECEIVED]] += requests;
    b[m[PP_GLANE_M_SENT]] += responses;
    b[m[PP_GLANE_M_HIST] + pf_duration_bucket(elapsed)] += 1;
    b[m[PP_GLANE_M_HIST_SUM_NS]] += elapsed;
    b[m[PP_GLANE_M_HIST_COUNT]] += 1;
}

/* The call is over: its per-method accounts (here for a learned method, else a record for
 * Python's), the listener's status and duration as account_response keeps them. */
static void finish(pp_glane *g, glane_slot *s, int grpc_status, int dr, uint32_t responses)
{
    int64_t elapsed = now_ns() - s->started_ns;
    const uint8_t *path = s->block.data + s->path_at;
    int64_t entry = g->has_metrics ? learned_entry(g, path, s->path_len) : -1;
    pp_glane_done d = {grpc_status, dr, s->requests, responses, elapsed, (uint32_t)s->path_len, 0};
    if (entry >= 0) record_call(g, entry, grpc_status, dr, s->requests, responses, elapsed);
    else if (!buf_add(&g->done, &d, sizeof d) && !buf_add(&g->done, path, s->path_len))
        g->state.done_count++;
    pf_account_response(g->block, dr ? 0 : 200, elapsed);
    if (dr) COUNT(g, PP_GLANE_FLAG_DR) += 1;
    else COUNT(g, PP_GLANE_NATIVE) += 1;
    g->state.in_flight--;
    g->state.served++;
    s->state = SLOT_EMPTY;
    s->down_sid = s->up_sid = 0;
}

/* ---- the downstream read: taking calls --------------------------------------------------- */

/* The records of one call that came whole in this read (HEADERS, DATA..., END, and nothing of
 * the stream after them but WINDOW_UPDATEs: a reset in the same read leaves it to Python): 1 and
 * its body scanned when so; 0 when anything else of the stream is here or its end is not. */
static int whole_call(pp_glane *g, const uint8_t *records, size_t len, size_t from, int32_t sid,
                      scan_t *scan, size_t *body)
{
    int ended = 0;
    *body = 0;
    memset(scan, 0, sizeof *scan);
    for (size_t pos = from; pos < len;) {
        pp_h2_rec r = rec_at(records, pos);
        const uint8_t *payload = records + pos + REC_SIZE;
        pos += REC_SIZE + r.len;
        if (r.stream_id != sid || r.kind == REC_WINDOW) continue;
        if (ended) return 0;
        if (r.kind == REC_DATA) {
            *body += r.len;
            if (*body > PP_GLANE_MAX_BODY) return 0;
            scan_feed(scan, payload, r.len, g->max_request);
        }
        else if (r.kind == REC_END && scan_whole(scan)) ended = 1;
        else return 0;
    }
    return ended;
}

/* A call is due at `due`: if that comes before what Python's watchdog looks at, it looks again. */
static void watch_by(pp_glane *g, int64_t due)
{
    if (!g->watched_ns || due < g->watched_ns) {
        g->watched_ns = due;
        g->state.due_sooner = 1;
    }
}

static int take(pp_glane *g, const uint8_t *records, size_t len, size_t at, pp_h2_rec head)
{
    const uint8_t *block = records + at + REC_SIZE;
    int64_t grpc_timeout, content_length;
    nv_span path = {0};
    scan_t scan;
    size_t body;
    if (!carried(g, block, head.len, &grpc_timeout, &path, &content_length) ||
        !whole_call(g, records, len, at + REC_SIZE + head.len, head.stream_id, &scan, &body) ||
        (content_length >= 0 && (size_t)content_length != body) ||
        (int64_t)body > pp_h2_new_stream_window(g->up))
        return 0;
    glane_slot *s = free_slot(g);
    if (s == NULL) return 0; /* out of memory: Python's */
    s->block.len = 0;
    if (buf_add(&s->block, block, head.len)) return 0;
    int32_t up_sid = pp_h2_submit_headers(g->up, -1, upstream_block.data, upstream_block.len, PP_H2_PLAIN);
    if (up_sid < 0) return 0; /* nothing was queued */
    /* From here the call is the lane's: its request goes, whatever comes. */
    int failed = 0, ended = 0;
    size_t left = body;
    for (size_t pos = at + REC_SIZE + head.len; pos < len && !failed;) {
        pp_h2_rec r = rec_at(records, pos);
        if (r.stream_id == head.stream_id && r.kind == REC_DATA) {
            left -= r.len;
            ended = left == 0; /* the last byte ends the stream (an empty body: its empty DATA) */
            failed = pp_h2_queue_data(g->up, up_sid, records + pos + REC_SIZE, r.len, ended) < 0;
            if (ended) break;
        }
        pos += REC_SIZE + r.len;
    }
    if (!ended && !failed) failed = pp_h2_queue_data(g->up, up_sid, NULL, 0, 1) < 0; /* no DATA */
    int64_t now = now_ns();
    s->state = SLOT_WAITING;
    s->held = 0;
    s->down_sid = head.stream_id;
    s->up_sid = up_sid;
    s->started_ns = now;
    s->requests = scan.messages;
    s->path_at = (size_t)(path.value - block);
    s->path_len = path.value_len;
    int64_t route = g->timeout_ns, call = grpc_timeout;
    s->due_ns = 0;
    s->deadline_kind = 0;
    if (route && (!call || route <= call)) s->due_ns = now + route, s->deadline_kind = 1;
    else if (call) s->due_ns = now + call, s->deadline_kind = 2;
    if (s->due_ns) watch_by(g, s->due_ns);
    g->state.in_flight++;
    if (head.stream_id > g->state.last_sid) g->state.last_sid = head.stream_id;
    g->state.up_dirty = 1;
    COUNT(g, PP_GLANE_REQUESTS) += 1;
    COUNT(g, PP_GLANE_TAKEN) += 1;
    /* It is on its way (the upstream window had room): the downstream window opens. */
    if (body && pp_h2_consume(g->down, head.stream_id, body) > 0) g->state.down_dirty = 1;
    if (failed) { /* out of memory mid-way: the call ends here, as a reset both ways */
        pp_h2_reset(g->up, up_sid, CANCEL);
        pp_h2_reset(g->down, head.stream_id, INTERNAL_ERROR);
        finish(g, s, -1, 1, 0);
    }
    return 1;
}

static int taken_has(const int32_t *taken, int n, int32_t sid)
{
    for (int i = 0; i < n; i++)
        if (taken[i] == sid) return 1;
    return 0;
}

/* Remove the HEADERS, DATA and END records of the streams in taken[]; the new length. */
static size_t compact(uint8_t *records, size_t len, const int32_t *taken, int n)
{
    size_t out = 0;
    for (size_t pos = 0; pos < len;) {
        pp_h2_rec r = rec_at(records, pos);
        size_t size = REC_SIZE + r.len;
        int drop = (r.kind == REC_HEADERS || r.kind == REC_DATA || r.kind == REC_END) &&
                   taken_has(taken, n, r.stream_id);
        if (!drop) {
            if (out != pos) memmove(records + out, records + pos, size);
            out += size;
        }
        pos += size;
    }
    return out;
}

static size_t down_filter(void *opaque, uint8_t *records, size_t len)
{
    pp_glane *g = opaque;
    int32_t taken[MAX_PER_READ];
    int n = 0;
    for (size_t pos = 0; pos < len && n < MAX_PER_READ;) {
        pp_h2_rec r = rec_at(records, pos);
        if (r.kind == REC_HEADERS && r.a == HCAT_REQUEST && (r.flags & PP_H2_PLAIN) && !(r.flags & PP_H2_END_STREAM)) {
            if (g->up == NULL) g->state.starved++;
            else if (!g->state.closed &&
                     (uint32_t)(g->state.in_flight + g->state.others) < g->max_streams &&
                     (uint32_t)(g->state.in_flight + g->state.up_others) < pp_h2_remote_setting(g->up, 3) &&
                     take(g, records, len, pos, r))
                taken[n++] = r.stream_id;
        }
        pos += REC_SIZE + r.len;
    }
    return n ? compact(records, len, taken, n) : len;
}

static void down_closed(void *opaque, int32_t sid)
{
    pp_glane *g = opaque;
    for (int i = 0; i < g->nslots; i++) {
        glane_slot *s = &g->slots[i];
        if (s->state != SLOT_WAITING || s->down_sid != sid) continue;
        /* Reset by the client before its answer: the upstream stream is cancelled, and the call
         * ends as the general path ends it (DR, CANCELLED). */
        if (g->up != NULL) pp_h2_reset(g->up, s->up_sid, CANCEL);
        g->state.up_dirty = 1;
        finish(g, s, -1, 1, 0);
        return;
    }
}

/* ---- the upstream read: finishing calls ----------------------------------------------------- */

static int status_200(const uint8_t *block, size_t len)
{
    size_t pos = 0;
    nv_span f;
    return next_field(block, len, &pos, &f) && is(&f, ":status") && value_is(&f, "200");
}

/* grpc-status in a block: its value, or -1 when none (or not digits: Python reads it). */
static int grpc_status_of(const uint8_t *block, size_t len)
{
    size_t pos = 0;
    nv_span f;
    while (next_field(block, len, &pos, &f)) {
        if (!is(&f, "grpc-status")) continue;
        if (!f.value_len || f.value_len > 4) return -1;
        int n = 0;
        for (size_t i = 0; i < f.value_len; i++) {
            if (f.value[i] < '0' || f.value[i] > '9') return -1;
            n = n * 10 + (f.value[i] - '0');
        }
        return n;
    }
    return -1;
}

/* A response head the general path sends on as it is: no hop-by-hop field (it strips them) and
 * no Content-Length (it checks the body against it). */
static int head_as_is(const uint8_t *block, size_t len)
{
    size_t pos = 0;
    nv_span f;
    while (next_field(block, len, &pos, &f))
        if (pf_hop_by_hop((const char *)f.name, f.name_len) || is(&f, "content-length")) return 0;
    return 1;
}

/* Trailers the general path sends on: no pseudo-header (it refuses them). */
static int trailers_as_is(const uint8_t *block, size_t len)
{
    size_t pos = 0;
    nv_span f;
    while (next_field(block, len, &pos, &f))
        if (f.name_len && f.name[0] == ':') return 0;
    return 1;
}

enum { RESP_NONE, RESP_PARTIAL, RESP_WHOLE, RESP_HAND, RESP_HOLD };

/* How this read's records answer the call: none of them; whole (head, data, trailers, or
 * trailers-only: *head_at, *trailers_at, *status, *body, the scan); its head alone (held in C
 * until the rest comes: a server that sends its initial metadata first); anything else: hand
 * over. A head held from an earlier read counts as seen (*head_at SIZE_MAX). */
static int response_of(pp_glane *g, glane_slot *s, const uint8_t *records, size_t len, size_t *head_at,
                       size_t *trailers_at, int *status, size_t *body, scan_t *scan)
{
    int seen = s->held ? RESP_PARTIAL : RESP_NONE, data = 0, any = 0;
    if (s->held) *head_at = SIZE_MAX;
    *body = 0;
    *trailers_at = SIZE_MAX;
    memset(scan, 0, sizeof *scan);
    for (size_t pos = 0; pos < len;) {
        pp_h2_rec r = rec_at(records, pos);
        const uint8_t *payload = records + pos + REC_SIZE;
        size_t at = pos;
        pos += REC_SIZE + r.len;
        if (r.stream_id != s->up_sid || r.kind == REC_WINDOW) continue;
        any = 1;
        if (seen == RESP_NONE) {
            if (r.kind != REC_HEADERS || r.a != HCAT_RESPONSE || !(r.flags & PP_H2_PLAIN) ||
                !status_200(payload, r.len) || !head_as_is(payload, r.len))
                return RESP_HAND;
            *head_at = at;
            if (r.flags & PP_H2_END_STREAM) { /* trailers-only */
                *status = grpc_status_of(payload, r.len);
                return *status < 0 ? RESP_HAND : RESP_WHOLE;
            }
            seen = RESP_PARTIAL;
        }
        else if (r.kind == REC_DATA) {
            data = 1;
            *body += r.len;
            scan_feed(scan, payload, r.len, g->max_response);
            if (*body > PP_GLANE_MAX_BODY || scan->bad) return RESP_HAND;
        }
        else if (r.kind == REC_HEADERS && r.a == HCAT_HEADERS && (r.flags & PP_H2_PLAIN) &&
                 (r.flags & PP_H2_END_STREAM) && scan_whole(scan) && trailers_as_is(payload, r.len)) {
            *trailers_at = at;
            *status = grpc_status_of(payload, r.len);
            return *status < 0 ? RESP_HAND : RESP_WHOLE;
        }
        else return RESP_HAND;
    }
    if (!any) return RESP_NONE;
    return !data && !s->held ? RESP_HOLD : RESP_HAND;
}

/* Keep the response's head (its record leaves the read) until the rest comes; -1: no memory. */
static int hold(pp_glane *g, glane_slot *s, const uint8_t *records, size_t head_at)
{
    pp_h2_rec r = rec_at(records, head_at);
    s->head.len = 0;
    if (buf_add(&s->head, records + head_at + REC_SIZE, r.len)) return -1;
    s->held = 1;
    s->hold_due_ns = now_ns() + PP_GLANE_HOLD_NS;
    watch_by(g, s->hold_due_ns);
    return 0;
}

static void hand_over(glane_slot *s, int kind)
{
    s->state = SLOT_HANDED;
    s->kind = kind;
}

/* Submit the whole response on the downstream stream and finish the call. */
static void answer(pp_glane *g, glane_slot *s, const uint8_t *records, size_t len, size_t head_at,
                   size_t trailers_at, int status, size_t body, const scan_t *scan)
{
    int only = trailers_at == SIZE_MAX;
    const uint8_t *head = s->head.data;
    size_t head_len = s->head.len, from = 0;
    if (head_at != SIZE_MAX) {
        pp_h2_rec r = rec_at(records, head_at);
        head = records + head_at + REC_SIZE;
        head_len = r.len;
        from = head_at + REC_SIZE + r.len;
    }
    int failed = pp_h2_submit_headers(g->down, s->down_sid, head, head_len,
                                      PP_H2_PLAIN | (only ? PP_H2_END_STREAM : 0)) < 0;
    s->held = 0;
    for (size_t pos = from; !only && !failed && pos < trailers_at;) {
        pp_h2_rec r = rec_at(records, pos);
        if (r.stream_id == s->up_sid && r.kind == REC_DATA && r.len)
            failed = pp_h2_queue_data(g->down, s->down_sid, records + pos + REC_SIZE, r.len, 0) < 0;
        pos += REC_SIZE + r.len;
    }
    if (!only && !failed) {
        pp_h2_rec t = rec_at(records, trailers_at);
        failed = pp_h2_queue_trailers(g->down, s->down_sid, records + trailers_at + REC_SIZE, t.len,
                                      PP_H2_PLAIN) < 0;
    }
    if (failed) pp_h2_reset(g->down, s->down_sid, INTERNAL_ERROR); /* out of memory */
    if (body && pp_h2_consume(g->up, s->up_sid, body) > 0) g->state.up_dirty = 1;
    g->state.down_dirty = 1;
    finish(g, s, status, 0, scan->messages);
}

static size_t up_filter(void *opaque, uint8_t *records, size_t len)
{
    pp_glane *g = opaque;
    int32_t done[MAX_PER_READ];
    int n = 0;
    for (int i = 0; i < g->nslots; i++) {
        glane_slot *s = &g->slots[i];
        if (s->state != SLOT_WAITING) continue;
        size_t head_at = 0, trailers_at, body;
        int status = -1;
        scan_t scan;
        int seen = response_of(g, s, records, len, &head_at, &trailers_at, &status, &body, &scan);
        if (seen == RESP_NONE) continue;
        /* no room left to take its records out of this read: Python reads them */
        if (n == MAX_PER_READ) hand_over(s, PP_GLANE_RESPONSE);
        else if (seen == RESP_WHOLE && (int64_t)body <= pp_h2_window(g->down, s->down_sid)) {
            int32_t up_sid = s->up_sid;
            answer(g, s, records, len, head_at, trailers_at, status, body, &scan);
            done[n++] = up_sid;
        }
        else if (seen == RESP_HOLD && !hold(g, s, records, head_at)) done[n++] = s->up_sid;
        else hand_over(s, PP_GLANE_RESPONSE);
    }
    return n ? compact(records, len, done, n) : len;
}

static void glane_free(void *opaque);

/* The upstream session is freed first: forget it. */
static void up_gone(void *opaque)
{
    pp_glane *g = opaque;
    g->up = NULL;
}

static void glane_free(void *opaque)
{
    pp_glane *g = opaque;
    if (g->up != NULL) {
        pp_h2_taker none = {0};
        pp_h2_set_taker(g->up, &none);
    }
    for (int i = 0; i < g->nslots; i++) {
        free(g->slots[i].block.data);
        free(g->slots[i].head.data);
    }
    free(g->slots);
    for (int i = 0; i < g->nlearned; i++) free(g->learned[i].path.data);
    free(g->done.data);
    free(g->done_out.data);
    free(g);
    live_lanes--;
}

pp_glane *pp_glane_attach(pp_h2 *down, int64_t *block, const int32_t *slots, const uint32_t *limits,
                          int64_t timeout_ns)
{
    if (!path_ok['/']) {
        for (const char *c = PF_PATH_CHARS; *c; c++) path_ok[(unsigned char)*c] = 1;
        for (const char *c = PF_AUTHORITY_CHARS; *c; c++) authority_ok[(unsigned char)*c] = 1;
    }
    pp_glane *g = calloc(1, sizeof *g);
    if (g == NULL) return NULL;
    g->down = down;
    g->block = block;
    memcpy(g->slot, slots, sizeof g->slot);
    g->max_streams = limits[0];
    g->max_headers = limits[1];
    g->max_header_bytes = limits[2];
    g->max_request = limits[3];
    g->max_response = limits[4];
    g->timeout_ns = timeout_ns;
    pp_h2_taker taker = {NULL, down_closed, glane_free, g, down_filter};
    pp_h2_set_taker(down, &taker);
    live_lanes++;
    return g;
}

void pp_glane_set_upstream(pp_glane *g, pp_h2 *up)
{
    pp_h2_taker none = {0};
    if (g->up != NULL && g->up != up) pp_h2_set_taker(g->up, &none);
    g->up = up;
    if (up != NULL) {
        pp_h2_taker taker = {NULL, NULL, up_gone, g, up_filter};
        pp_h2_set_taker(up, &taker);
    }
}

int pp_glane_hand_over_all(pp_glane *g)
{
    int n = 0;
    for (int i = 0; i < g->nslots; i++)
        if (g->slots[i].state == SLOT_WAITING) {
            hand_over(&g->slots[i], PP_GLANE_UPSTREAM);
            n++;
        }
    return n;
}

void pp_glane_abandon_all(pp_glane *g)
{
    for (int i = 0; i < g->nslots; i++)
        if (g->slots[i].state == SLOT_WAITING) finish(g, &g->slots[i], -1, 1, 0);
}

int pp_glane_next_handover(pp_glane *g)
{
    for (int i = 0; i < g->nslots; i++)
        if (g->slots[i].state == SLOT_HANDED) return i;
    return -1;
}

void pp_glane_handover_of(pp_glane *g, int idx, pp_glane_handover *out)
{
    glane_slot *s = &g->slots[idx];
    out->stream_id = s->down_sid;
    out->upstream_id = s->up_sid;
    out->kind = s->kind;
    out->deadline_kind = s->deadline_kind;
    out->started_ns = s->started_ns;
    out->requests = s->requests;
    out->block = s->block.data;
    out->block_len = s->block.len;
    out->response = s->held ? s->head.data : NULL;
    out->response_len = s->held ? s->head.len : 0;
}

void pp_glane_release(pp_glane *g, int idx)
{
    glane_slot *s = &g->slots[idx];
    if (s->state != SLOT_EMPTY) g->state.in_flight--;
    s->state = SLOT_EMPTY;
    s->down_sid = s->up_sid = 0;
}

const uint8_t *pp_glane_done_records(pp_glane *g, size_t *len)
{
    pp_buf swap = g->done_out;
    g->done_out = g->done;
    g->done = swap;
    g->done.len = 0;
    g->state.done_count = 0;
    *len = g->done_out.len;
    return g->done_out.data;
}

int pp_glane_expired(pp_glane *g, int64_t now, int64_t *next_due)
{
    int64_t next = 0;
    for (int i = 0; i < g->nslots; i++) {
        glane_slot *s = &g->slots[i];
        if (s->state != SLOT_WAITING) continue;
        if (s->held) {
            if (s->hold_due_ns <= now) {
                hand_over(s, PP_GLANE_RESPONSE); /* the held head goes on; the rest follows */
                return i;
            }
            if (next == 0 || s->hold_due_ns < next) next = s->hold_due_ns;
        }
        if (!s->due_ns) continue;
        if (s->due_ns <= now) {
            hand_over(s, PP_GLANE_OVERDUE);
            return i;
        }
        if (next == 0 || s->due_ns < next) next = s->due_ns;
    }
    *next_due = g->watched_ns = next;
    return -1;
}

/* The read's whole output in one crossing; drain failures are left for the next read to see, as
 * data_to_send leaves them. */
static void out_of(pp_h2 *h, const uint8_t **out, size_t *len)
{
    ssize_t n = pp_h2_send(h, out);
    *len = n > 0 ? (size_t)n : 0;
}

int pp_glane_recv(pp_glane *g, pp_h2 *h, const char *data, size_t len, const uint8_t **events,
                  size_t *events_len, size_t *pending, pp_glane_io *io)
{
    io->n = pp_h2_recv(h, (const uint8_t *)data, len, events, events_len, pending);
    io->self_len = io->other_len = 0;
    if (io->n < 0 || pp_h2_failed(h) >= 0) return 1;
    /* WINDOW_UPDATEs make no event for Python here (nothing of its waits for credit): skipped */
    for (size_t pos = 0; pos < *events_len;) {
        pp_h2_rec r = rec_at(*events, pos);
        if (r.kind != REC_WINDOW) return 1;
        pos += REC_SIZE + r.len;
    }
    int down = h == g->down;
    if (!down && h != g->up) return 1;
    pp_h2 *other = down ? g->up : g->down;
    int32_t *other_dirty = down ? &g->state.up_dirty : &g->state.down_dirty;
    int32_t *self_dirty = down ? &g->state.down_dirty : &g->state.up_dirty;
    if (*other_dirty && other != NULL) {
        *other_dirty = 0;
        out_of(other, &io->other_out, &io->other_len);
    }
    if (*self_dirty || *pending) {
        *self_dirty = 0;
        out_of(h, &io->self_out, &io->self_len);
    }
    *pending = 0;
    return 0;
}

void pp_glane_set_metrics(pp_glane *g, const int64_t *layout)
{
    memcpy(g->metrics, layout, sizeof g->metrics);
    g->has_metrics = 1;
}

void pp_glane_learn(pp_glane *g, const char *path, size_t len, int64_t entry)
{
    if (g->nlearned == LEARNED || learned_entry(g, (const uint8_t *)path, len) >= 0) return;
    learned_t *l = &g->learned[g->nlearned];
    memset(l, 0, sizeof *l);
    if (buf_add(&l->path, path, len)) {
        free(l->path.data);
        return;
    }
    l->entry = entry;
    g->nlearned++;
}
