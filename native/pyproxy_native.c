/* Native I/O primitives for the proxy's relay: splice(2), MSG_ZEROCOPY sends
 * and completion reaping, and a fused recv+send. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <time.h>
#include <netinet/in.h>
#include <linux/errqueue.h>

#include "pyproxy_native.h"

/* Older libc headers lack these; the values are kernel ABI. */
#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif

/* SPLICE_F_NONBLOCK only makes the pipe side non-blocking; the socket side
 * follows the socket's own O_NONBLOCK, which the proxy always sets. */
#define PP_SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

ssize_t pp_splice_in(int sock_fd, int pipe_wr, size_t max)
{
    ssize_t n;
    do {
        n = splice(sock_fd, NULL, pipe_wr, NULL, max, PP_SPLICE_FLAGS);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t pp_splice_out(int pipe_rd, int sock_fd, size_t max)
{
    ssize_t n;
    do {
        n = splice(pipe_rd, NULL, sock_fd, NULL, max, PP_SPLICE_FLAGS);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int pp_pipe(int fds[2], int size)
{
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -errno;
    if (size > 0 && fcntl(fds[0], F_SETPIPE_SZ, size) < 0) {
        /* EPERM above pipe-max-size for unprivileged users: keep the pipe at
         * its default size rather than fail the connection. */
        if (errno != EPERM) {
            int err = errno;
            close(fds[0]);
            close(fds[1]);
            return -err;
        }
    }
    int cap = fcntl(fds[0], F_GETPIPE_SZ);
    if (cap < 0) {
        int err = errno;
        close(fds[0]);
        close(fds[1]);
        return -err;
    }
    return cap;
}

int pp_zc_enable(int fd)
{
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one)) < 0)
        return -errno;
    return 0;
}

ssize_t pp_zc_send(int fd, const char *buf, size_t len)
{
    ssize_t n;
    do {
        n = send(fd, buf, len, MSG_ZEROCOPY | MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t pp_send(int fd, const char *buf, size_t len)
{
    ssize_t n;
    do {
        n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

/* Reads up to max zerocopy notifications from the error queue. Each fills
 * lo[i]..hi[i] (inclusive send sequence numbers, u32 that wrap) and copied[i]
 * (1 when the kernel fell back to copying that range). Returns how many were
 * read: 0 when the queue is empty, -errno on a real error. Non-zerocopy
 * entries (e.g. ICMP errors) are consumed and skipped: the zerocopy socket
 * never asked for them, and leaving them would keep POLLERR raised. */
int pp_zc_reap(int fd, uint32_t *lo, uint32_t *hi, int *copied, int max)
{
    int count = 0;
    /* Room for one sock_extended_err plus its offender address, IPv4 or v6. */
    char control[CMSG_SPACE(sizeof(struct sock_extended_err) + sizeof(struct sockaddr_in6))];

    while (count < max) {
        struct msghdr msg;
        memset(&msg, 0, sizeof(msg));
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);

        ssize_t r = recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return count > 0 ? count : -errno;
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
                  (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
                continue;
            struct sock_extended_err serr;
            memcpy(&serr, CMSG_DATA(cm), sizeof(serr));
            if (serr.ee_origin != SO_EE_ORIGIN_ZEROCOPY || serr.ee_errno != 0)
                continue;
            lo[count] = serr.ee_info;
            hi[count] = serr.ee_data;
            copied[count] = (serr.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) ? 1 : 0;
            count++;
            break;
        }
    }
    return count;
}

/* One Python->C transition instead of two for a copying relay step: recv up
 * to len bytes into buf, then send as much of them as the peer takes.
 * Returns bytes received (0 = EOF, -errno on a recv error, -EAGAIN when
 * nothing was readable) and stores in *sent how many of them went out; the
 * caller owns buf[*sent:ret] and must flush it before the next call. A send
 * error other than EAGAIN is returned as -errno (the received bytes are then
 * lost with the connection, which is being torn down anyway). */
ssize_t pp_relay_copy(int in_fd, int out_fd, char *buf, size_t len, size_t *sent)
{
    ssize_t n;
    *sent = 0;
    do {
        n = recv(in_fd, buf, len, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n < 0 ? -errno : 0;

    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = send(out_fd, buf + off, (size_t)n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            *sent = off;
            return -errno;
        }
        off += (size_t)w;
    }
    *sent = off;
    return n;
}

int pp_heap_trim(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
    return 1;
#else
    return 0;
#endif
}

/* ---- whole relay steps (see pyproxy_native.h) ---------------------------- */

/* Python's handler of everything but the plain step (cffi extern "Python"). */
void pp_step_event(void *handle, int status); /* defined by the cffi module */

static inline int64_t pp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter_ns's clock on Linux */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* _received: the read's stage and counts; returns the clock after it (0 untimed). The write is
 * timed from there: the step's own work between the two calls is a few integer adds, less than
 * the clock read that would time it as `other` (the Python relay's work there is timed). */
static inline int64_t pp_received(struct pp_dir *d, ssize_t n, int64_t t0, int first)
{
    int64_t *b = d->block;
    int64_t t1 = 0;
    if (d->timed) {
        t1 = pp_now();
        b[d->read_ns] += t1 - t0;
        b[d->read_events] += 1;
        if (first)
            b[d->notify_events] += 1;
    }
    if (n == 0)
        return t1;
    b[d->rx] += n;
    if (d->messages >= 0)
        b[d->messages] += 1;
    return t1;
}

/* _sent: the write's stage and counts. */
static inline void pp_sent(struct pp_dir *d, ssize_t sent, int64_t t0)
{
    int64_t *b = d->block;
    if (d->timed) {
        b[d->write_ns] += pp_now() - t0;
        b[d->write_events] += 1;
    }
    b[d->tx] += sent;
    d->moved += sent;
}

static inline int pp_failed(struct pp_dir *d, int status, int err)
{
    d->err = err;
    pp_step_event(d->handle, status);
    return -1;
}

/* One side of a step: >= 0 bytes moved (0 from a read: EOF), or -errno. */
typedef ssize_t (*pp_step_io)(struct pp_dir *d, struct pp_scratch *s, size_t n);

static inline ssize_t pp_recv_into(struct pp_dir *d, struct pp_scratch *s, size_t max)
{
    ssize_t n;
    do {
        n = recv(d->src_fd, s->buf, max, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

static inline ssize_t pp_send_on(struct pp_dir *d, struct pp_scratch *s, size_t n)
{
    return pp_send(d->dst_fd, s->buf, n);
}

static inline ssize_t pp_splice_into(struct pp_dir *d, struct pp_scratch *s, size_t max)
{
    return pp_splice_in(d->src_fd, s->pipe_wr, max);
}

static inline ssize_t pp_splice_on(struct pp_dir *d, struct pp_scratch *s, size_t n)
{
    return pp_splice_out(s->pipe_rd, d->dst_fd, n);
}

/* The step itself; `in` and `out` are constants at each call site, so each inlines. */
static inline void pp_step(struct pp_dir *d, pp_step_io in, pp_step_io out)
{
    for (int round = 0; round < PP_STEP_ROUNDS; round++) {
        struct pp_scratch *s = d->scratch; /* Python may swap the top in an event */
        if (s->len == 0) {                  /* Python could not make a new top */
            pp_failed(d, PP_STEP_SRC_FAILED, EBADF);
            return;
        }
        int64_t t0 = d->timed ? pp_now() : 0;
        ssize_t n = in(d, s, s->len);
        if (n < 0) {
            if (n != -EAGAIN)
                pp_failed(d, PP_STEP_SRC_FAILED, (int)-n);
            return;
        }
        int64_t t2 = pp_received(d, n, t0, round == 0);
        if (n == 0) {
            pp_step_event(d->handle, PP_STEP_EOF);
            return;
        }
        ssize_t w = out(d, s, (size_t)n);
        if (w < 0) {
            if (w != -EAGAIN) {
                d->got = n; /* still in the scratch (a pipe keeps it): Python takes it out */
                d->sent = 0;
                pp_failed(d, PP_STEP_DST_FAILED, (int)-w);
                return;
            }
            w = 0;
        }
        pp_sent(d, w, t2);
        if (w < n) {
            d->got = n;
            d->sent = w;
            pp_step_event(d->handle, PP_STEP_PARKED);
            return;
        }
        if ((size_t)n < s->len)
            return; /* the source is very likely drained: no extra read to learn EAGAIN */
    }
}

void pp_copy_step(struct pp_dir *d)
{
    pp_step(d, pp_recv_into, pp_send_on);
}

void pp_splice_step(struct pp_dir *d)
{
    pp_step(d, pp_splice_into, pp_splice_on);
}

/* ---- the copy step armed on libuv (see pyproxy_native.h) ------------------ */

/* The libuv calls used, with their ABI spelled out here: the loop's libuv is the one uvloop
 * links in and exports; no header of ours has to match its version. */
typedef void (*pp_uv_poll_cb)(void *poll, int status, int events);
typedef void (*pp_uv_close_cb)(void *handle);
static struct {
    int (*poll_init)(void *loop, void *poll, int fd);
    int (*poll_start)(void *poll, int events, pp_uv_poll_cb cb);
    void (*close)(void *handle, pp_uv_close_cb cb);
    size_t (*handle_size)(int type);
    size_t poll_size;
} pp_uv;
enum { PP_UV_POLL = 8, PP_UV_READABLE = 1 }; /* uv_handle_type UV_POLL, uv_poll_event */

int pp_uv_bind(const char *module_path)
{
    void *module = dlopen(module_path, RTLD_NOW | RTLD_NOLOAD);
    if (module == NULL)
        return -1;
    pp_uv.poll_init = (int (*)(void *, void *, int))dlsym(module, "uv_poll_init");
    pp_uv.poll_start = (int (*)(void *, int, pp_uv_poll_cb))dlsym(module, "uv_poll_start");
    pp_uv.close = (void (*)(void *, pp_uv_close_cb))dlsym(module, "uv_close");
    pp_uv.handle_size = (size_t(*)(int))dlsym(module, "uv_handle_size");
    if (!pp_uv.poll_init || !pp_uv.poll_start || !pp_uv.close || !pp_uv.handle_size) {
        pp_uv.poll_start = NULL;
        return -1;
    }
    /* The direction's pointer goes right after the handle, aligned for a pointer. */
    pp_uv.poll_size = (pp_uv.handle_size(PP_UV_POLL) + sizeof(void *) - 1) & ~(sizeof(void *) - 1);
    return 0;
}

static inline struct pp_dir **pp_poll_owner(void *poll)
{
    return (struct pp_dir **)((char *)poll + pp_uv.poll_size);
}

static void pp_poll_ready(void *poll, int status, int events)
{
    pp_copy_step(*pp_poll_owner(poll)); /* an error status: the step's recv reports it */
}

int pp_poll_read(struct pp_dir *d, void *uv_loop)
{
    if (pp_uv.poll_start == NULL)
        return -ENOSYS;
    if (d->poll == NULL) {
        void *poll = calloc(1, pp_uv.poll_size + sizeof(struct pp_dir *));
        if (poll == NULL)
            return -ENOMEM;
        int err = pp_uv.poll_init(uv_loop, poll, d->src_fd);
        if (err < 0) {
            free(poll);
            return err;
        }
        *pp_poll_owner(poll) = d;
        d->poll = poll;
    }
    return pp_uv.poll_start(d->poll, PP_UV_READABLE, pp_poll_ready);
}

void pp_poll_close(struct pp_dir *d)
{
    if (d->poll != NULL) {
        pp_uv.close(d->poll, free); /* stops it and forgets the fd now; frees it later */
        d->poll = NULL;
    }
}

/* ---- the wasm host's epoch ticker ---------------------------------------------------------- */

struct pp_ticker {
    void (*tick)(void *engine);
    void *engine;
    struct timespec period;
};

static void *pp_ticker_run(void *arg)
{
    struct pp_ticker *t = arg;
    for (;;) {
        /* EINTR only shortens one period: a tick early is harmless. */
        nanosleep(&t->period, NULL);
        t->tick(t->engine);
    }
    return NULL;
}

int pp_ticker_start(uintptr_t tick, uintptr_t engine, unsigned int period_ms)
{
    struct pp_ticker *t = malloc(sizeof *t);  /* the thread's for good: it never ends */
    if (t == NULL)
        return -ENOMEM;
    t->tick = (void (*)(void *))tick;
    t->engine = (void *)engine;
    t->period.tv_sec = period_ms / 1000;
    t->period.tv_nsec = (long)(period_ms % 1000) * 1000000L;
    pthread_attr_t attr;
    pthread_t thread;
    int err = pthread_attr_init(&attr);
    if (err == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        err = pthread_create(&thread, &attr, pp_ticker_run, t);
        pthread_attr_destroy(&attr);
    }
    if (err != 0) {
        free(t);
        return -err;
    }
    return 0;
}
