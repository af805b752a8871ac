/*
 * pyproxy.native._express: the native express lane.
 *
 * Once the Python express lane (pyproxy/http/express.py) has carried a plain
 * exchange between a downstream connection and a pooled upstream, and every
 * request on that connection must take the same route with no filter, the
 * two sockets are paired here: each readiness callback of the event loop
 * calls straight into C, which reads, validates the head with the same scan
 * as _http1head, forwards the bytes (less hop-by-hop lines) and keeps the
 * accounts the Python lane keeps (requests, express requests, bytes, and the
 * stage clock: read/ipc, write, notify, parse, other) in the listener's shared
 * int64 block, and ends each exchange with pf_account_response: the status
 * class and duration histogram of counters.account_response, generated into
 * protocol_facts.h with the slots it writes. No Python object is made per
 * request.
 *
 * Anything else is handed over, never handled here: the first time a read is
 * not one whole plain request (or response), a send is short or fails, the
 * downstream speaks while a request is in flight, or the idle upstream stirs,
 * the pair calls on_handover(kind, payload) once and goes inert. Python then
 * takes both sockets back and carries on exactly as its own lane would from
 * that point (see pyproxy/http/native_lane.py). Timeouts stay in Python: it
 * reads in_flight, started_ns and last_active_ns from its watchdog timer.
 *
 * Pair(down_fd, up_fd, block, slots, timed, max_bytes, max_count, on_handover)
 *   block: one listener's block (counters.LISTENER_SLOTS int64 slots);
 *   slots: the block indices listed in enum slot below, in that order.
 * account_response(block, status, elapsed_ns): the pair's end-of-exchange accounting, for a
 *   test to hold against counters.account_response.
 *
 * Filter chains ride along through three hooks (Pair.set_hooks; each one
 * None or a callable, one call per request or response, no hooks: nothing is called):
 *   request_hook(method, target, fields, authority, content_length), on a whole plain
 *     request before it goes upstream; fields: [(lower-cased name, value)] in order, every
 *     field; authority: its Host field's value (the request has one: HTTP/1.1);
 *     content_length: its Content-Length (-1: none).
 *   response_hook(status, fields, content_length), on a whole plain response before it
 *     goes downstream; fields less the hop-by-hop ones.
 *   With set_hooks(..., bodies=True) (a chain with body or trailer hooks), each of the two
 *     hooks gets one more argument, the message's whole body as read (bytes, b"" when it has
 *     none): the pair carries only messages read whole, so the body's filters can run over
 *     it in the same call, and "forward as read" then means the body too.
 *   A hook answers None (forward as read), bytes (forward these as the head instead,
 *     the body after them unchanged), a list of (lower-case name, value) bytes pairs (the
 *     head's fields as its filters left them: the pair writes the head from the start line
 *     as read and these fields, see composed_head) or False (take it: REQUEST_TAKEN /
 *     RESPONSE_TAKEN, Python carries the message on). Anything else, or an exception (reported through
 *     sys.unraisablehook), takes the message too. The request hook may also answer True:
 *     forward as read, and this exchange needs no done_hook call (its filters are done).
 *     Either hook, answering otherwise, may set the pair's done_wanted to 0 for the same.
 *   done_hook(), once the pair has accounted the exchange: its response is sent, or
 *     what the downstream did not take is about to be handed over.
 * A request taken is not counted here (Python counts it as it carries it on).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include "http1_scan.h"
#include "protocol_facts.h" /* generated: no-body rules, status classes, the duration histogram */

/* Handover kinds; payload in brackets. */
enum handover {
    DOWN_DATA,         /* [bytes] a downstream read that is not one whole plain request (b"": EOF) */
    DOWN_READABLE,     /* [None] the downstream is readable while a request is in flight (nothing read) */
    DOWN_FAILED,       /* [errno] a downstream recv or send failed */
    UP_IDLE_READABLE,  /* [None] the upstream is readable with nothing in flight (nothing read) */
    UP_DATA,           /* [bytes] an upstream read that is not one whole plain response (b"": EOF) */
    UP_FAILED,         /* [errno] an upstream recv or send failed (a request is in flight) */
    REQUEST_UNSENT,    /* [bytes] the rest of a request the upstream did not take */
    RESPONSE_UNSENT,   /* [bytes] the rest of a response the downstream did not take (cycle done) */
    REQUEST_TAKEN,     /* [bytes] a whole request, as read, that request_hook took (nothing sent) */
    RESPONSE_TAKEN,    /* [bytes] a whole response, as read, that response_hook took (in flight) */
};

/* Indices into the listener block, in the order Python passes them. */
enum slot {
    S_DOWN_READ_NS, S_DOWN_READ_EV, S_DOWN_WRITE_NS, S_DOWN_WRITE_EV,
    S_UP_READ_NS, S_UP_READ_EV, S_UP_WRITE_NS, S_UP_WRITE_EV,
    S_PARSE_NS, S_PARSE_EV, S_NOTIFY_EV, S_OTHER_NS,
    S_DOWN_RX, S_DOWN_TX, S_UP_RX, S_UP_TX,
    S_REQUESTS, S_EXPRESS, S_NATIVE,
    S_CLAIM_START, S_CLAIM_END, /* the stage slots `other` must not count twice: [start, end) */
    N_SLOTS
};

#define READ_SIZE 65536

/* One event loop per process and the GIL held: every pair can share these. */
static char in_buf[READ_SIZE];
static char out_buf[READ_SIZE];

typedef struct {
    PyObject_HEAD
    int down_fd, up_fd;
    int timed;
    int released; /* handed over (or detached): callbacks do nothing */
    Py_buffer view;
    int64_t *block;
    Py_ssize_t slot[N_SLOTS];
    Py_ssize_t max_bytes, max_count;
    PyObject *on_handover;
    PyObject *request_hook, *response_hook, *done_hook; /* NULL: not set */
    int bodies; /* the hooks take the message's body too */
    int done_wanted; /* call done_hook as the exchange in flight ends */
    char *composed; /* a rewritten head and its body, as they go on */
    Py_ssize_t composed_cap;
    int in_flight;
    long long started_ns, last_active_ns;
    char *request; /* the request in flight, as read: Python replays it on a handover */
    Py_ssize_t request_len, request_cap;
    long long down_in, down_out, up_in, up_out; /* for the streams' own byte counts */
    long long served;
} Pair;

static inline long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter_ns's clock on Linux */
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#define SLOT(p, s) ((p)->block[(p)->slot[s]])

static long long claimed(Pair *p)
{
    long long sum = 0;
    for (Py_ssize_t i = p->slot[S_CLAIM_START]; i < p->slot[S_CLAIM_END]; i++) sum += p->block[i];
    return sum;
}

/* `other`: the callback's time after its recv that no stage claimed (parse, write, filters). */
static void account_other(Pair *p, long long since, long long claimed_before)
{
    if (p->timed) SLOT(p, S_OTHER_NS) += now_ns() - since - (claimed(p) - claimed_before);
}

static int keep_request(Pair *p, const char *data, Py_ssize_t n)
{
    if (n > p->request_cap) {
        char *grown = PyMem_Realloc(p->request, n);
        if (grown == NULL) { PyErr_NoMemory(); return -1; }
        p->request = grown;
        p->request_cap = n;
    }
    memcpy(p->request, data, n);
    p->request_len = n;
    return 0;
}

/* Go inert and let Python take over; payload is stolen. */
static PyObject *hand_over(Pair *p, enum handover kind, PyObject *payload)
{
    p->released = 1;
    if (payload == NULL) return NULL;
    Py_INCREF(p); /* Python drops its references to the pair as it takes the sockets back */
    PyObject *result = PyObject_CallFunction(p->on_handover, "iN", (int)kind, payload);
    Py_DECREF(p);
    if (result == NULL) return NULL;
    Py_DECREF(result);
    Py_RETURN_NONE;
}

/* The same, charging Python's handover work to `other` like the C work before it. */
static PyObject *hand_over_timed(Pair *p, enum handover kind, PyObject *payload, long long since,
                                 long long claimed_before)
{
    PyObject *result = hand_over(p, kind, payload);
    account_other(p, since, claimed_before);
    return result;
}

/* recv with the read stage's accounting: >0 bytes, 0 EOF, -1 would block, -2 failed (errno kept). */
static Py_ssize_t timed_recv(Pair *p, int fd, int ns_slot, int ev_slot, int rx_slot, long long *in,
                             long long *t_after)
{
    long long t0 = p->timed ? now_ns() : 0;
    Py_ssize_t n = recv(fd, in_buf, READ_SIZE, 0);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? -1 : -2;
    if (p->timed) {
        *t_after = now_ns();
        SLOT(p, ns_slot) += *t_after - t0;
        SLOT(p, ev_slot) += 1;
        SLOT(p, S_NOTIFY_EV) += 1;
    }
    SLOT(p, rx_slot) += n;
    *in += n;
    return n;
}

/* send with the write stage's accounting: bytes taken (0: would block), or -errno. */
static Py_ssize_t timed_send(Pair *p, int fd, const char *data, Py_ssize_t n, int ns_slot, int ev_slot,
                             int tx_slot, long long *out)
{
    long long t0 = p->timed ? now_ns() : 0;
    Py_ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
    int err = errno;
    if (p->timed) {
        SLOT(p, ns_slot) += now_ns() - t0;
        SLOT(p, ev_slot) += 1;
    }
    if (sent < 0) {
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) return -err;
        sent = 0;
    }
    SLOT(p, tx_slot) += sent;
    *out += sent;
    return sent;
}

/* Scan into h, charging the parse stage: 1 when it is in the subset and forwardable as bytes. */
static int timed_scan(Pair *p, Py_ssize_t n, int is_request, head_t *h)
{
    long long t0 = p->timed ? now_ns() : 0;
    int ok = scan_head(in_buf, n, is_request, p->max_bytes, p->max_count, h) && has_wire(h) && !h->close;
    if (p->timed) {
        SLOT(p, S_PARSE_NS) += now_ns() - t0;
        SLOT(p, S_PARSE_EV) += 1;
    }
    return ok;
}

/* What goes on: the read itself, or its head less hop-by-hop lines followed by its body. */
static const char *forwarded(Py_ssize_t n, const head_t *h, Py_ssize_t *out_len)
{
    if (!h->hop) {
        *out_len = n;
        return in_buf;
    }
    Py_ssize_t head = wire_len(h);
    wire_copy(in_buf, h, out_buf);
    memcpy(out_buf + head, in_buf + h->head_len, n - h->head_len);
    *out_len = head + n - h->head_len;
    return out_buf;
}

/* Room for `need` bytes in p->composed. -1: out of memory (exception set). */
static int compose_room(Pair *p, Py_ssize_t need)
{
    if (need <= p->composed_cap) return 0;
    char *grown = PyMem_Realloc(p->composed, need);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    p->composed = grown;
    p->composed_cap = need;
    return 0;
}

/* What goes on when a hook rewrote the head: `head` then the read's body. NULL: out of memory. */
static const char *rewritten(Pair *p, PyObject *head, Py_ssize_t n, const head_t *h, Py_ssize_t *out_len)
{
    Py_ssize_t head_len = PyBytes_GET_SIZE(head), body = n - h->head_len;
    if (compose_room(p, head_len + body) < 0) return NULL;
    memcpy(p->composed, PyBytes_AS_STRING(head), head_len);
    memcpy(p->composed + head_len, in_buf + h->head_len, body);
    *out_len = head_len + body;
    return p->composed;
}

/* Whether a name (as a filter left it) has an upper-case letter: the general path writes
 * such a field as given and strips hop-by-hop fields by their lower-case names only. */
static int has_upper(const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] >= 'A' && s[i] <= 'Z') return 1;
    return 0;
}

/* What goes on when a hook answered the head's fields: the start line as read, then each
 * field as "name: value", then the read's body, in p->composed. That is the general path's
 * head (heads.paired_request_head / paired_response_head) when the head is one the pair
 * would have carried had it arrived so: the composed head is scanned like a received one
 * and must frame the body as read (same Content-Length, no close on a response), with no
 * field more or fewer than written (a CR or LF inside a name or value splits a line).
 * On a request the hop-by-hop fields are left out, as the general path strips them; one
 * whose Connection names another field, a name with an upper-case letter, an item that is
 * not a pair of bytes or a response with no reason phrase (the general path writes its
 * own) is not composed here. NULL: take the message (*out_len 0) or out of memory
 * (*out_len -1, exception set). */
static const char *composed_head(Pair *p, PyObject *fields, Py_ssize_t n, const head_t *h, int is_request,
                                 Py_ssize_t *out_len)
{
    *out_len = 0;
    if (!is_request && h->b0 == h->b1) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(fields), need = h->start_len + 2 + (n - h->head_len);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(fields, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) return NULL;
        PyObject *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) return NULL;
        need += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;
    }
    if (compose_room(p, need) < 0) { *out_len = -1; return NULL; }
    char *w = p->composed;
    memcpy(w, in_buf, h->start_len);
    w += h->start_len;
    Py_ssize_t written = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(fields, i);
        const char *name = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        const char *value = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 1));
        Py_ssize_t nl = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        Py_ssize_t vl = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1));
        if (has_upper(name, nl)) return NULL;
        if (is_request && pf_hop_by_hop(name, nl)) {
            if (nl == 10 && memcmp(name, "connection", 10) == 0) {
                const char *o = value;
                int kind;
                while ((kind = next_option(&o, value + vl)) >= 0)
                    if (kind == 2) return NULL; /* it names a field the general path strips too */
            }
            continue;
        }
        memcpy(w, name, nl);
        w += nl;
        memcpy(w, ": ", 2);
        w += 2;
        memcpy(w, value, vl);
        w += vl;
        memcpy(w, "\r\n", 2);
        w += 2;
        written++;
    }
    memcpy(w, "\r\n", 2);
    w += 2;
    Py_ssize_t head_len = w - p->composed;
    static head_t again; /* one event loop per process and the GIL held, like in_buf */
    if (!scan_head(p->composed, head_len, is_request, head_len, MAX_FIELDS, &again) || !has_wire(&again) ||
        again.nfields != written || again.head_len != head_len || again.content_length != h->content_length ||
        (is_request ? again.hop : again.close))
        return NULL;
    memcpy(w, in_buf + h->head_len, n - h->head_len);
    *out_len = head_len + n - h->head_len;
    return p->composed;
}

/* What goes on for a hook's answer `head` (stolen): NULL as read, new head bytes, or the
 * fields to compose it from. NULL: take the message (*out_len 0) or out of memory (-1). */
static const char *outgoing(Pair *p, PyObject *head, Py_ssize_t n, const head_t *h, int is_request,
                            Py_ssize_t *out_len)
{
    const char *out;
    if (head == NULL) return forwarded(n, h, out_len);
    if (PyList_CheckExact(head)) out = composed_head(p, head, n, h, is_request, out_len);
    else if ((out = rewritten(p, head, n, h, out_len)) == NULL) *out_len = -1;
    Py_DECREF(head);
    return out;
}

/* A hook's answer: 1 forward (*head: NULL as read, else a new reference to the new head,
 * bytes, or to the list of fields to write it from), 2 forward as read with no done_hook
 * call (True, from the request hook), 0 take the message. An exception or an answer of
 * another kind is reported, then taken. */
static int verdict(PyObject *hook, PyObject *answer, PyObject **head, int may_be_done)
{
    *head = NULL;
    if (answer == Py_None) { Py_DECREF(answer); return 1; }
    if (answer == Py_True && may_be_done) { Py_DECREF(answer); return 2; }
    if (answer != NULL && (PyBytes_CheckExact(answer) || PyList_CheckExact(answer))) {
        *head = answer;
        return 1;
    }
    if (answer != NULL && answer != Py_False)
        PyErr_Format(PyExc_TypeError, "a pair hook answers None, bytes, a list or False, not %.80s",
                     Py_TYPE(answer)->tp_name);
    Py_XDECREF(answer);
    if (PyErr_Occurred()) PyErr_WriteUnraisable(hook);
    return 0;
}

/* Call hook(*args) (nargs new references, any NULL: fail). The caller holds a reference to
 * the hook: a hook may take the sockets back, and set_hooks drops the pair's own. */
static PyObject *call_hook(PyObject *hook, PyObject **args, int nargs)
{
    PyObject *answer = NULL;
    int whole = 1;
    for (int i = 0; i < nargs; i++) whole &= args[i] != NULL;
    if (whole) answer = PyObject_Vectorcall(hook, args, nargs, NULL);
    for (int i = 0; i < nargs; i++) Py_XDECREF(args[i]);
    return answer;
}

/* The Host field's value from the request's field list (that list holds every field, in
 * order): a new reference to the same bytes object, or b"" when there is none. */
static PyObject *authority(PyObject *fields, const head_t *h)
{
    if (fields == NULL) return NULL;
    if (h->host < 0) return PyBytes_FromStringAndSize(NULL, 0);
    return Py_NewRef(PyTuple_GET_ITEM(PyList_GET_ITEM(fields, h->host), 1));
}

/* The body of the message read whole in in_buf (n bytes), for hooks that take it. */
static PyObject *body_of(Py_ssize_t n, const head_t *h)
{
    return PyBytes_FromStringAndSize(in_buf + h->head_len, n - h->head_len);
}

static PyObject *call_request_hook(Pair *p, PyObject *hook, const head_t *h, Py_ssize_t n)
{
    PyObject *fields = field_list(in_buf, h, 0);
    PyObject *args[6] = {
        PyBytes_FromStringAndSize(in_buf + h->a0, h->a1 - h->a0),
        PyBytes_FromStringAndSize(in_buf + h->b0, h->b1 - h->b0),
        fields,
        authority(fields, h),
        PyLong_FromSsize_t(h->content_length),
        p->bodies ? body_of(n, h) : NULL,
    };
    return call_hook(hook, args, p->bodies ? 6 : 5);
}

static PyObject *call_response_hook(Pair *p, PyObject *hook, const head_t *h, Py_ssize_t n)
{
    PyObject *args[4] = {
        PyLong_FromLong(h->status),
        field_list(in_buf, h, 1),
        PyLong_FromSsize_t(h->content_length),
        p->bodies ? body_of(n, h) : NULL,
    };
    return call_hook(hook, args, p->bodies ? 4 : 3);
}

/* After a send: hand a failure or the unsent rest over, else charge `other` and carry on. */
static PyObject *sent_or_hand_over(Pair *p, Py_ssize_t sent, const char *out, Py_ssize_t out_len,
                                   enum handover failed, enum handover unsent, long long since,
                                   long long claimed_before)
{
    if (sent < 0) return hand_over_timed(p, failed, PyLong_FromSsize_t(-sent), since, claimed_before);
    if (sent < out_len)
        return hand_over_timed(p, unsent, PyBytes_FromStringAndSize(out + sent, out_len - sent), since,
                               claimed_before);
    account_other(p, since, claimed_before);
    Py_RETURN_NONE;
}

static PyObject *errno_object(void) { return PyLong_FromLong(errno); }

static PyObject *Pair_downstream_readable(Pair *p, PyObject *unused)
{
    if (p->released) Py_RETURN_NONE;
    if (p->in_flight) return hand_over(p, DOWN_READABLE, Py_NewRef(Py_None));
    long long t1 = 0;
    Py_ssize_t n = timed_recv(p, p->down_fd, S_DOWN_READ_NS, S_DOWN_READ_EV, S_DOWN_RX, &p->down_in, &t1);
    if (n == -1) Py_RETURN_NONE;
    if (n == -2) return hand_over(p, DOWN_FAILED, errno_object());
    long long before = p->timed ? claimed(p) : 0;
    head_t h;
    if (n == 0 || !timed_scan(p, n, 1, &h) || h.expect ||
        pf_no_body_method(in_buf + h.a0, h.a1 - h.a0) || /* the response's framing differs */
        in_buf[h.b0] != '/' || /* not origin-form: the router has a say */
        h.head_len + (h.content_length > 0 ? h.content_length : 0) != n) /* more to come, or pipelined */
        return hand_over_timed(p, DOWN_DATA, PyBytes_FromStringAndSize(in_buf, n), t1, before);
    long long started = p->timed ? t1 : now_ns();
    p->started_ns = started; /* before the hooks: filters read when their request began */
    PyObject *head = NULL;
    if (p->request_hook != NULL) {
        PyObject *hook = Py_NewRef(p->request_hook);
        p->done_wanted = 1; /* the hook may clear it */
        int forward = verdict(hook, call_request_hook(p, hook, &h, n), &head, 1);
        Py_DECREF(hook);
        if (forward != 1) p->done_wanted = 0;
        if (!forward)
            return hand_over_timed(p, REQUEST_TAKEN, PyBytes_FromStringAndSize(in_buf, n), t1, before);
        if (p->released) { Py_XDECREF(head); Py_RETURN_NONE; } /* the hook took the sockets back */
    } else {
        p->done_wanted = 1;
    }
    Py_ssize_t out_len;
    const char *out = outgoing(p, head, n, &h, 1, &out_len);
    if (out == NULL && out_len == 0)
        return hand_over_timed(p, REQUEST_TAKEN, PyBytes_FromStringAndSize(in_buf, n), t1, before);
    if (out == NULL || keep_request(p, in_buf, n) < 0) return NULL;
    p->in_flight = 1;
    SLOT(p, S_REQUESTS) += 1;
    Py_ssize_t sent = timed_send(p, p->up_fd, out, out_len, S_UP_WRITE_NS, S_UP_WRITE_EV, S_UP_TX, &p->up_out);
    return sent_or_hand_over(p, sent, out, out_len, UP_FAILED, REQUEST_UNSENT, t1, before);
}

static PyObject *Pair_upstream_readable(Pair *p, PyObject *unused)
{
    if (p->released) Py_RETURN_NONE;
    if (!p->in_flight) return hand_over(p, UP_IDLE_READABLE, Py_NewRef(Py_None));
    long long t1 = 0;
    Py_ssize_t n = timed_recv(p, p->up_fd, S_UP_READ_NS, S_UP_READ_EV, S_UP_RX, &p->up_in, &t1);
    if (n == -1) Py_RETURN_NONE;
    if (n == -2) return hand_over(p, UP_FAILED, errno_object());
    long long before = p->timed ? claimed(p) : 0;
    head_t h;
    int ok = n > 0 && timed_scan(p, n, 0, &h);
    Py_ssize_t length = ok ? h.content_length : -1;
    if (ok && !pf_status_has_body(h.status)) length = 0; /* a HEAD request never gets here */
    if (!ok || length < 0 || h.head_len + length != n) /* in pieces, more than one, or no framing */
        return hand_over_timed(p, UP_DATA, PyBytes_FromStringAndSize(in_buf, n), t1, before);
    PyObject *head = NULL;
    if (p->response_hook != NULL) {
        PyObject *hook = Py_NewRef(p->response_hook);
        int forward = verdict(hook, call_response_hook(p, hook, &h, n), &head, 0);
        Py_DECREF(hook);
        if (!forward)
            return hand_over_timed(p, RESPONSE_TAKEN, PyBytes_FromStringAndSize(in_buf, n), t1, before);
        if (p->released) { Py_XDECREF(head); Py_RETURN_NONE; }
    }
    Py_ssize_t out_len;
    const char *out = outgoing(p, head, n, &h, 0, &out_len);
    if (out == NULL && out_len == 0)
        return hand_over_timed(p, RESPONSE_TAKEN, PyBytes_FromStringAndSize(in_buf, n), t1, before);
    if (out == NULL) return NULL;
    Py_ssize_t sent =
        timed_send(p, p->down_fd, out, out_len, S_DOWN_WRITE_NS, S_DOWN_WRITE_EV, S_DOWN_TX, &p->down_out);
    long long done = now_ns();
    p->in_flight = 0;
    p->last_active_ns = done;
    p->served += 1;
    SLOT(p, S_EXPRESS) += 1;
    SLOT(p, S_NATIVE) += 1;
    pf_account_response(p->block, h.status, done - p->started_ns);
    if (p->done_hook != NULL && p->done_wanted) {
        PyObject *hook = Py_NewRef(p->done_hook);
        PyObject *result = PyObject_CallNoArgs(hook);
        if (result == NULL) PyErr_WriteUnraisable(hook); /* nothing left to hand over */
        Py_XDECREF(result);
        Py_DECREF(hook);
    }
    return sent_or_hand_over(p, sent, out, out_len, DOWN_FAILED, RESPONSE_UNSENT, t1, before);
}

static PyObject *Pair_detach(Pair *p, PyObject *unused)
{
    p->released = 1;
    Py_RETURN_NONE;
}

/* NULL for None; a new reference to a callable; -1 (exception set) for anything else. */
static int hook_arg(PyObject *arg, const char *name, PyObject **hook)
{
    *hook = NULL;
    if (arg == Py_None) return 0;
    if (!PyCallable_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be callable or None", name);
        return -1;
    }
    *hook = Py_NewRef(arg);
    return 0;
}

static PyObject *Pair_set_hooks(Pair *p, PyObject *args)
{
    PyObject *request, *response, *done, *hooks[3];
    int bodies = 0;
    if (!PyArg_ParseTuple(args, "OOO|p", &request, &response, &done, &bodies)) return NULL;
    if (hook_arg(request, "request_hook", &hooks[0]) < 0) return NULL;
    if (hook_arg(response, "response_hook", &hooks[1]) < 0) { Py_XDECREF(hooks[0]); return NULL; }
    if (hook_arg(done, "done_hook", &hooks[2]) < 0) {
        Py_XDECREF(hooks[0]);
        Py_XDECREF(hooks[1]);
        return NULL;
    }
    Py_XSETREF(p->request_hook, hooks[0]);
    Py_XSETREF(p->response_hook, hooks[1]);
    Py_XSETREF(p->done_hook, hooks[2]);
    p->bodies = bodies;
    Py_RETURN_NONE;
}

static PyObject *Pair_get_request(Pair *p, void *closure)
{
    return PyBytes_FromStringAndSize(p->request, p->in_flight ? p->request_len : 0);
}

static int Pair_init(Pair *p, PyObject *args, PyObject *kwargs)
{
    PyObject *block, *slots, *on_handover;
    int timed;
    if (!PyArg_ParseTuple(args, "iiOOpnnO", &p->down_fd, &p->up_fd, &block, &slots, &timed, &p->max_bytes,
                          &p->max_count, &on_handover))
        return -1;
    if (p->block != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pair is initialised once");
        return -1;
    }
    if (!PyCallable_Check(on_handover)) {
        PyErr_SetString(PyExc_TypeError, "on_handover must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(block, &p->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    p->block = p->view.buf;
    Py_ssize_t nblock = p->view.len / (Py_ssize_t)sizeof(int64_t);
    if (nblock < PF_LISTENER_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "block: smaller than one listener's (counters.LISTENER_SLOTS)");
        return -1;
    }
    PyObject *seq = PySequence_Fast(slots, "slots must be a sequence");
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != N_SLOTS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "slots: expected %d indices", N_SLOTS);
        return -1;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        p->slot[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (p->slot[i] < 0 || p->slot[i] > nblock) {
            Py_DECREF(seq);
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "slots[%d] outside the block", i);
            return -1;
        }
    }
    Py_DECREF(seq);
    p->timed = timed;
    p->on_handover = Py_NewRef(on_handover);
    p->last_active_ns = now_ns();
    return 0;
}

static int Pair_traverse(Pair *p, visitproc visit, void *arg)
{
    Py_VISIT(p->on_handover);
    Py_VISIT(p->request_hook);
    Py_VISIT(p->response_hook);
    Py_VISIT(p->done_hook);
    return 0;
}

static int Pair_clear(Pair *p)
{
    Py_CLEAR(p->on_handover);
    Py_CLEAR(p->request_hook);
    Py_CLEAR(p->response_hook);
    Py_CLEAR(p->done_hook);
    return 0;
}

static void Pair_dealloc(Pair *p)
{
    PyObject_GC_UnTrack(p);
    Pair_clear(p);
    if (p->block != NULL) PyBuffer_Release(&p->view);
    PyMem_Free(p->request);
    PyMem_Free(p->composed);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pair_methods[] = {
    {"downstream_readable", (PyCFunction)Pair_downstream_readable, METH_NOARGS,
     "The event loop's reader callback for the downstream socket."},
    {"upstream_readable", (PyCFunction)Pair_upstream_readable, METH_NOARGS,
     "The event loop's reader callback for the upstream socket."},
    {"detach", (PyCFunction)Pair_detach, METH_NOARGS, "Go inert: Python has taken the sockets back."},
    {"set_hooks", (PyCFunction)Pair_set_hooks, METH_VARARGS,
     "set_hooks(request_hook, response_hook, done_hook, bodies=False): each hook None or a callable; "
     "bodies: the request and response hooks also take the message's body (see the module doc)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Pair_members[] = {
    {"in_flight", T_INT, offsetof(Pair, in_flight), READONLY, "a request is upstream, its response not yet sent"},
    {"released", T_INT, offsetof(Pair, released), READONLY, "handed over or detached"},
    {"started_ns", T_LONGLONG, offsetof(Pair, started_ns), READONLY, "when the request in flight was read"},
    {"last_active_ns", T_LONGLONG, offsetof(Pair, last_active_ns), READONLY, "when the last response left"},
    {"done_wanted", T_INT, offsetof(Pair, done_wanted), 0,
     "whether done_hook is called as the exchange in flight ends (a hook may clear it)"},
    {"served", T_LONGLONG, offsetof(Pair, served), READONLY, "exchanges completed here"},
    {"down_in", T_LONGLONG, offsetof(Pair, down_in), READONLY, "bytes read from the downstream"},
    {"down_out", T_LONGLONG, offsetof(Pair, down_out), READONLY, "bytes sent to the downstream"},
    {"up_in", T_LONGLONG, offsetof(Pair, up_in), READONLY, "bytes read from the upstream"},
    {"up_out", T_LONGLONG, offsetof(Pair, up_out), READONLY, "bytes sent to the upstream"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Pair_getset[] = {
    {"request", (getter)Pair_get_request, NULL, "the request in flight as read (b\"\" when none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyproxy.native._express.Pair",
    .tp_basicsize = sizeof(Pair),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A downstream socket and its upstream, relaying plain HTTP/1.1 exchanges in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pair_init,
    .tp_dealloc = (destructor)Pair_dealloc,
    .tp_traverse = (traverseproc)Pair_traverse,
    .tp_clear = (inquiry)Pair_clear,
    .tp_methods = Pair_methods,
    .tp_members = Pair_members,
    .tp_getset = Pair_getset,
};

static PyObject *account_response(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int status;
    long long elapsed;
    if (!PyArg_ParseTuple(args, "w*iL", &view, &status, &elapsed)) return NULL;
    if (view.len / (Py_ssize_t)sizeof(int64_t) < PF_LISTENER_SLOTS) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "block: not one listener's int64 slots");
        return NULL;
    }
    pf_account_response(view.buf, status, elapsed);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"account_response", account_response, METH_VARARGS,
     "account_response(block, status, elapsed_ns): what a pair counts as an exchange ends."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_express", .m_size = -1,
                                    .m_methods = module_methods};

PyMODINIT_FUNC PyInit__express(void)
{
    init_tables();
    if (PyType_Ready(&PairType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Pair", (PyObject *)&PairType) < 0) { Py_DECREF(m); return NULL; }
    static const struct { const char *name; int value; } kinds[] = {
        {"DOWN_DATA", DOWN_DATA}, {"DOWN_READABLE", DOWN_READABLE}, {"DOWN_FAILED", DOWN_FAILED},
        {"UP_IDLE_READABLE", UP_IDLE_READABLE}, {"UP_DATA", UP_DATA}, {"UP_FAILED", UP_FAILED},
        {"REQUEST_UNSENT", REQUEST_UNSENT}, {"RESPONSE_UNSENT", RESPONSE_UNSENT},
        {"REQUEST_TAKEN", REQUEST_TAKEN}, {"RESPONSE_TAKEN", RESPONSE_TAKEN},
        {"N_SLOTS", N_SLOTS},
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (PyModule_AddIntConstant(m, kinds[i].name, kinds[i].value) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
