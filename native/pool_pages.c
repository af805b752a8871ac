/*
 * pyproxy.native._pools: give the pages of pymalloc's empty pools back to the OS.
 *
 * CPython's small-object allocator carves 1 MiB arenas into 16 KiB pools and
 * unmaps an arena only when every pool in it is empty. After a burst of
 * connections a few survivors keep many arenas alive, and their empty pools
 * stay resident although nothing is in them. watch() wraps the arena
 * allocator (PyObject_SetArenaAllocator) to learn where arenas are; release()
 * walks them and, for each empty pool whose pages are resident, drops all but
 * the pool's first page (madvise MADV_DONTNEED). The first page keeps the pool
 * header, which links the pool into its arena's list of free pools.
 *
 * The pool header's layout and the sizes below are obmalloc's (Objects/obmalloc.c
 * of CPython 3.10 to 3.13, 64-bit, with the radix tree that selects large arenas
 * and pools). An empty pool is one whose count of allocated blocks is 0. Its
 * free-block list runs through the dropped pages, so release() also marks the
 * pool's size class unknown: the next use initialises the pool afresh instead of
 * following that list. Everything here runs with the GIL held, as pymalloc does.
 *
 * watch() -> bool      wrap the arena allocator (False: this build is not the
 *                      layout described above; nothing is wrapped)
 * release() -> int     bytes of resident pages dropped
 * arenas() -> int      arenas allocated since watch() and still alive
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define ARENA_SIZE ((size_t)1 << 20)
#define POOL_SIZE ((size_t)1 << 14)
#define SIZE_CLASS_UNKNOWN 0xffff /* obmalloc's DUMMY_SIZE_IDX */

#if PY_VERSION_HEX >= 0x030A0000 && PY_VERSION_HEX < 0x030E0000 && SIZEOF_VOID_P == 8 && !defined(Py_GIL_DISABLED)
#define LAYOUT_KNOWN 1
#else
#define LAYOUT_KNOWN 0
#endif

struct pool_header { /* obmalloc's, field for field */
    union {
        void *padding;
        unsigned int count;
    } ref;
    void *freeblock;
    void *nextpool;
    void *prevpool;
    unsigned int arenaindex;
    unsigned int szidx;
    unsigned int nextoffset;
    unsigned int maxnextoffset;
};

static PyObjectArenaAllocator wrapped;
static int watching;
static int usable = 1; /* cleared if an arena of another size shows up */
static void **known;   /* arena addresses, unordered */
static size_t n_known, cap_known;

static void remember(void *arena)
{
    if (n_known == cap_known) {
        size_t cap = cap_known ? 2 * cap_known : 64;
        void **grown = realloc(known, cap * sizeof *known);
        if (grown == NULL)
            return; /* not released later, nothing worse */
        known = grown;
        cap_known = cap;
    }
    known[n_known++] = arena;
}

static void forget(void *arena)
{
    for (size_t i = 0; i < n_known; i++) {
        if (known[i] == arena) {
            known[i] = known[--n_known];
            return;
        }
    }
}

static void *arena_alloc(void *ctx, size_t size)
{
    void *arena = wrapped.alloc(wrapped.ctx, size);
    if (arena != NULL) {
        if (size == ARENA_SIZE)
            remember(arena);
        else
            usable = 0;
    }
    return arena;
}

static void arena_free(void *ctx, void *arena, size_t size)
{
    forget(arena);
    wrapped.free(wrapped.ctx, arena, size);
}

static PyObject *watch(PyObject *self, PyObject *unused)
{
    if (!LAYOUT_KNOWN || sysconf(_SC_PAGESIZE) >= (long)POOL_SIZE)
        Py_RETURN_FALSE;
    if (!watching) {
        PyObject_GetArenaAllocator(&wrapped);
        PyObjectArenaAllocator ours = {NULL, arena_alloc, arena_free};
        PyObject_SetArenaAllocator(&ours);
        watching = 1;
    }
    Py_RETURN_TRUE;
}

/* Resident pages of the pool starting at page `first` of the arena's residency vector. */
static size_t resident_after_header(const unsigned char *vec, size_t first, size_t pages_per_pool)
{
    size_t resident = 0;
    for (size_t i = first + 1; i < first + pages_per_pool; i++)
        resident += vec[i] & 1;
    return resident;
}

static size_t release_arena(char *arena, unsigned char *vec, size_t page)
{
    if (mincore(arena, ARENA_SIZE, vec) != 0)
        return 0;
    uintptr_t start = ((uintptr_t)arena + POOL_SIZE - 1) & ~(uintptr_t)(POOL_SIZE - 1);
    size_t pages_per_pool = POOL_SIZE / page, released = 0;
    for (uintptr_t pool = start; pool + POOL_SIZE <= (uintptr_t)arena + ARENA_SIZE; pool += POOL_SIZE) {
        size_t first = (pool - (uintptr_t)arena) / page;
        if (!(vec[first] & 1))
            continue; /* never carved: its header was never written */
        struct pool_header *header = (struct pool_header *)pool;
        if (header->ref.count != 0)
            continue;
        size_t resident = resident_after_header(vec, first, pages_per_pool);
        if (resident == 0)
            continue;
        if (madvise((char *)pool + page, POOL_SIZE - page, MADV_DONTNEED) != 0)
            continue;
        header->szidx = SIZE_CLASS_UNKNOWN;
        released += resident * page;
    }
    return released;
}

static PyObject *release(PyObject *self, PyObject *unused)
{
    size_t released = 0;
    if (watching && usable) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        unsigned char vec[ARENA_SIZE / 4096 + 1];
        if (ARENA_SIZE / page + 1 <= sizeof vec) {
            for (size_t i = 0; i < n_known; i++)
                released += release_arena(known[i], vec, page);
        }
    }
    return PyLong_FromSize_t(released);
}

static PyObject *arenas(PyObject *self, PyObject *unused)
{
    return PyLong_FromSize_t(n_known);
}

static PyMethodDef methods[] = {
    {"watch", watch, METH_NOARGS, "Wrap the arena allocator to learn where arenas are; False where unsupported."},
    {"release", release, METH_NOARGS, "Drop the resident pages of empty pools but their headers; bytes dropped."},
    {"arenas", arenas, METH_NOARGS, "Arenas allocated since watch() and still alive."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_pools", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__pools(void)
{
    return PyModule_Create(&module);
}
