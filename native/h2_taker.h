/* How the native codec's server session lends its streams to another C component (the HTTP/2
 * lane, h2_lane.c) without knowing it: offered each plain request head that ends its stream
 * (take returns 1: taken, no record for Python), told when a stream closes, freed with the
 * session. Not part of the cffi interface. */
#ifndef PYPROXY_H2_TAKER_H
#define PYPROXY_H2_TAKER_H

#include "h2_codec.h"

typedef struct {
    int (*take)(void *opaque, int32_t stream_id, const uint8_t *joined, size_t len);
    void (*closed)(void *opaque, int32_t stream_id);
    void (*release)(void *opaque);
    void *opaque;
} pp_h2_taker;

void pp_h2_set_taker(pp_h2 *h, const pp_h2_taker *taker);

#endif
