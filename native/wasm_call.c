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
 * init(trap_new) sets wasmtime_trap_new's address, used to make those traps.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static PyObject *call(PyObject *self, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 9) {
        PyErr_SetString(PyExc_TypeError, "call(fn, ctx, args, faults, func, nargs, a, b, c)");
        return NULL;
    }
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

typedef struct {
    PyObject_HEAD
    PyObject *callable;
    int nparams;
    int has_result;
    char kinds[MAX_PARAMS];
} HostFunc;

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
    PyObject *callable;
    const char *params;
    Py_ssize_t nparams;
    int has_result;
    if (!PyArg_ParseTuple(args, "Oy#i", &callable, &params, &nparams, &has_result))
        return NULL;
    if (nparams > MAX_PARAMS) {
        PyErr_SetString(PyExc_ValueError, "too many parameters");
        return NULL;
    }
    HostFunc *h = (HostFunc *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    h->callable = Py_NewRef(callable);
    h->nparams = (int)nparams;
    h->has_result = has_result;
    memcpy(h->kinds, params, (size_t)nparams);
    return (PyObject *)h;
}

static void hostfunc_dealloc(HostFunc *h)
{
    Py_XDECREF(h->callable);
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
    if (PyType_Ready(&HostFuncType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "HostFunc", (PyObject *)&HostFuncType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
