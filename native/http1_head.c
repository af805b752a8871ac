/*
 * pyproxy.native._http1head: one C pass over a whole, plain HTTP/1 head.
 *
 * llhttp (through httptools) calls back into Python for the target, for every
 * field and at the end of the head; with a handful of fields those crossings
 * are most of the parse cost of a small request. When a head is already whole
 * in the buffer, scan() validates and splits it here in one call and builds the
 * Python objects directly.
 *
 * It accepts the strict subset of RFC 9112 described in http1_scan.h and
 * answers None for anything else, and the caller then feeds the bytes to
 * llhttp: every rejection keeps llhttp's status, and every head accepted here
 * is one llhttp accepts with the same meaning.
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
#include "http1_scan.h"

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int is_request;
    Py_ssize_t max_bytes, max_count;
    if (!PyArg_ParseTuple(args, "y*pnn", &buf, &is_request, &max_bytes, &max_count))
        return NULL;
    const char *d = buf.buf;
    PyObject *result = NULL;
    head_t h;
    if (!scan_head(d, buf.len, is_request, max_bytes, max_count, &h)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *headers = field_list(d, &h, 0);
    if (headers == NULL) goto done;
    PyObject *wire;
    if (!has_wire(&h)) {
        wire = Py_NewRef(Py_None);
    } else {
        wire = PyBytes_FromStringAndSize(NULL, wire_len(&h));
        if (wire != NULL) wire_copy(d, &h, PyBytes_AS_STRING(wire));
    }
    if (wire == NULL) { Py_DECREF(headers); goto done; }
    PyObject *first = is_request ? PyBytes_FromStringAndSize(d + h.a0, h.a1 - h.a0) : PyLong_FromLong(h.status);
    PyObject *cl = h.content_length >= 0 ? PyLong_FromSsize_t(h.content_length) : Py_NewRef(Py_None);
    result = Py_BuildValue("(nNy#yNNOOON)", h.head_len, first, d + h.b0, h.b1 - h.b0, h.v11 ? "1.1" : "1.0",
                           headers, cl, h.close ? Py_True : Py_False, h.keep_alive ? Py_True : Py_False,
                           h.expect ? Py_True : Py_False, wire);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Scan a whole plain HTTP/1 head; None when llhttp must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_http1head", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__http1head(void)
{
    init_tables();
    return PyModule_Create(&module);
}
