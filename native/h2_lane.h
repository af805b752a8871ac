/* The native HTTP/2 lane: requests of an h2c downstream session carried to HTTP/1.1 upstreams in C.
 *
 * A lane is attached to one server session of the native codec (h2_codec.c). While that session
 * reads, every plain request head that ends its stream is offered to the lane: a GET or HEAD the general
 * path would accept as it is, within the listener's header limits, with an idle upstream
 * connection lent to the lane, is taken (no record reaches Python) and becomes an HTTP/1.1
 * request on that connection, sent by pp_lane_send after the read. Anything else is declined and
 * goes to Python as a record like any other stream.
 *
 * The upstream's readiness callback calls pp_lane_upstream_readable: a response whose head comes
 * whole in one read (Content-Length framing, HTTP/1.1, final status, no Connection: close) is
 * submitted back on the stream (HEADERS, then DATA as it arrives, up to 64 KiB unless read whole)
 * and accounted; the bytes leave with the session's next flush. A failure once the head is sent
 * resets the stream, as the general path does. Anything else is handed over: the slot waits (pp_lane_next_handover, pp_lane_handover_of) for
 * Python to carry the request on the general path from where the lane left it, exactly as it
 * would have (the request is already sent: it is never sent again here). Python takes the
 * connection back with pp_lane_release.
 *
 * The lane is freed with its session. Contract as h2_codec.h: nothing calls into Python, every
 * function returns >= 0 or a negative value, nothing raises.
 */
#ifndef PYPROXY_H2_LANE_H
#define PYPROXY_H2_LANE_H

#include <stddef.h>
#include <stdint.h>
#include "h2_codec.h"

/* pp_lane_upstream_readable's answers. */
enum {
    PP_LANE_QUIET = 0,         /* nothing for Python */
    PP_LANE_FLUSH = 1,         /* a response was submitted: flush the session */
    PP_LANE_HANDOVER = 2,      /* the slot waits to be handed over */
    PP_LANE_IDLE_READABLE = 3, /* the upstream stirred with nothing in flight: take it back */
    PP_LANE_DROP = 4,          /* a reset stream's upstream said something unplain: close it */
};

/* Why a slot is handed over. */
enum {
    PP_LANE_UP_DATA = 1,        /* data: a read that is not one whole plain response (empty: EOF) */
    PP_LANE_UP_FAILED = 2,      /* err: an upstream recv or send failed */
    PP_LANE_REQUEST_UNSENT = 3, /* data: the rest of the request the upstream did not take */
    PP_LANE_OVERDUE = 4,        /* the route timeout passed with the request in flight */
    PP_LANE_ABANDONED = 5,      /* nothing to carry on (the stream was reset): close the connection */
};

/* Indices into the listener's int64 block, in this order (Python passes them). */
enum {
    PP_LANE_UP_READ_NS, PP_LANE_UP_READ_EV, PP_LANE_UP_WRITE_NS, PP_LANE_UP_WRITE_EV,
    PP_LANE_PARSE_NS, PP_LANE_PARSE_EV, PP_LANE_NOTIFY_EV, PP_LANE_OTHER_NS,
    PP_LANE_UP_RX, PP_LANE_UP_TX, PP_LANE_REQUESTS, PP_LANE_EXPRESS, PP_LANE_NATIVE,
    PP_LANE_CLAIM_START, PP_LANE_CLAIM_END,
    PP_LANE_FLAG_DR, PP_LANE_FLAG_UR, PP_LANE_FLAG_UT, /* response flags the lane can end with */
    PP_LANE_N_SLOTS
};

/* What Python reads and sets on a lane between calls. */
typedef struct {
    int32_t in_flight; /* streams the lane carries now (read) */
    int32_t starved;   /* requests declined for want of an idle upstream since Python last looked */
    int32_t last_sid;  /* the highest stream the lane took (read) */
    int32_t others;    /* streams on the general path (set): both count against max_streams */
    int32_t closed;    /* set: take no new stream (draining) */
    int64_t served;    /* responses the lane completed (read) */
} pp_lane_state;

typedef struct {
    int32_t stream_id;
    int32_t kind;
    int32_t err;
    int64_t started_ns;       /* when the lane read the request (perf_counter_ns's clock) */
    const uint8_t *block;     /* the request's header block, NUL-joined (h2_codec.h) */
    size_t block_len;
    const uint8_t *data;      /* see the kinds above */
    size_t data_len;
} pp_lane_handover;

typedef struct pp_lane pp_lane;

/* limits: max_streams, max_headers, max_header_bytes (the listener's, as the general path's). */
pp_lane *pp_lane_attach(pp_h2 *h, int64_t *block, const int32_t *slots, int timed,
                        const uint32_t *limits);
pp_lane_state *pp_lane_state_of(pp_lane *l);
long pp_lane_live(void);
/* Lend an idle upstream connection; returns its slot index, or -1 (out of memory). */
int pp_lane_add_upstream(pp_lane *l, int fd);
/* Send the requests taken by the last read; returns how many slots wait to be handed over (or
 * closed: their streams were reset during the read). */
int pp_lane_send(pp_lane *l);
int pp_lane_upstream_readable(pp_lane *l, int idx);
/* The first slot waiting to be handed over (or, kind PP_LANE_ABANDONED, closed), or -1. */
int pp_lane_next_handover(pp_lane *l);
void pp_lane_handover_of(pp_lane *l, int idx, pp_lane_handover *out);
/* Take the slot's connection back (its bytes are in the block's counts already). Returns 1
 * when it was idle (poolable), 0 otherwise. */
int pp_lane_release(pp_lane *l, int idx);
/* The first slot past its time at now_ns, or -1 (*next_due: when to look again, 0: never). An
 * in-flight one past timeout_ns (0: none) now waits for a handover (OVERDUE, *handed = 1), or
 * its stream is reset when the answer's head is sent already; an idle one past idle_ns, and
 * that one, are Python's to close. */
int pp_lane_expired(pp_lane *l, int64_t now_ns, int64_t timeout_ns, int64_t idle_ns,
                    int64_t *next_due, int *handed);

#endif
