/* Declarations of the native I/O primitives; every call is non-blocking and
 * returns -errno instead of raising so the Python hot path stays one cheap call. */
#ifndef PYPROXY_NATIVE_H
#define PYPROXY_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* splice relay: socket -> pipe, pipe -> socket. >0 bytes moved; 0 from
 * pp_splice_in means the peer closed (EOF); -EAGAIN means would block (no
 * data, pipe full, pipe empty or socket send buffer full); else -errno. */
ssize_t pp_splice_in(int sock_fd, int pipe_wr, size_t max);
ssize_t pp_splice_out(int pipe_rd, int sock_fd, size_t max);
/* pipe2(O_NONBLOCK|O_CLOEXEC) resized to size bytes (size <= 0 keeps the
 * default). Returns the capacity the kernel granted, or -errno. */
int pp_pipe(int fds[2], int size);

/* MSG_ZEROCOPY. pp_zc_enable sets SO_ZEROCOPY (0 or -errno). pp_zc_send
 * returns bytes queued (each call that queues >= 1 byte takes the socket's
 * next sequence number, from 0; a failed call takes none), -ENOBUFS when the
 * socket's option memory is used up (reap, then retry or send by copy),
 * -EAGAIN when the send buffer is full. buf must stay untouched until a
 * completion covering its sequence number has been reaped. */
int pp_zc_enable(int fd);
ssize_t pp_zc_send(int fd, const char *buf, size_t len);
/* Reads up to max completions into lo[i]..hi[i] (inclusive, wrapping u32)
 * and copied[i]; returns how many, 0 if none, -errno on error. */
int pp_zc_reap(int fd, uint32_t *lo, uint32_t *hi, int *copied, int max);

/* plain non-blocking send, the copy path a zerocopy caller falls back to */
ssize_t pp_send(int fd, const char *buf, size_t len);
/* recv into buf then send it on in one C call; see pyproxy_native.c */
ssize_t pp_relay_copy(int in_fd, int out_fd, char *buf, size_t len, size_t *sent);

/* malloc_trim(0) where the C library has it (glibc): returns free heap pages,
 * including whole free pages inside the arenas, to the OS. 1 if it ran, 0 if
 * this libc has no malloc_trim. */
int pp_heap_trim(void);
/* A detached thread that calls tick(engine) every period_ms until the process
 * ends, never holding the GIL: the wasm host's epoch ticker (tick is wasmtime's
 * wasmtime_engine_increment_epoch, engine a handle of its own that is never
 * freed). Both are addresses, passed as integers. 0, or -errno if no thread. */
int pp_ticker_start(uintptr_t tick, uintptr_t engine, unsigned int period_ms);

/* One readiness callback of a TCP-mode relay direction, whole, in C: the event
 * loop calls pp_copy_step(dir) / pp_splice_step(dir) directly when dir->src_fd
 * is readable. It reads into the worker's shared buffer or pipe (dir->scratch),
 * writes what it read to dst_fd at once, keeps the stage clock and byte
 * counters in the listener's int64 block as the Python relay does
 * (pyproxy/io/relay.py: _received/_sent; `other` stays untimed, see
 * pp_received), and goes again while a read filled
 * the whole buffer (at most PP_STEP_ROUNDS reads per wake-up). Anything else
 * is handed to Python through pp_step_event(dir->handle, status):
 *   PP_STEP_PARKED      dst took dir->sent of dir->got bytes; the rest is still
 *                       in the scratch buffer or pipe, which Python now keeps
 *   PP_STEP_EOF         src closed (the read is accounted)
 *   PP_STEP_SRC_FAILED  the read failed with dir->err (nothing accounted)
 *   PP_STEP_DST_FAILED  the write failed with dir->err (the read is accounted);
 *                       its dir->got bytes are still in the scratch buffer or pipe
 * Slots are block indices (dir->messages < 0: this direction counts none). */
/* cdef: begin (build_native.py hands this part to cffi as it is) */
enum { PP_STEP_PARKED = 1, PP_STEP_EOF, PP_STEP_SRC_FAILED, PP_STEP_DST_FAILED };
#define PP_STEP_ROUNDS 16

struct pp_scratch {
    char *buf;      /* copy: the buffer every direction reads into next */
    size_t len;     /* its size, or the pipe's capacity */
    int pipe_rd;    /* splice: the pipe every direction splices into next */
    int pipe_wr;
};

struct pp_dir {
    int src_fd, dst_fd;
    struct pp_scratch *scratch;
    int64_t *block;
    int timed;
    int read_ns, read_events, write_ns, write_events, notify_events;
    int rx, tx, messages;
    int64_t moved;  /* bytes written, for the idle check */
    int64_t got, sent;
    int err;
    void *handle;
    void *poll;     /* the libuv poll that runs the copy step, while pp_poll_read armed one */
};

void pp_copy_step(struct pp_dir *dir);
void pp_splice_step(struct pp_dir *dir);

/* The copy step armed on the event loop's own libuv (uvloop's), so a readable socket runs the
 * step from libuv's poll callback with no Python call, no cffi call and no GIL in between.
 * pp_uv_bind resolves the few libuv functions used from the loop's module (a shared object
 * already loaded; 0, or -1 when one is missing). pp_poll_read starts a readable poll on
 * dir->src_fd whose callback is pp_copy_step(dir) (0, or a negative libuv error: the caller
 * then arms the reader through the loop as usual); pp_poll_close closes it (at once: the fd
 * may be closed or watched by the loop right after). The poll keeps its handle's `data`
 * NULL, so a loop closed with one still open reports it instead of taking it for its own. */
int pp_uv_bind(const char *module_path);
int pp_poll_read(struct pp_dir *dir, void *uv_loop);
void pp_poll_close(struct pp_dir *dir);
/* cdef: end */

#endif
