// SPDX-License-Identifier: Apache-2.0
/* The sockmap fast path for the app<->sidecar leg (ipc: sockmap).
 *
 * pp_sockops runs on the pod's cgroup: when a connection to one of the
 * sidecar's listener ports is established inside the pod's network namespace,
 * both of its sockets are recorded in pp_socks, keyed by their own 4-tuple.
 * pp_sk_msg runs on every sendmsg of a recorded socket and hands the payload
 * straight to the peer socket's receive queue (bpf_msg_redirect_hash with
 * BPF_F_INGRESS), so it never crosses the loopback TCP/IP stack.
 *
 * Only connections whose both ends are recorded are redirected: the sidecar's
 * (passive) end is recorded only when it was accepted on a registered port
 * and its peer was recorded first, i.e. the peer is a socket of a process in
 * this pod's cgroup. Anything else takes the ordinary TCP path.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define LOOPBACK_NET 0x7f000000 /* 127.0.0.0/8, host order */

struct sock_key {
	__u32 local_ip4;   /* network order, as the kernel stores it */
	__u32 remote_ip4;
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};

/* Per sidecar listener port: how many connections took the fast path and how many did not. */
struct port_stats {
	__u64 redirected;
	__u64 bypassed;
};

enum { STAT_MSGS_REDIRECTED, STAT_BYTES_REDIRECTED, STAT_MSGS_PASSED, STAT_COUNT };

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} pp_socks SEC(".maps");

/* App sockets recorded by the active callback and not yet matched by the sidecar's accept: a
 * sockmap lookup from sock_ops would take a reference it cannot release. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u8);
} pp_apps SEC(".maps");

/* The sidecar's listener ports (host order), written by the loader; the values are counters. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct port_stats);
} pp_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} pp_stats SEC(".maps");

static __always_inline void count(__u32 which, __u64 amount)
{
	__u64 *slot = bpf_map_lookup_elem(&pp_stats, &which);

	if (slot)
		*slot += amount; /* per-CPU slot: no atomics needed */
}

static __always_inline int same_host(__u32 local_ip4, __u32 remote_ip4)
{
	/* Loopback, or the pod's own address talking to itself: both stay on lo. */
	return local_ip4 == remote_ip4 ||
	       ((bpf_ntohl(local_ip4) & 0xff000000) == LOOPBACK_NET &&
		(bpf_ntohl(remote_ip4) & 0xff000000) == LOOPBACK_NET);
}

SEC("sockops")
int pp_sockops(struct bpf_sock_ops *ops)
{
	struct sock_key key, peer;
	__u8 one = 1;
	struct port_stats *stats;
	__u8 *app;
	__u32 port;

	if (ops->family != AF_INET)
		return 1;
	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!same_host(ops->local_ip4, ops->remote_ip4))
		return 1;
	key.local_ip4 = ops->local_ip4;
	key.remote_ip4 = ops->remote_ip4;
	key.local_port = ops->local_port;
	key.remote_port = bpf_ntohl(ops->remote_port);

	if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		/* The app's end of a connection to the sidecar. */
		port = key.remote_port;
		if (bpf_map_lookup_elem(&pp_ports, &port) &&
		    bpf_sock_hash_update(ops, &pp_socks, &key, BPF_ANY) == 0)
			bpf_map_update_elem(&pp_apps, &key, &one, BPF_ANY);
		return 1;
	}
	/* The sidecar's end: record it only if its peer is a recorded app socket. On loopback the
	 * client's ESTABLISHED (SYN-ACK received) runs before the server's (ACK received). */
	port = key.local_port;
	stats = bpf_map_lookup_elem(&pp_ports, &port);
	if (!stats)
		return 1;
	peer.local_ip4 = key.remote_ip4;
	peer.remote_ip4 = key.local_ip4;
	peer.local_port = key.remote_port;
	peer.remote_port = key.local_port;
	app = bpf_map_lookup_elem(&pp_apps, &peer);
	if (app)
		bpf_map_delete_elem(&pp_apps, &peer); /* one accept per app connection */
	if (app && bpf_sock_hash_update(ops, &pp_socks, &key, BPF_ANY) == 0)
		__sync_fetch_and_add(&stats->redirected, 1);
	else
		__sync_fetch_and_add(&stats->bypassed, 1);
	return 1;
}

SEC("sk_msg")
int pp_sk_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {
		.local_ip4 = msg->remote_ip4,
		.remote_ip4 = msg->local_ip4,
		.local_port = bpf_ntohl(msg->remote_port),
		.remote_port = msg->local_port,
	};
	__u64 size = msg->size;

	/* A failed redirect (no peer recorded) returns SK_DROP; pass the data on normally instead. */
	if (bpf_msg_redirect_hash(msg, &pp_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_MSGS_REDIRECTED, 1);
		count(STAT_BYTES_REDIRECTED, size);
		return SK_PASS;
	}
	count(STAT_MSGS_PASSED, 1);
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
