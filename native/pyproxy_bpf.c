/* See pyproxy_bpf.h. */
#include "pyproxy_bpf.h"

#include <stdarg.h>
#include <stdio.h>
#include <bpf/libbpf.h>

/* Large enough for a verifier log of the programs in native/ (a few KB). */
static char log_buf[256 * 1024];
static size_t log_len;

static int collect(enum libbpf_print_level level, const char *format, va_list args)
{
	int n;

	if (level == LIBBPF_DEBUG || log_len >= sizeof(log_buf) - 1)
		return 0;
	n = vsnprintf(log_buf + log_len, sizeof(log_buf) - log_len, format, args);
	if (n > 0)
		log_len += (size_t)n < sizeof(log_buf) - log_len ? (size_t)n : sizeof(log_buf) - 1 - log_len;
	return n;
}

void pp_bpf_log_start(void)
{
	log_len = 0;
	log_buf[0] = '\0';
	libbpf_set_print(collect);
}

const char *pp_bpf_log(void)
{
	return log_buf;
}
