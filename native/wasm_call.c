/*
 * pyproxy.native._wasmcall: the wasm host's two crossings between Python and wasmtime's C API,
 * without ctypes (whose per-call argument conversion and libffi dispatch cost more than the
 * guest's own work in a small callback).
 *
 * call(fn, ctx, args, faults, func, nargs, a, b, c) -> int | None
 *   Writes a, b, c as the first three i32 arguments into the wasmtime_val_raw_t buffer `args`,
 *   calls fn (wasmtime_func_call_unchecked) on the store context `ctx` and the function handle
 *   `func`, and answers the first result as an i32 (0 when it has none). On a trap or error it
 *   answers None and leaves the trap in faults[0], the error in faults[1] (two pointer slots).
 *   What stays the same for a store's life comes first, so a partial can hold it.
 *   The GIL stays held: only this thread enters the guest, and the epoch ticker, not Python,
 *   stops a runaway guest.
 *
 * HostFunc(callable, params, has_result) -> an object whose .env is the `env` and
 * trampoline() -> int the callback to register with wasmtime_linker_define_func_unchecked.
 *   params is bytes, one b'i' (i32, passed as an unsigned int) or b'I' (i64, signed) per
 *   parameter (any other type is passed as its low 32 bits); has_result is 0 (none), b'i'[0],
 *   b'I'[0] or b'z'[0] (another type: zeroed). The callable returns the result (an int; None when the function has none) or,
 *   to trap, the trap's message as bytes. The HostFunc must outlive every store that uses it.
 *
 * HostFunc(callable, params, has_result, runtime, edit, limits) also carries, for the header
 *   edits proxy_add_header_map_value (edit 1) and proxy_replace_header_map_value (edit 2), a
 *   plain case done here without entering Python: the request's or response's header map of
 *   runtime.filter (its .request / .response, a HeaderMap; runtime an EntryState), name and
 *   value inside runtime.view, the entry's budgets (runtime.host_calls, .host_bytes) below limits
 *   (calls, bytes), a name with no CR, LF or colon and a value with no CR or LF. The field is
 *   appended (edit 1) or replaces every field of that name (edit 2) as HeaderMap.add / set do,
 *   with the name lower-cased, and the map marked changed. Anything else (another map, a
 *   pseudo-header, a name or value HeaderMap refuses, an access past the view, a budget
 *   spent) goes to the callable, which decides it: this path never refuses anything itself.
 *
 * EntryState: the base of the Runtime and of its TimeLimit, an entry's state as C fields the
 *   crossings below use directly: filter (the context whose callback runs, None when none),
 *   host_calls and host_bytes (the entry's budgets, the Runtime's), entries (the TimeLimit's).
 *
 * enter(fn, ctx, args, faults, runtime, time_limit, context, func, nargs, a, b, c) -> int | None
 *   A hook's entry: first what Runtime.begin(context) does
 *   (runtime.filter = context, host_calls = host_bytes = 0, time_limit.entries += 1, from which
 *   the deadline tells a new entry), then call's guest call. Runtime.enter is a partial of it.
 *
 * init(trap_new) sets wasmtime_trap_new's address, used to make those traps.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define RAW 16 /* sizeof(wasmtime_val_raw_t) */
#define MAX_PARAMS 16

typedef void *(*call_fn)(void *ctx, const void *func, void *args, size_t nargs, void **trap);
typedef void *(*trap_new_fn)(const char *message, size_t len);

static trap_new_fn trap_new;

static int as_pointer(PyObject *o, void **out)
{
    *out = PyLong_AsVoidPtr(o);
    return !(*out == NULL && PyErr_Occurred());
}

/* The guest call shared by call and enter: argv holds fn, ctx, args, faults, func, nargs, a, b, c. */
static PyObject *guest_call(PyObject *const *argv)
{
    void *fn, *ctx, *func, *args, *faults;
    if (!as_pointer(argv[0], &fn) || !as_pointer(argv[1], &ctx) || !as_pointer(argv[2], &args)
        || !as_pointer(argv[3], &faults) || !as_pointer(argv[4], &func))
        return NULL;
    size_t nargs = PyLong_AsSize_t(argv[5]);
    if (nargs == (size_t)-1 && PyErr_Occurred())
        return NULL;
    char *raw = args;
    for (int i = 0; i < 3; i++) {
        /* Masked to 32 bits: the caller passes Python ints, non-negative or not. */
        uint32_t v = (uint32_t)PyLong_AsUnsignedLongLongMask(argv[6 + i]);
        if (v == (uint32_t)-1 && PyErr_Occurred())
            return NULL;
        memcpy(raw + i * RAW, &v, sizeof v);
    }
    void **slots = faults;
    slots[0] = NULL;
    slots[1] = ((call_fn)fn)(ctx, func, args, nargs, &slots[0]);
    if (slots[0] != NULL || slots[1] != NULL)
        Py_RETURN_NONE;
    int32_t result;
    memcpy(&result, raw, sizeof result);
    return PyLong_FromLong(result);
}

static PyObject *call(PyObject *self, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 9) {
        PyErr_SetString(PyExc_TypeError, "call(fn, ctx, args, faults, func, nargs, a, b, c)");
        return NULL;
    }
    return guest_call(argv);
}

/* An entry's state, kept in C so the crossings read and write it as fields (through the
 * generic attribute and dict calls it cost more than the Python lines it replaced): the
 * Runtime's current context (`filter`) and host-work budgets, the TimeLimit's entry count.
 * Both classes derive from it; each uses its part. */
typedef struct {
    PyObject_HEAD
    PyObject *filter; /* never NULL: None when no context's callback runs */
    long long host_calls, host_bytes, entries;
} EntryState;

static PyTypeObject EntryStateType;

static PyObject *entrystate_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    EntryState *e = (EntryState *)type->tp_alloc(type, 0);
    if (e != NULL)
        e->filter = Py_NewRef(Py_None);
    return (PyObject *)e;
}

static int entrystate_traverse(EntryState *e, visitproc visit, void *arg)
{
    Py_VISIT(e->filter); /* a subclass's traverse visits its type and dict, then this */
    return 0;
}

static int entrystate_clear(EntryState *e)
{
    Py_CLEAR(e->filter);
    return 0;
}

static void entrystate_dealloc(EntryState *e)
{
    PyObject_GC_UnTrack(e);
    entrystate_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMemberDef entrystate_members[] = {
    {"filter", T_OBJECT_EX, offsetof(EntryState, filter), 0, "the context whose callback runs, or None"},
    {"host_calls", T_LONGLONG, offsetof(EntryState, host_calls), 0, "this entry's host calls"},
    {"host_bytes", T_LONGLONG, offsetof(EntryState, host_bytes), 0, "bytes this entry handed the host"},
    {"entries", T_LONGLONG, offsetof(EntryState, entries), 0, "entries begun (the time limit's count)"},
    {NULL},
};

static PyTypeObject EntryStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pyproxy.native._wasmcall.EntryState",
    .tp_basicsize = sizeof(EntryState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = entrystate_new,
    .tp_dealloc = (destructor)entrystate_dealloc,
    .tp_traverse = (traverseproc)entrystate_traverse,
    .tp_clear = (inquiry)entrystate_clear,
    .tp_members = entrystate_members,
    .tp_doc = "An entry's state the native crossings keep as fields (see the module's docstring).",
};

/* enter: a hook's entry begins (Runtime.new_entry's bookkeeping, with the context whose hook
 * it is), then the guest call, in one crossing. */
static PyObject *enter(PyObject *self, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 12) {
        PyErr_SetString(PyExc_TypeError,
                        "enter(fn, ctx, args, faults, runtime, time_limit, context, func, nargs, a, b, c)");
        return NULL;
    }
    if (!PyObject_TypeCheck(argv[4], &EntryStateType) || !PyObject_TypeCheck(argv[5], &EntryStateType)) {
        PyErr_SetString(PyExc_TypeError, "enter: runtime and time_limit are EntryStates");
        return NULL;
    }
    EntryState *rt = (EntryState *)argv[4];
    Py_XSETREF(rt->filter, Py_NewRef(argv[6])); /* NULL if deleted from Python */
    rt->host_calls = rt->host_bytes = 0;
    ((EntryState *)argv[5])->entries++;
    PyObject *call_argv[9] = {argv[0], argv[1], argv[2], argv[3], argv[7], argv[8], argv[9], argv[10], argv[11]};
    return guest_call(call_argv);
}

typedef struct {
    PyObject_HEAD
    PyObject *callable;
    int nparams;
    int has_result;
    char kinds[MAX_PARAMS];
    PyObject *runtime; /* with edit: whose filter's header maps are edited here (see above), an
                        * EntryState: its context and budgets are fields */
    PyObject *rdict;   /* runtime.__dict__: its view read without the generic attribute machinery
                        * (a header edit's bookkeeping cost more than the edit) */
    int edit;          /* 0 none, 1 add, 2 replace */
    long long max_calls, max_bytes;
} HostFunc;

enum { EDIT_ADD = 1, EDIT_REPLACE = 2, MAP_REQUEST = 0, MAP_RESPONSE = 2, OK = 0 };

static PyObject *s_request, *s_response, *s_view, *s_headers, *s_changed;

/* Whether [p, p + n) holds no CR and no LF (and, with colon, no ':'). */
static int clean(const char *p, size_t n, int colon)
{
    return memchr(p, '\r', n) == NULL && memchr(p, '\n', n) == NULL && (!colon || memchr(p, ':', n) == NULL);
}

/* The plain case of a header edit (see the module doc): 1 done (the result written), 0 not
 * the plain case (nothing changed: the callable decides), -1 a Python error. */
static int edit_plain(HostFunc *h, char *raw)
{
    uint32_t a[5];
    for (int i = 0; i < 5; i++) memcpy(&a[i], raw + i * RAW, sizeof a[i]);
    uint32_t map_id = a[0];
    uint64_t kptr = a[1], ksize = a[2], vptr = a[3], vsize = a[4];
    if ((map_id != MAP_REQUEST && map_id != MAP_RESPONSE) || ksize == 0) return 0;
    int done = 0;
    PyObject *filter = NULL, *headers = NULL, *view = NULL, *list = NULL, *name = NULL, *value = NULL;
    EntryState *rt = (EntryState *)h->runtime;
    if (rt->filter == NULL) goto out; /* deleted from Python: the callable decides */
    filter = Py_NewRef(rt->filter);
    if (filter == Py_None) goto out;
    headers = PyObject_GetAttr(filter, map_id == MAP_REQUEST ? s_request : s_response);
    if (headers == NULL) goto fail;
    if (headers == Py_None) goto out;
    long long calls = rt->host_calls, bytes = rt->host_bytes;
    if (calls < 0 || bytes < 0 || calls + 1 > h->max_calls || bytes + (long long)(ksize + vsize) > h->max_bytes)
        goto out;
    view = PyDict_GetItemWithError(h->rdict, s_view);
    if (view == NULL) { if (PyErr_Occurred()) goto fail; goto out; }
    Py_INCREF(view);
    if (!PyMemoryView_Check(view)) goto out;
    Py_buffer *buf = PyMemoryView_GET_BUFFER(view);
    if (kptr + ksize > (uint64_t)buf->len || vptr + vsize > (uint64_t)buf->len) goto out;
    const char *base = buf->buf;
    if (!clean(base + kptr, ksize, 1) || !clean(base + vptr, vsize, 0)) goto out;
    list = PyObject_GetAttr(headers, s_headers);
    if (list == NULL) goto fail;
    if (!PyList_CheckExact(list)) goto out;
    name = PyBytes_FromStringAndSize(base + kptr, ksize);
    value = PyBytes_FromStringAndSize(base + vptr, vsize);
    if (name == NULL || value == NULL) goto fail;
    char *n = PyBytes_AS_STRING(name);
    for (uint64_t i = 0; i < ksize; i++)
        if (n[i] >= 'A' && n[i] <= 'Z') n[i] += 'a' - 'A'; /* bytes.lower(): ASCII only */
    PyObject *field = PyTuple_Pack(2, name, value);
    if (field == NULL) goto fail;
    int changed;
    if (h->edit == EDIT_REPLACE) {
        /* HeaderMap.set: every field of that name goes, in place (the list may be a head's),
         * and the new one comes last: one list made, then one change to the map. */
        Py_ssize_t count = PyList_GET_SIZE(list);
        PyObject *kept = PyList_New(0);
        if (kept == NULL) { Py_DECREF(field); goto fail; }
        int failed = 0;
        for (Py_ssize_t i = 0; i < count && !failed; i++) {
            PyObject *item = PyList_GET_ITEM(list, i);
            PyObject *key = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 ? PyTuple_GET_ITEM(item, 0) : NULL;
            int same = key != NULL && PyBytes_Check(key) && PyBytes_GET_SIZE(key) == (Py_ssize_t)ksize &&
                       memcmp(PyBytes_AS_STRING(key), n, ksize) == 0;
            failed = !same && PyList_Append(kept, item) < 0;
        }
        changed = !failed && PyList_Append(kept, field) == 0 && PyList_SetSlice(list, 0, count, kept) == 0;
        Py_DECREF(kept);
    } else {
        changed = PyList_Append(list, field) == 0;
    }
    Py_DECREF(field);
    if (!changed) goto fail; /* the map is as it was: the callable tries again */
    /* The field is in: from here on the edit is done whatever else fails (never twice). */
    rt->host_calls = calls + 1;
    rt->host_bytes = bytes + (long long)(ksize + vsize);
    if (PyObject_SetAttr(headers, s_changed, Py_True) < 0)
        PyErr_WriteUnraisable(h->callable);
    memset(raw, 0, RAW);
    done = 1;
    goto out;
fail:
    done = -1;
out:
    Py_XDECREF(filter);
    Py_XDECREF(headers);
    Py_XDECREF(view);
    Py_XDECREF(list);
    Py_XDECREF(name);
    Py_XDECREF(value);
    return done;
}

static void *make_trap(const char *message, size_t len)
{
    return trap_new != NULL ? trap_new(message, len) : NULL;
}

/* wasmtime_func_unchecked_callback_t */
static void *trampoline_cb(void *env, void *caller, void *args_and_results, size_t n)
{
    HostFunc *h = env;
    char *raw = args_and_results;
    PyGILState_STATE gil = PyGILState_Ensure(); /* held already: the call above kept it */
    PyObject *argv[MAX_PARAMS];
    void *trap = NULL;
    int made = 0;
    if (h->edit) {
        int plain = edit_plain(h, raw);
        if (plain == 1) {
            PyGILState_Release(gil);
            return NULL; /* OK, written */
        }
        if (plain < 0) PyErr_Clear(); /* the callable meets the same trouble, and reports it */
    }
    for (; made < h->nparams; made++) {
        if (h->kinds[made] == 'I') {
            int64_t v;
            memcpy(&v, raw + made * RAW, sizeof v);
            argv[made] = PyLong_FromLongLong(v);
        } else {
            uint32_t v;
            memcpy(&v, raw + made * RAW, sizeof v);
            argv[made] = PyLong_FromUnsignedLong(v);
        }
        if (argv[made] == NULL)
            break;
    }
    PyObject *out = made == h->nparams ? PyObject_Vectorcall(h->callable, argv, made, NULL) : NULL;
    for (int i = 0; i < made; i++)
        Py_DECREF(argv[i]);
    if (out == NULL) {
        PyErr_WriteUnraisable(h->callable);
        static const char failed[] = "host function failed";
        trap = make_trap(failed, sizeof failed - 1);
    } else if (PyBytes_Check(out)) {
        trap = make_trap(PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out));
    } else if (h->has_result) {
        memset(raw, 0, RAW);
        if (h->has_result == 'I') {
            int64_t v = PyLong_AsLongLong(out);
            memcpy(raw, &v, sizeof v);
        } else if (h->has_result == 'i') {
            uint32_t v = (uint32_t)PyLong_AsUnsignedLongLongMask(out);
            memcpy(raw, &v, sizeof v);
        } /* else 'z': a result of another type, left zero */
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(h->callable);
            static const char bad[] = "host function gave no integer result";
            trap = make_trap(bad, sizeof bad - 1);
        }
    }
    Py_XDECREF(out);
    PyGILState_Release(gil);
    return trap;
}

static PyObject *hostfunc_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *callable, *runtime = NULL;
    const char *params;
    Py_ssize_t nparams;
    int has_result, edit = 0;
    long long max_calls = 0, max_bytes = 0;
    if (!PyArg_ParseTuple(args, "Oy#i|Oi(LL)", &callable, &params, &nparams, &has_result, &runtime, &edit,
                          &max_calls, &max_bytes))
        return NULL;
    if (edit && (edit != EDIT_ADD && edit != EDIT_REPLACE)) {
        PyErr_SetString(PyExc_ValueError, "edit: 0, 1 (add) or 2 (replace)");
        return NULL;
    }
    if (edit && (nparams != 5 || has_result != 'i')) {
        PyErr_SetString(PyExc_ValueError, "a header edit takes five i32 and answers an i32");
        return NULL;
    }
    if (edit && !PyObject_TypeCheck(runtime, &EntryStateType)) {
        PyErr_SetString(PyExc_TypeError, "a header edit's runtime is an EntryState");
        return NULL;
    }
    if (nparams > MAX_PARAMS) {
        PyErr_SetString(PyExc_ValueError, "too many parameters");
        return NULL;
    }
    HostFunc *h = (HostFunc *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    h->callable = Py_NewRef(callable);
    h->runtime = edit ? Py_NewRef(runtime) : NULL;
    h->rdict = NULL;
    if (edit && (h->rdict = PyObject_GenericGetDict(runtime, NULL)) == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    h->edit = edit;
    h->max_calls = max_calls;
    h->max_bytes = max_bytes;
    h->nparams = (int)nparams;
    h->has_result = has_result;
    memcpy(h->kinds, params, (size_t)nparams);
    return (PyObject *)h;
}

static void hostfunc_dealloc(HostFunc *h)
{
    Py_XDECREF(h->callable);
    Py_XDECREF(h->runtime);
    Py_XDECREF(h->rdict);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *hostfunc_env(HostFunc *h, void *closure)
{
    return PyLong_FromVoidPtr(h);
}

static PyGetSetDef hostfunc_getset[] = {
    {"env", (getter)hostfunc_env, NULL, "the env pointer to register with the trampoline", NULL},
    {NULL},
};

static PyTypeObject HostFuncType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pyproxy.native._wasmcall.HostFunc",
    .tp_basicsize = sizeof(HostFunc),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = hostfunc_new,
    .tp_dealloc = (destructor)hostfunc_dealloc,
    .tp_getset = hostfunc_getset,
    .tp_doc = "A Python host function behind the C trampoline (see the module's docstring).",
};

static PyObject *trampoline(PyObject *self, PyObject *unused)
{
    return PyLong_FromVoidPtr((void *)trampoline_cb);
}

static PyObject *init(PyObject *self, PyObject *arg)
{
    void *fn;
    if (!as_pointer(arg, &fn))
        return NULL;
    trap_new = (trap_new_fn)fn;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, "enter the guest (see the module)"},
    {"enter", (PyCFunction)(void (*)(void))enter, METH_FASTCALL, "begin a hook's entry, then call (see the module)"},
    {"trampoline", trampoline, METH_NOARGS, "the host callback's address"},
    {"init", init, METH_O, "set wasmtime_trap_new's address"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wasmcall", "The wasm host's crossings into and out of wasmtime.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__wasmcall(void)
{
    static const char *names[] = {"request", "response", "view", "headers", "changed"};
    PyObject **slots[] = {&s_request, &s_response, &s_view, &s_headers, &s_changed};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL) return NULL;
    if (PyType_Ready(&HostFuncType) < 0 || PyType_Ready(&EntryStateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "HostFunc", (PyObject *)&HostFuncType) < 0
        || PyModule_AddObjectRef(m, "EntryState", (PyObject *)&EntryStateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
