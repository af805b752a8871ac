"""cffi build script (API mode) for pyproxy.native._native, run by setup.py's cffi_modules."""

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
ssize_t pp_splice_in(int sock_fd, int pipe_wr, size_t max);
ssize_t pp_splice_out(int pipe_rd, int sock_fd, size_t max);
int pp_pipe(int fds[2], int size);
int pp_zc_enable(int fd);
ssize_t pp_zc_send(int fd, const char *buf, size_t len);
int pp_zc_reap(int fd, uint32_t *lo, uint32_t *hi, int *copied, int max);
ssize_t pp_send(int fd, const char *buf, size_t len);
ssize_t pp_relay_copy(int in_fd, int out_fd, char *buf, size_t len, size_t *sent);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyproxy.native._native",
    '#include "pyproxy_native.h"',
    # setuptools wants paths relative to the project root (the cwd of setup.py);
    # relpath keeps this working when the script is run from elsewhere too.
    sources=[os.path.relpath(os.path.join(_HERE, "pyproxy_native.c"))],
    include_dirs=[os.path.relpath(_HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    # Manual build for development: drops the module next to this file.
    ffibuilder.compile(tmpdir=os.path.join(_HERE, "..", "build", "native"), verbose=True)
