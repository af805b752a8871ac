/* What the native lanes (h2_lane.c, grpc_lane.c) share to read a plain header block of the
 * native codec (NUL-joined: name NUL value NUL ..., h2_codec.h) and to time their work. Not
 * part of the cffi interface. */
#ifndef PYPROXY_LANE_FIELDS_H
#define PYPROXY_LANE_FIELDS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    const uint8_t *name, *value;
    size_t name_len, value_len;
} nv_span;

/* The next name/value pair of a NUL-joined block from *pos; 0 when none is left. */
static inline int next_field(const uint8_t *block, size_t len, size_t *pos, nv_span *f)
{
    if (*pos >= len) return 0;
    const uint8_t *p = block + *pos, *end = block + len;
    const uint8_t *name_end = memchr(p, 0, (size_t)(end - p));
    if (name_end == NULL) return 0;
    const uint8_t *value = name_end + 1;
    const uint8_t *value_end = memchr(value, 0, (size_t)(end - value));
    if (value_end == NULL) value_end = end;
    f->name = p;
    f->name_len = (size_t)(name_end - p);
    f->value = value;
    f->value_len = (size_t)(value_end - value);
    *pos = (size_t)(value_end - block) + 1;
    return 1;
}

static inline int is(const nv_span *f, const char *lit)
{
    return f->name_len == strlen(lit) && memcmp(f->name, lit, f->name_len) == 0;
}

static inline int value_is(const nv_span *f, const char *lit)
{
    return f->value_len == strlen(lit) && memcmp(f->value, lit, f->value_len) == 0;
}

/* Every byte in the table (a character class of protocol_facts.h, filled once). */
static inline int chars_ok(const unsigned char *table, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!table[p[i]]) return 0;
    return 1;
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter_ns's clock on Linux */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
