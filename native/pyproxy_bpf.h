/* libbpf glue for the eBPF loader (pyproxy.native._bpf): libbpf's log captured for Python.
 *
 * libbpf reports through a printf-style callback (a va_list cffi cannot take); these
 * functions collect what it prints, the kernel verifier's log included, into a buffer the
 * loader shows when a load fails.
 */
#ifndef PYPROXY_BPF_H
#define PYPROXY_BPF_H

#include <stddef.h>

/* Start collecting libbpf's messages (clears the buffer). */
void pp_bpf_log_start(void);
/* What was collected since pp_bpf_log_start (NUL-terminated, truncated at the buffer's end). */
const char *pp_bpf_log(void);

#endif
