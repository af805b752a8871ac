/* The native gRPC lane: unary-shaped gRPC calls of an h2c downstream session carried to an h2c
 * upstream session in C, both sessions of the native codec (h2_codec.c).
 *
 * A lane is attached to one server session; Python lends it one client session (the lane's
 * own upstream connection, pp_glane_set_upstream). After each downstream read the lane looks at
 * the read's records: a call whose plain request HEADERS, whole gRPC-framed DATA (at most
 * PP_GLANE_MAX_BODY bytes, within the upstream's window) and END_STREAM all came in this read,
 * and whose head the general path would send on as it is, is re-encoded by the general path's
 * rules (upstream_h2, h2_request_headers), submitted on the upstream session, and its records
 * are removed: Python never sees it. Anything else is left untouched, before a byte of it went
 * upstream, and reaches Python as today.
 *
 * After each upstream read the lane looks at that read's records the same way: a call whose
 * response (plain HEADERS :status 200, whole framed DATA within the downstream window, plain
 * trailers; or a trailers-only response) came whole in this read is submitted on the downstream
 * stream and finished: a record (pp_glane_done) waits for Python's per-method accounts (a
 * response head that comes alone is held in C, bounded by the header limits, until the rest
 * comes or PP_GLANE_HOLD_NS pass; a handover gives it to Python, which reads it before the rest). Any
 * other record of a lane call (a reset, a response in pieces, a non-200 status, bad framing, a
 * message over the limit) hands the call over: its records stay for Python, which adopts the
 * already-sent stream on the general path (pp_glane_next_handover, pp_glane_handover_of,
 * pp_glane_release) before it reads them. A call overdue (route timeout or grpc-timeout) is
 * handed over by pp_glane_expired; a call the client reset is cancelled upstream here.
 *
 * The lane is freed with its downstream session; either session freed first unhooks the other.
 * Contract as h2_codec.h: nothing calls into Python, nothing raises.
 */
#ifndef PYPROXY_GRPC_LANE_H
#define PYPROXY_GRPC_LANE_H

#include <stddef.h>
#include <stdint.h>
#include "h2_codec.h"

#define PP_GLANE_MAX_BODY 65535 /* one default stream window: bounded, and never a long wait */
/* How long a response head that came alone is held for the rest of the response (a unary
 * server writes them a moment apart); then the call is handed over and the head goes on, so a
 * server that sends its initial metadata early and answers later is not held back. */
#define PP_GLANE_HOLD_NS 5000000

/* Why a call is handed over. */
enum {
    PP_GLANE_RESPONSE = 1, /* its response's records are in the upstream read: Python reads them
                            * (or its head, held past PP_GLANE_HOLD_NS, goes on alone) */
    PP_GLANE_OVERDUE = 2,  /* its deadline passed (deadline_kind says which) */
    PP_GLANE_UPSTREAM = 3, /* the upstream connection failed or goes away */
};

/* Indices into the listener's int64 block, in this order (Python passes them). */
enum {
    PP_GLANE_REQUESTS, PP_GLANE_NATIVE, PP_GLANE_TAKEN, PP_GLANE_FLAG_DR,
    PP_GLANE_N_SLOTS
};

/* What Python reads and sets on a lane between calls (the HTTP/2 lane's pp_lane_state first). */
typedef struct {
    int32_t in_flight; /* calls the lane carries now, handed-over ones until released (read) */
    int32_t starved;   /* calls declined for want of an upstream session since Python looked */
    int32_t last_sid;  /* the highest downstream stream the lane took (read) */
    int32_t others;    /* streams on the general path (set): both count against max_streams */
    int32_t closed;    /* set: take no new call (draining) */
    int64_t served;    /* calls the lane finished (read) */
    int32_t up_others; /* streams of the upstream session on the general path (set) */
    int32_t up_dirty;  /* the lane submitted on the upstream session: flush it (read, reset) */
    int32_t down_dirty;/* the lane submitted on the downstream session: flush it (read, reset) */
    int32_t done_count;/* finished-call records waiting in the done buffer */
    int32_t due_sooner;/* a read gave a call a deadline before the one Python watches: look
                        * again by pp_glane_expired (read, reset) */
} pp_glane_state;

/* One finished call, followed by path_len bytes of its :path; records are packed back to back. */
typedef struct {
    int32_t grpc_status; /* -1: none received (the flag decides) */
    int32_t flag_dr;     /* the client reset it */
    uint32_t requests, responses; /* messages each way */
    int64_t elapsed_ns;
    uint32_t path_len;
    uint32_t pad;
} pp_glane_done;

typedef struct {
    int32_t stream_id;    /* downstream */
    int32_t upstream_id;  /* upstream */
    int32_t kind;
    int32_t deadline_kind; /* OVERDUE: 1 the route timeout, 2 grpc-timeout */
    int64_t started_ns;
    uint32_t requests;    /* messages sent upstream */
    const uint8_t *block; /* the request's header block as received, NUL-joined */
    size_t block_len;
    const uint8_t *response; /* the response's head held in C (never sent downstream), or NULL */
    size_t response_len;
} pp_glane_handover;

typedef struct pp_glane pp_glane;

/* limits: max_streams, max_headers, max_header_bytes, max_request_message_bytes,
 * max_response_message_bytes; timeout_ns: the route's gRPC timeout (0: none). */
pp_glane *pp_glane_attach(pp_h2 *down, int64_t *block, const int32_t *slots, const uint32_t *limits,
                          int64_t timeout_ns);
pp_glane_state *pp_glane_state_of(pp_glane *g);
long pp_glane_live(void);
/* The lane's upstream session (NULL: none; calls are declined and counted as starved). */
void pp_glane_set_upstream(pp_glane *g, pp_h2 *up);
/* Hand over every call in flight (its upstream connection fails); returns how many. */
int pp_glane_hand_over_all(pp_glane *g);
/* The downstream connection ends: every call in flight ends as the client's reset (DR). */
void pp_glane_abandon_all(pp_glane *g);
/* The first call waiting to be handed over, or -1. */
int pp_glane_next_handover(pp_glane *g);
void pp_glane_handover_of(pp_glane *g, int idx, pp_glane_handover *out);
/* Python carries the call on: the slot is free again. */
void pp_glane_release(pp_glane *g, int idx);
/* The finished-call records (pp_glane_done + path, packed); *len bytes; cleared by the next call. */
const uint8_t *pp_glane_done_records(pp_glane *g, size_t *len);
/* The first call past its deadline at now_ns, now waiting to be handed over, or -1 (*next_due:
 * when to look again, 0: nothing due). */
int pp_glane_expired(pp_glane *g, int64_t now_ns, int64_t *next_due);

/* grpc_metrics' layout in the listener's block, in this order (Python passes it): message
 * counters, the duration histogram, an entry's started and status slots, and the status codes
 * a call without a known one counts under. */
enum {
    PP_GLANE_M_RECEIVED, PP_GLANE_M_SENT, PP_GLANE_M_HIST, PP_GLANE_M_HIST_SUM_NS,
    PP_GLANE_M_HIST_COUNT, PP_GLANE_M_E_STARTED, PP_GLANE_M_E_STATUS, PP_GLANE_M_N_STATUS,
    PP_GLANE_M_CANCELLED, PP_GLANE_M_UNKNOWN,
    PP_GLANE_N_METRICS
};
void pp_glane_set_metrics(pp_glane *g, const int64_t *layout);
/* Calls to this :path count under this method entry: C accounts them itself from now on (a few
 * methods per connection; the calls of any other still make pp_glane_done records). */
void pp_glane_learn(pp_glane *g, const char *path, size_t len, int64_t entry);

/* What one read left to send, when the lane carried all of it (pp_glane_recv returned 0). */
typedef struct {
    ssize_t n;                /* pp_h2_recv's result */
    const uint8_t *self_out;  /* the read session's own output (acks, WINDOW_UPDATEs) */
    size_t self_len;
    const uint8_t *other_out; /* the other session's: the calls taken, or the answers */
    size_t other_len;
} pp_glane_io;

/* One read of either of the lane's sessions (h: the downstream or the lane's upstream one), as
 * pp_h2_recv (same *events, *events_len, *pending), for a session with nothing waiting for
 * flow-control credit (its WINDOW_UPDATEs make no event). 0: every other record of the read was
 * the lane's and nothing failed; both sessions' output then waits in *io (up_dirty / down_dirty reset: a read
 * costs one crossing and the writes). 1: records are left for Python or the session failed: it
 * goes on from pp_h2_recv's result (io->n) as after pp_h2_recv, and flushes as it did. */
int pp_glane_recv(pp_glane *g, pp_h2 *h, const char *data, size_t len, const uint8_t **events,
                  size_t *events_len, size_t *pending, pp_glane_io *io);

#endif
