/* How the native codec's sessions lend their streams to another C component (the HTTP/2 lane,
 * h2_lane.c; the gRPC lane, grpc_lane.c) without knowing it: offered each plain request head
 * that ends its stream (take returns 1: taken, no record for Python), offered the records of
 * each read before Python sees them (filter removes whole streams' records and returns the
 * records' new length), told when a stream closes, released when the session is freed. Not
 * part of the cffi interface. */
#ifndef PYPROXY_H2_TAKER_H
#define PYPROXY_H2_TAKER_H

#include "h2_codec.h"

typedef struct {
    int (*take)(void *opaque, int32_t stream_id, const uint8_t *joined, size_t len);
    void (*closed)(void *opaque, int32_t stream_id);
    void (*release)(void *opaque);
    void *opaque;
    size_t (*filter)(void *opaque, uint8_t *records, size_t len);
} pp_h2_taker;

void pp_h2_set_taker(pp_h2 *h, const pp_h2_taker *taker);
/* What a new client stream may send now: min(the peer's initial stream window, the connection
 * window less what waits in C). */
int64_t pp_h2_new_stream_window(pp_h2 *h);

#endif
