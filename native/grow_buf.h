/* A growable byte buffer, shared by the native HTTP/2 codec and the HTTP/2 lane built into
 * its session (both in the _h2 module). Zero-initialised it is empty; free(data) frees it. */
#ifndef PYPROXY_GROW_BUF_H
#define PYPROXY_GROW_BUF_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *data;
    size_t len, cap;
} pp_buf;

/* Room for `more` bytes past len (doubling, so appends cost amortised O(1)); -1 when out of
 * memory, the buffer unchanged. */
static inline int buf_reserve(pp_buf *b, size_t more)
{
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL) return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static inline int buf_add(pp_buf *b, const void *p, size_t n)
{
    if (buf_reserve(b, n)) return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

#endif
