/*
 * One C pass over a whole, plain HTTP/1 head: shared by _http1head (which
 * builds Python objects from it) and _express (the native lane, which never
 * does). Header-only: each extension module compiles its own static copy.
 *
 * scan_head() accepts a strict subset of RFC 9112 and declines (returns 0)
 * anything else, so the caller's fallback (llhttp) decides every other case
 * with its own status: a method from a common set (no CONNECT), an origin-form
 * target ('/' then RFC 3986 characters), HTTP/1.0 or 1.1, a final status 200-599,
 * token field names, visible-ASCII values, Content-Length framing or none (no
 * Transfer-Encoding, no Upgrade field), one Host in a 1.1 request, no
 * Connection option naming a field in a request, within the size and count limits.
 */
#ifndef PYPROXY_HTTP1_SCAN_H
#define PYPROXY_HTTP1_SCAN_H

#include <Python.h>
#include <string.h>
#include <strings.h>
#include "protocol_facts.h" /* generated: hop-by-hop names */

#define MAX_FIELDS 256 /* above any sane max_count; more fields: declined */

static unsigned char tchar[256];     /* RFC 9110 §5.6.2 token characters */
static unsigned char target_ok[256]; /* RFC 3986 characters allowed in a target */

static void init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) tchar[c] = 1;
    for (const char *p = extra; *p; p++) tchar[(unsigned char)*p] = 1;
    memcpy(target_ok, tchar, sizeof target_ok);
    const char *more = "()*,;=:@/?";
    for (const char *p = more; *p; p++) target_ok[(unsigned char)*p] = 1;
    target_ok['|'] = target_ok['`'] = target_ok['^'] = target_ok['#'] = 0;
}

static int visible(unsigned char c) { return c >= 0x21 && c <= 0x7e; }

typedef struct {
    Py_ssize_t name, name_len, value, value_len, line, line_end; /* offsets into the head */
    int hop;
} field_t;

typedef struct {
    Py_ssize_t head_len;       /* through the empty line */
    Py_ssize_t start_len;      /* the start line with its CRLF */
    Py_ssize_t a0, a1, b0, b1; /* method | status, and target | reason, spans */
    int v11;                   /* HTTP/1.1 (else 1.0) */
    int status;                /* responses */
    Py_ssize_t content_length; /* -1: no Content-Length field */
    int close, keep_alive, expect, hop, named; /* named: a Connection option names a field */
    Py_ssize_t nfields;
    Py_ssize_t host; /* the (last) Host field's index, -1: none */
    field_t fields[MAX_FIELDS];
} head_t;

/* Field names the scan acts on (all lower-case). */
static int name_is(const char *p, Py_ssize_t n, const char *lit)
{
    return (Py_ssize_t)strlen(lit) == n && strncasecmp(p, lit, n) == 0;
}

/* One Connection option at a time: returns 0 close, 1 keep-alive, 2 other, -1 none left. */
static int next_option(const char **p, const char *end)
{
    const char *s = *p;
    while (s < end && (*s == ' ' || *s == '\t' || *s == ',')) s++;
    if (s >= end) { *p = s; return -1; }
    const char *e = s;
    while (e < end && *e != ',') e++;
    const char *t = e;
    while (t > s && (t[-1] == ' ' || t[-1] == '\t')) t--;
    *p = e;
    if (t - s == 5 && strncasecmp(s, "close", 5) == 0) return 0;
    if (t - s == 10 && strncasecmp(s, "keep-alive", 10) == 0) return 1;
    return 2;
}

/* 1: the head at d is whole and in the subset (h filled in); 0: declined. */
static int scan_head(const char *d, Py_ssize_t n, int is_request, Py_ssize_t max_bytes,
                     Py_ssize_t max_count, head_t *h)
{
    /* The head must be whole: find CRLFCRLF within the limit. */
    Py_ssize_t limit = n < max_bytes ? n : max_bytes;
    const char *end = NULL;
    for (const char *p = d; p + 3 < d + limit; p++) {
        p = memchr(p, '\r', (d + limit) - p);
        if (p == NULL || p + 3 >= d + limit) break;
        if (p[1] == '\n' && p[2] == '\r' && p[3] == '\n') { end = p; break; }
    }
    if (end == NULL) return 0;
    h->head_len = (end - d) + 4;

    /* Start line. */
    const char *p = d, *line_end = memchr(d, '\r', end - d + 1);
    if (line_end == NULL || line_end[1] != '\n') return 0;
    h->start_len = line_end + 2 - d;
    h->status = 0;
    if (is_request) {
        static const char *methods[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", NULL};
        const char *sp = memchr(p, ' ', line_end - p);
        if (sp == NULL) return 0;
        int known = 0;
        for (int i = 0; methods[i]; i++)
            if ((Py_ssize_t)strlen(methods[i]) == sp - p && memcmp(p, methods[i], sp - p) == 0) known = 1;
        if (!known) return 0;
        h->a0 = 0; h->a1 = sp - d;
        const char *t = sp + 1, *te = t;
        if (*t != '/') return 0; /* origin-form only: other forms are checked by the fallback */
        while (te < line_end && target_ok[(unsigned char)*te]) te++;
        if (te == t || te + 9 != line_end || *te != ' ') return 0;
        if (memcmp(te + 1, "HTTP/1.", 7) != 0 || (te[8] != '1' && te[8] != '0')) return 0;
        h->v11 = te[8] == '1';
        h->b0 = t - d; h->b1 = te - d;
    } else {
        if (line_end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '1' && p[7] != '0') || p[8] != ' ')
            return 0;
        h->v11 = p[7] == '1';
        if (p[9] < '2' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9') return 0;
        h->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
        h->a0 = 9; h->a1 = 12;
        h->b0 = h->b1 = 12;
        if (line_end - p > 12) {
            if (p[12] != ' ') return 0;
            for (const char *r = p + 13; r < line_end; r++)
                if (!visible((unsigned char)*r) && *r != ' ' && *r != '\t') return 0;
            h->b0 = 13; h->b1 = line_end - d;
        }
    }

    /* Field lines. */
    Py_ssize_t nfields = 0;
    int hosts = 0;
    h->content_length = -1;
    h->close = h->keep_alive = h->expect = h->hop = h->named = 0;
    h->host = -1;
    p = line_end + 2;
    while (p < end + 2) {
        const char *le = memchr(p, '\r', end + 2 - p);
        if (le == NULL || le[1] != '\n') return 0;
        if (le == p) break; /* the empty line */
        if (nfields == MAX_FIELDS || nfields >= max_count) return 0;
        const char *ne = p;
        while (ne < le && tchar[(unsigned char)*ne]) ne++;
        if (ne == p || ne == le || *ne != ':') return 0;
        const char *v = ne + 1, *ve = le;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        for (const char *c = v; c < ve; c++)
            if (!visible((unsigned char)*c) && *c != ' ' && *c != '\t') return 0;
        field_t *f = &h->fields[nfields++];
        f->name = p - d; f->name_len = ne - p; f->value = v - d; f->value_len = ve - v;
        f->line = p - d; f->line_end = le + 2 - d; f->hop = 0;
        Py_ssize_t nl = ne - p, vl = ve - v;
        if (name_is(p, nl, "content-length")) {
            if (h->content_length >= 0 || vl == 0 || vl > 18) return 0;
            Py_ssize_t value = 0;
            for (const char *c = v; c < ve; c++) {
                if (*c < '0' || *c > '9') return 0;
                value = value * 10 + (*c - '0');
            }
            h->content_length = value;
        } else if (name_is(p, nl, "transfer-encoding") || name_is(p, nl, "upgrade")) {
            return 0; /* chunked and upgrade framing are llhttp's */
        } else if (name_is(p, nl, "host")) {
            hosts++;
            h->host = nfields - 1;
        } else if (name_is(p, nl, "expect")) {
            h->expect = vl == 12 && strncasecmp(v, "100-continue", 12) == 0;
        } else if (name_is(p, nl, "connection")) {
            f->hop = h->hop = 1;
            const char *o = v;
            int kind;
            while ((kind = next_option(&o, ve)) >= 0) {
                if (kind == 0) h->close = 1;
                else if (kind == 1) h->keep_alive = 1;
                else h->named = 1;
            }
        } else if (pf_hop_by_hop(p, nl)) { /* the rest of protocol.HOP_BY_HOP */
            f->hop = h->hop = 1;
        }
        p = le + 2;
    }
    if (is_request && (hosts > 1 || (hosts == 0 && h->v11))) return 0;
    /* A request whose Connection names fields: the fallback checks what it names. */
    if (is_request && h->named) return 0;
    h->nfields = nfields;
    return 1;
}

/* Whether the head can go on as bytes: HTTP/1.1 and no Connection option naming another field. */
static int has_wire(const head_t *h) { return h->v11 && !h->named; }

/* The length of the head less its hop-by-hop lines (RFC 9110 §7.6.1). */
static Py_ssize_t wire_len(const head_t *h)
{
    if (!h->hop) return h->head_len;
    Py_ssize_t size = h->start_len + 2;
    for (Py_ssize_t i = 0; i < h->nfields; i++)
        if (!h->fields[i].hop) size += h->fields[i].line_end - h->fields[i].line;
    return size;
}

/* Write the head less its hop-by-hop lines to w (wire_len(h) bytes). */
static void wire_copy(const char *d, const head_t *h, char *w)
{
    if (!h->hop) {
        memcpy(w, d, h->head_len);
        return;
    }
    memcpy(w, d, h->start_len);
    w += h->start_len;
    for (Py_ssize_t i = 0; i < h->nfields; i++) {
        if (h->fields[i].hop) continue;
        Py_ssize_t len = h->fields[i].line_end - h->fields[i].line;
        memcpy(w, d + h->fields[i].line, len);
        w += len;
    }
    memcpy(w, "\r\n", 2);
}

/* The head's fields as a new list of (lower-cased name, value) bytes pairs, in order;
 * less the hop-by-hop ones when skip_hop. NULL with an exception set on failure. */
/* Names most heads carry, made once: a field with one of them shares the bytes object
 * (immutable) instead of a new one per field. Lower-case, as field_list hands names out. */
static const char *const common_names[] = {
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "content-length",
    "content-type", "date", "server", "cache-control", "last-modified", "etag", NULL,
};
#define COMMON_NAME_MAX 16 /* at least the longest above */
static PyObject *common_name_objects[sizeof common_names / sizeof common_names[0]];

/* A new reference to the common name `lower` (n bytes), or NULL (not one, or no memory). */
static PyObject *common_name(const char *lower, Py_ssize_t n)
{
    for (int i = 0; common_names[i] != NULL; i++) {
        if ((Py_ssize_t)strlen(common_names[i]) != n || memcmp(common_names[i], lower, n) != 0) continue;
        if (common_name_objects[i] == NULL) {
            common_name_objects[i] = PyBytes_FromStringAndSize(lower, n);
            if (common_name_objects[i] == NULL) { PyErr_Clear(); return NULL; }
        }
        return Py_NewRef(common_name_objects[i]);
    }
    return NULL;
}

/* n bytes of src, lower-cased (ASCII), into w. */
static void lower_copy(char *w, const char *src, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned char c = src[k];
        w[k] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    }
}

/* One field's lower-cased name as bytes. NULL with an exception set on failure. */
static PyObject *field_name(const char *d, const field_t *f)
{
    if (f->name_len <= COMMON_NAME_MAX) {
        char lower[COMMON_NAME_MAX];
        lower_copy(lower, d + f->name, f->name_len);
        PyObject *shared = common_name(lower, f->name_len);
        return shared != NULL ? shared : PyBytes_FromStringAndSize(lower, f->name_len);
    }
    PyObject *name = PyBytes_FromStringAndSize(NULL, f->name_len);
    if (name != NULL) lower_copy(PyBytes_AS_STRING(name), d + f->name, f->name_len);
    return name;
}

static PyObject *field_list(const char *d, const head_t *h, int skip_hop)
{
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < h->nfields; i++) count += !(skip_hop && h->fields[i].hop);
    PyObject *headers = PyList_New(count);
    if (headers == NULL) return NULL;
    for (Py_ssize_t i = 0, j = 0; i < h->nfields; i++) {
        const field_t *f = &h->fields[i];
        if (skip_hop && f->hop) continue;
        /* The tuple is built directly (Py_BuildValue parses its format per call). */
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) { Py_DECREF(headers); return NULL; }
        PyList_SET_ITEM(headers, j++, pair);
        PyObject *name = field_name(d, f);
        if (name == NULL) { Py_DECREF(headers); return NULL; }
        PyTuple_SET_ITEM(pair, 0, name);
        PyObject *value = PyBytes_FromStringAndSize(d + f->value, f->value_len);
        if (value == NULL) { Py_DECREF(headers); return NULL; }
        PyTuple_SET_ITEM(pair, 1, value);
    }
    return headers;
}

#endif
