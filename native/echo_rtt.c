// SPDX-License-Identifier: Apache-2.0
/* A bare echo pair in C: round trips over one socket path with no interpreter in the way.
 *
 * The ADM comparison (loopback TCP vs a sockmap-redirected pair) is about the kernel's socket
 * path; a Python client and server add a fixed cost per round trip that dilutes the difference.
 * These two programs are the same on both paths, so their ratio is the path's.
 *
 *   echo_rtt serve PORT [HOST] [--busy] [--cpu N]
 *       listens on HOST:PORT (IPv4; default 127.0.0.1), prints READY, echoes each connection in
 *       turn, until killed.
 *   echo_rtt measure HOST PORT SIZE COUNT WARMUP [--busy] [--cpu N]
 *       SIZE-byte messages, one outstanding; prints the COUNT round trips in ns as a JSON list.
 *       HOST unix:PATH connects to that Unix socket instead (PORT is then ignored).
 *
 * --busy spins on readiness instead of sleeping in recv (no wake-up latency; costs a whole CPU
 * per end), --cpu pins the process to one CPU.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (1 << 16)

static int busy; /* MSG_DONTWAIT and spin, rather than block */

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A redirected socket's blocking recv can return EAGAIN when woken with nothing queued: retry. */
static int retry(ssize_t n)
{
	return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
}

/* Busy: spin on readiness (poll with no timeout), then read. A recv on a redirected socket runs
 * under the socket's lock, and the redirect into it takes that lock too (lock_sock, which sleeps
 * while the owner holds it; loopback TCP's softirq queues to the backlog instead): spinning in
 * recv made the sockmap pair several times slower than TCP, by the spinning, not the path. */
static ssize_t recv_some(int fd, char *buf, size_t len)
{
	ssize_t n;

	do {
		if (busy) {
			struct pollfd ready = { .fd = fd, .events = POLLIN };

			while (poll(&ready, 1, 0) == 0)
				;
		}
		n = recv(fd, buf, len, busy ? MSG_DONTWAIT : 0);
	} while (retry(n));
	return n;
}

static int send_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | (busy ? MSG_DONTWAIT : 0));

		if (retry(n))
			continue;
		if (n < 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static void nodelay(int fd)
{
	int one = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		die("TCP_NODELAY");
}

static struct sockaddr_in address(const char *host, const char *port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port)) };

	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "not an IPv4 address: %s\n", host);
		exit(2);
	}
	return sa;
}

static _Noreturn void serve(const char *port, const char *host)
{
	static char buf[BUF_SIZE];
	struct sockaddr_in sa = address(host, port);
	int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);

	if (listener < 0)
		die("socket");
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(listener, 16) < 0)
		die("bind/listen");
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		int conn = accept(listener, NULL, NULL);
		ssize_t n;

		if (conn < 0)
			die("accept");
		nodelay(conn);
		while ((n = recv_some(conn, buf, sizeof(buf))) > 0)
			if (send_all(conn, buf, (size_t)n) < 0)
				break;
		close(conn);
	}
}

/* A connected socket to HOST:PORT over TCP (no delay), or to the Unix socket HOST = unix:PATH. */
static int dial(const char *host, const char *port)
{
	int fd;

	if (strncmp(host, "unix:", 5) == 0) {
		struct sockaddr_un sun = { .sun_family = AF_UNIX };

		if (strlen(host + 5) >= sizeof(sun.sun_path)) {
			fprintf(stderr, "Unix socket path too long: %s\n", host + 5);
			exit(2);
		}
		strcpy(sun.sun_path, host + 5);
		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
			die("connect");
		return fd;
	}
	struct sockaddr_in sa = address(host, port);

	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	nodelay(fd);
	return fd;
}

static int measure(const char *host, const char *port, size_t size, long count, long warmup)
{
	char *out = malloc(size), *in = malloc(size);
	uint64_t *rtts = calloc((size_t)count, sizeof(*rtts));

	if (!out || !in || !rtts)
		die("malloc");
	int fd = dial(host, port);

	memset(out, 'p', size);
	for (long i = 0; i < warmup + count; i++) {
		uint64_t started = now_ns();
		size_t got = 0;

		if (send_all(fd, out, size) < 0)
			die("send");
		while (got < size) {
			ssize_t n = recv_some(fd, in + got, size - got);

			if (n <= 0) {
				fprintf(stderr, "echo closed after %zu of %zu bytes\n", got, size);
				return 1;
			}
			got += (size_t)n;
		}
		if (i >= warmup)
			rtts[i - warmup] = now_ns() - started;
	}
	close(fd);
	putchar('[');
	for (long i = 0; i < count; i++)
		printf(i ? ",%llu" : "%llu", (unsigned long long)rtts[i]);
	printf("]\n");
	return 0;
}

int main(int argc, char **argv)
{
	char *args[8];
	int nargs = 0;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--busy") == 0) {
			busy = 1;
		} else if (strcmp(argv[i], "--cpu") == 0 && i + 1 < argc) {
			cpu_set_t set;

			CPU_ZERO(&set);
			CPU_SET(atoi(argv[++i]), &set);
			if (sched_setaffinity(0, sizeof(set), &set) < 0)
				die("sched_setaffinity");
		} else if (nargs < 8) {
			args[nargs++] = argv[i];
		}
	}
	if ((nargs == 2 || nargs == 3) && strcmp(args[0], "serve") == 0)
		serve(args[1], nargs == 3 ? args[2] : "127.0.0.1");
	if (nargs == 6 && strcmp(args[0], "measure") == 0)
		return measure(args[1], args[2], (size_t)atol(args[3]), atol(args[4]), atol(args[5]));
	fprintf(stderr,
		"usage: echo_rtt serve PORT [HOST] [--busy] [--cpu N]\n"
		"       echo_rtt measure HOST PORT SIZE COUNT WARMUP [--busy] [--cpu N]\n");
	return 2;
}
