"""cffi build scripts (API mode) for pyproxy.native._native and ._bpf, run by setup.py's cffi_modules."""

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
int pp_heap_trim(void);
int pp_ticker_start(uintptr_t tick, uintptr_t engine, unsigned int period_ms);
extern "Python+C" void pp_step_event(void *handle, int status);
"""
# The relay step's constants, structs and functions, as the header declares them.
with open(os.path.join(_HERE, "pyproxy_native.h")) as _header:
    CDEF += (
        _header.read().split("/* cdef: begin", 1)[1].split("*/", 1)[1].split("/* cdef: end */")[0]
    )


def _builder(
    module: str, cdef: str, includes: str, sources: tuple[str, ...], libraries: tuple = ()
) -> FFI:
    builder = FFI()
    builder.cdef(cdef)
    builder.set_source(
        f"pyproxy.native.{module}",
        includes,
        # setuptools wants paths relative to the project root (the cwd of setup.py);
        # relpath keeps this working when the script is run from elsewhere too.
        sources=[os.path.relpath(os.path.join(_HERE, source)) for source in sources],
        include_dirs=[os.path.relpath(_HERE)],
        libraries=list(libraries),
        depends=[
            os.path.relpath(os.path.join(_HERE, header))
            for header in (
                "protocol_facts.h",
                "http1_scan.h",
                "h2_codec.h",
                "h2_lane.h",
                "grpc_lane.h",
                "lane_fields.h",
                "h2_taker.h",
                "grow_buf.h",
            )
        ],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return builder


ffibuilder = _builder("_native", CDEF, '#include "pyproxy_native.h"', ("pyproxy_native.c",))

# The eBPF loader's view of libbpf (Debian's libbpf-dev): open/load an object, pin, attach,
# read and write maps. Built separately so a host without libbpf still gets _native.
BPF_CDEF = """
enum bpf_attach_type {
    BPF_CGROUP_SOCK_OPS, BPF_SK_MSG_VERDICT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, ...
};
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
const char *bpf_program__name(const struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
int bpf_map__fd(const struct bpf_map *map);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_prog_attach(int prog_fd, int attachable_fd, enum bpf_attach_type type, unsigned int flags);
int bpf_prog_detach2(int prog_fd, int attachable_fd, enum bpf_attach_type type);
int bpf_link_create(int prog_fd, int target_fd, enum bpf_attach_type attach_type, const void *opts);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int libbpf_num_possible_cpus(void);
void pp_bpf_log_start(void);
const char *pp_bpf_log(void);
"""

bpf_ffibuilder = _builder(
    "_bpf",
    BPF_CDEF,
    '#include <bpf/libbpf.h>\n#include <bpf/bpf.h>\n#include "pyproxy_bpf.h"',
    ("pyproxy_bpf.c",),
    libraries=("bpf",),
)


def _declarations(header: str) -> str:
    """A header as cffi reads it: no include guard or #include lines (its constants stay)."""
    with open(os.path.join(_HERE, header)) as lines:
        skipped = ("#ifndef", "#endif", "#include", "#define PYPROXY_")
        return "".join(line for line in lines if not line.startswith(skipped))


# The native HTTP/2 codec over Debian's libnghttp2 (libnghttp2-dev), and the HTTP/2 lane on it;
# their headers are the cdef.
H2_CDEF = _declarations("h2_codec.h") + _declarations("h2_lane.h") + _declarations("grpc_lane.h")
H2_CDEF += "const char *nghttp2_strerror(int lib_error_code);\n"

h2_ffibuilder = _builder(
    "_h2",
    H2_CDEF,
    '#include <nghttp2/nghttp2.h>\n#include "h2_codec.h"\n#include "h2_lane.h"\n#include "grpc_lane.h"',
    ("h2_codec.c", "h2_lane.c", "grpc_lane.c"),
    libraries=("nghttp2",),
)

if __name__ == "__main__":
    # Manual build for development: drops the modules next to this file. The sources include
    # protocol_facts.h: write it first (PYTHONPATH=. python native/facts_header.py; setup.py does).
    for builder in (ffibuilder, bpf_ffibuilder, h2_ffibuilder):
        builder.compile(tmpdir=os.path.join(_HERE, "..", "build", "native"), verbose=True)
