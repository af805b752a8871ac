/*
 * pyproxy.native._http1head: one C pass over a whole, plain HTTP/1 head.
 *
 * llhttp (through httptools) calls back into Python for the target, for every
 * field and at the end of the head; with a handful of fields those crossings
 * are most of the parse cost of a small request. When a head is already whole
 * in the buffer, scan() validates and splits it here in one call and builds the
 * Python objects directly.
 *
 * It accepts a strict subset of RFC 9112 and answers None for anything else,
 * and the caller then feeds the bytes to llhttp: every rejection keeps llhttp's
 * status, and every head accepted here is one llhttp accepts with the same
 * meaning. The subset: a method from a common set (no CONNECT), a target of
 * RFC 3986 characters, HTTP/1.0 or 1.1, a final status 200-599, token field
 * names, visible-ASCII values, Content-Length framing or none (no
 * Transfer-Encoding, no Upgrade field), one Host in a 1.1 request, within the
 * size and count limits.
 *
 * scan(data, is_request, max_bytes, max_count) -> None or a tuple:
 *   (head_len, method | status, target | reason, version, headers,
 *    content_length | None, close, keep_alive, expect_continue, wire | None)
 * headers is a list of (lower-cased name, value) in order; wire is the head
 * less its hop-by-hop lines (RFC 9110 §7.6.1) for an HTTP/1.1 head, None when
 * a Connection option names another field (the caller serialises anew).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <strings.h>

#define MAX_FIELDS 256 /* above any sane max_count; more fields: None */

static unsigned char tchar[256];   /* RFC 9110 §5.6.2 token characters */
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

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int is_request;
    Py_ssize_t max_bytes, max_count;
    if (!PyArg_ParseTuple(args, "y*pnn", &buf, &is_request, &max_bytes, &max_count))
        return NULL;
    const char *d = buf.buf;
    Py_ssize_t n = buf.len;
    PyObject *result = NULL;
    field_t fields[MAX_FIELDS];
    Py_ssize_t nfields = 0;

    /* The head must be whole: find CRLFCRLF within the limit. */
    Py_ssize_t limit = n < max_bytes ? n : max_bytes;
    const char *end = NULL;
    for (const char *p = d; p + 3 < d + limit; p++) {
        p = memchr(p, '\r', (d + limit) - p);
        if (p == NULL || p + 3 >= d + limit) break;
        if (p[1] == '\n' && p[2] == '\r' && p[3] == '\n') { end = p; break; }
    }
    if (end == NULL) goto decline;
    Py_ssize_t head_len = (end - d) + 4;

    /* Start line. */
    const char *p = d, *line_end = memchr(d, '\r', end - d + 1);
    if (line_end == NULL || line_end[1] != '\n') goto decline;
    Py_ssize_t a0, a1, b0, b1; /* method/status and target/reason spans */
    int v11;
    if (is_request) {
        static const char *methods[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", NULL};
        const char *sp = memchr(p, ' ', line_end - p);
        if (sp == NULL) goto decline;
        int known = 0;
        for (int i = 0; methods[i]; i++)
            if ((Py_ssize_t)strlen(methods[i]) == sp - p && memcmp(p, methods[i], sp - p) == 0) known = 1;
        if (!known) goto decline;
        a0 = 0; a1 = sp - d;
        const char *t = sp + 1, *te = t;
        while (te < line_end && target_ok[(unsigned char)*te]) te++;
        if (te == t || te + 9 != line_end || *te != ' ') goto decline;
        if (memcmp(te + 1, "HTTP/1.", 7) != 0 || (te[8] != '1' && te[8] != '0')) goto decline;
        v11 = te[8] == '1';
        b0 = t - d; b1 = te - d;
    } else {
        if (line_end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '1' && p[7] != '0') || p[8] != ' ')
            goto decline;
        v11 = p[7] == '1';
        if (p[9] < '2' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9') goto decline;
        a0 = 9; a1 = 12;
        b0 = b1 = 12;
        if (line_end - p > 12) {
            if (p[12] != ' ') goto decline;
            for (const char *r = p + 13; r < line_end; r++)
                if (!visible((unsigned char)*r) && *r != ' ' && *r != '\t') goto decline;
            b0 = 13; b1 = line_end - d;
        }
    }

    /* Field lines. */
    Py_ssize_t content_length = -1;
    int hosts = 0, close = 0, keep_alive = 0, expect = 0, hop = 0, named = 0;
    p = line_end + 2;
    while (p < end + 2) {
        const char *le = memchr(p, '\r', end + 2 - p);
        if (le == NULL || le[1] != '\n') goto decline;
        if (le == p) break; /* the empty line */
        if (nfields == MAX_FIELDS || nfields >= max_count) goto decline;
        const char *ne = p;
        while (ne < le && tchar[(unsigned char)*ne]) ne++;
        if (ne == p || ne == le || *ne != ':') goto decline;
        const char *v = ne + 1, *ve = le;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        for (const char *c = v; c < ve; c++)
            if (!visible((unsigned char)*c) && *c != ' ' && *c != '\t') goto decline;
        field_t *f = &fields[nfields++];
        f->name = p - d; f->name_len = ne - p; f->value = v - d; f->value_len = ve - v;
        f->line = p - d; f->line_end = le + 2 - d; f->hop = 0;
        Py_ssize_t nl = ne - p, vl = ve - v;
        if (name_is(p, nl, "content-length")) {
            if (content_length >= 0 || vl == 0 || vl > 18) goto decline;
            Py_ssize_t value = 0;
            for (const char *c = v; c < ve; c++) {
                if (*c < '0' || *c > '9') goto decline;
                value = value * 10 + (*c - '0');
            }
            content_length = value;
        } else if (name_is(p, nl, "transfer-encoding") || name_is(p, nl, "upgrade")) {
            goto decline; /* chunked and upgrade framing are llhttp's */
        } else if (name_is(p, nl, "host")) {
            hosts++;
        } else if (name_is(p, nl, "expect")) {
            expect = vl == 12 && strncasecmp(v, "100-continue", 12) == 0;
        } else if (name_is(p, nl, "connection")) {
            f->hop = hop = 1;
            const char *o = v;
            int kind;
            while ((kind = next_option(&o, ve)) >= 0) {
                if (kind == 0) close = 1;
                else if (kind == 1) keep_alive = 1;
                else named = 1;
            }
        } else if (name_is(p, nl, "keep-alive") || name_is(p, nl, "proxy-connection") ||
                   name_is(p, nl, "te") || name_is(p, nl, "trailer")) {
            f->hop = hop = 1;
        }
        p = le + 2;
    }
    if (is_request && (hosts > 1 || (hosts == 0 && v11))) goto decline;

    /* Build the result. */
    PyObject *headers = PyList_New(nfields);
    if (headers == NULL) goto done;
    for (Py_ssize_t i = 0; i < nfields; i++) {
        field_t *f = &fields[i];
        PyObject *name = PyBytes_FromStringAndSize(NULL, f->name_len);
        if (name == NULL) { Py_DECREF(headers); goto done; }
        char *w = PyBytes_AS_STRING(name);
        for (Py_ssize_t k = 0; k < f->name_len; k++) {
            unsigned char c = d[f->name + k];
            w[k] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
        }
        PyObject *pair = Py_BuildValue("(Ny#)", name, d + f->value, f->value_len);
        if (pair == NULL) { Py_DECREF(headers); goto done; }
        PyList_SET_ITEM(headers, i, pair);
    }
    PyObject *wire;
    if (!v11 || named) {
        wire = Py_NewRef(Py_None);
    } else if (!hop) {
        wire = PyBytes_FromStringAndSize(d, head_len);
    } else {
        Py_ssize_t size = (line_end + 2 - d) + 2;
        for (Py_ssize_t i = 0; i < nfields; i++)
            if (!fields[i].hop) size += fields[i].line_end - fields[i].line;
        wire = PyBytes_FromStringAndSize(NULL, size);
        if (wire != NULL) {
            char *w = PyBytes_AS_STRING(wire);
            Py_ssize_t start_len = line_end + 2 - d;
            memcpy(w, d, start_len);
            w += start_len;
            for (Py_ssize_t i = 0; i < nfields; i++) {
                if (fields[i].hop) continue;
                Py_ssize_t len = fields[i].line_end - fields[i].line;
                memcpy(w, d + fields[i].line, len);
                w += len;
            }
            memcpy(w, "\r\n", 2);
        }
    }
    if (wire == NULL) { Py_DECREF(headers); goto done; }
    PyObject *first = is_request ? PyBytes_FromStringAndSize(d + a0, a1 - a0)
                                 : PyLong_FromLong((d[9] - '0') * 100 + (d[10] - '0') * 10 + (d[11] - '0'));
    PyObject *cl = content_length >= 0 ? PyLong_FromSsize_t(content_length) : Py_NewRef(Py_None);
    result = Py_BuildValue("(nNy#yNNOOON)", head_len, first, d + b0, b1 - b0, v11 ? "1.1" : "1.0",
                           headers, cl, close ? Py_True : Py_False, keep_alive ? Py_True : Py_False,
                           expect ? Py_True : Py_False, wire);
    goto done;

decline:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Scan a whole plain HTTP/1 head; None when llhttp must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_http1head", NULL, -1, methods};

PyMODINIT_FUNC PyInit__http1head(void)
{
    init_tables();
    return PyModule_Create(&module);
}
