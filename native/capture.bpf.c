// SPDX-License-Identifier: Apache-2.0
/* Outbound capture without iptables (pyproxy capture apply --mode ebpf).
 *
 * pp_connect4/pp_connect6 run on the pod's cgroup at every connect(): a TCP connect by
 * anyone but the proxy's uid/gid to a destination that is not excluded is rewritten to the
 * sidecar's outbound port on loopback, and the original destination is kept under the
 * socket's cookie. When that connection is established, pp_cap_sockops files the original
 * destination under the app socket's own address (what the sidecar sees as its peer), where
 * the sidecar reads it instead of SO_ORIGINAL_DST. Addresses are 16 bytes throughout, IPv4 as
 * IPv4-mapped IPv6 (::ffff:a.b.c.d), so both families share one map.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define CTX32(field) (*(volatile __u32 *)&(field))

struct endpoint {
	__u32 addr[4]; /* network order; IPv4 as ::ffff:a.b.c.d */
	__u32 port;    /* host order */
};

struct capture_config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u32 match_gid;     /* 0: only the uid is excluded */
	__u32 outbound_port; /* host order */
	__u32 all_ports;     /* 0: only the ports in pp_cap_ports are captured */
};

struct cidr_key {
	__u32 prefixlen; /* of the 128-bit address (IPv4 prefixes + 96) */
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config);
} pp_cap_config SEC(".maps");

/* Destination ports: 1 = capture (when not all_ports), 2 = never capture. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} pp_cap_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u32);
} pp_cap_exclude SEC(".maps");

/* socket cookie -> original destination, between connect() and ESTABLISHED. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct endpoint);
} pp_cap_pending SEC(".maps");

/* The app socket's address (the sidecar's peer) -> original destination. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint);
	__type(value, struct endpoint);
} pp_cap_orig SEC(".maps");

#define PORT_CAPTURE 1
#define PORT_EXCLUDE 2

static __always_inline int should_capture(struct capture_config *cfg, struct endpoint *dst)
{
	__u64 ids = bpf_get_current_uid_gid();
	struct cidr_key cidr = { .prefixlen = 128 };
	__u32 *port_rule;

	if ((__u32)ids == cfg->proxy_uid || (cfg->match_gid && (__u32)(ids >> 32) == cfg->proxy_gid))
		return 0; /* the sidecar's own connections */
	port_rule = bpf_map_lookup_elem(&pp_cap_ports, &dst->port);
	if (port_rule && *port_rule == PORT_EXCLUDE)
		return 0;
	if (!cfg->all_ports && !port_rule)
		return 0;
	__builtin_memcpy(cidr.addr, dst->addr, sizeof(cidr.addr));
	return bpf_map_lookup_elem(&pp_cap_exclude, &cidr) == NULL;
}

static __always_inline int is_v4_mapped(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

static __always_inline int is_loopback(const __u32 *addr)
{
	if (is_v4_mapped(addr))
		return (bpf_ntohl(addr[3]) >> 24) == 127;
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* Remember where the socket was headed; 1 when the connect is to be rewritten. */
static __always_inline int divert(struct bpf_sock_addr *ctx, struct endpoint *dst,
				  struct capture_config **cfg_out)
{
	__u32 zero = 0;
	struct capture_config *cfg = bpf_map_lookup_elem(&pp_cap_config, &zero);
	__u64 cookie;

	if (!cfg || ctx->type != SOCK_STREAM || is_loopback(dst->addr) || !should_capture(cfg, dst))
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&pp_cap_pending, &cookie, dst, BPF_ANY) != 0)
		return 0; /* without the record the sidecar could not route it: leave it alone */
	*cfg_out = cfg;
	return 1;
}

SEC("cgroup/connect4")
int pp_connect4(struct bpf_sock_addr *ctx)
{
	struct endpoint dst = {
		.addr = { 0, 0, bpf_htonl(0xffff), ctx->user_ip4 },
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	struct capture_config *cfg;

	if (divert(ctx, &dst, &cfg)) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
	}
	return 1;
}

SEC("cgroup/connect6")
int pp_connect6(struct bpf_sock_addr *ctx)
{
	struct endpoint dst = {
		.addr = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] },
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	struct capture_config *cfg;

	if (divert(ctx, &dst, &cfg)) {
		if (is_v4_mapped(dst.addr)) {
			ctx->user_ip6[3] = bpf_htonl(0x7f000001); /* ::ffff:127.0.0.1 */
		} else {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = bpf_htonl(1); /* ::1 */
		}
		ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
	}
	return 1;
}

SEC("sockops")
int pp_cap_sockops(struct bpf_sock_ops *ops)
{
	struct endpoint app = { .port = ops->local_port };
	struct endpoint *dst;
	__u64 cookie;

	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	cookie = bpf_get_socket_cookie(ops);
	dst = bpf_map_lookup_elem(&pp_cap_pending, &cookie);
	if (!dst)
		return 1;
	/* Every context field read once, unconditionally and 4 bytes at a time: the verifier
	 * refuses the offset context pointer or the merged 8-byte load the compiler would make. */
	__u32 family = CTX32(ops->family), ip4 = CTX32(ops->local_ip4);
	__u32 ip6[4] = { CTX32(ops->local_ip6[0]), CTX32(ops->local_ip6[1]),
			 CTX32(ops->local_ip6[2]), CTX32(ops->local_ip6[3]) };

	if (family == AF_INET) {
		app.addr[2] = bpf_htonl(0xffff);
		app.addr[3] = ip4;
	} else {
		__builtin_memcpy(app.addr, ip6, sizeof(app.addr));
	}
	bpf_map_update_elem(&pp_cap_orig, &app, dst, BPF_ANY);
	bpf_map_delete_elem(&pp_cap_pending, &cookie);
	return 1;
}

char _license[] SEC("license") = "GPL";
