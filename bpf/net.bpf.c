/* SPDX-License-Identifier: GPL-2.0 */
/*
 * net.bpf.c - outbound connection control.
 *
 * Compiled after guard_maps.h (the loader puts '#include "guard_maps.h"' first).
 *
 *   guard_connect4 / guard_connect6   cgroup/connect4|6: TCP connect, connected UDP
 *   guard_sendmsg4 / guard_sendmsg6   cgroup/sendmsg4|6: unconnected UDP datagrams
 *   guard_egress                      cgroup_skb/egress: every packet a local socket
 *                                     sends, so that a connection established while
 *                                     allowed stops once a deny is applied
 *
 * One decision for all of them (guard_net_decide):
 *   slot    = guard_config[0].active_slot, read once
 *   ruleset = the deepest scoped cgroup of the actor (task, or the skb's socket),
 *             through the scope cache of guard_maps.h (one lookup per decision;
 *             the ancestor walk only for a cgroup not seen since the last reload)
 *   table   = LPM lookup {32 + addrbits, be32(ruleset), addr}   (one lookup, any
 *             number of prefixes)
 *   verdict = the first line of port table (table + slot * GUARD_MAX_PORT_TABLES)
 *             matching (proto, port); the compiler made every table complete,
 *             so the ruleset's egress default decides only when no prefix at all
 *             matched (or the table is missing, which user space never leaves).
 * No scope, or a ruleset without egress section: allowed, nothing reported, and
 * nothing else done (no socket storage, no packet parsing). "Without egress
 * section" is read from the ruleset's egress default: the compiler gives every
 * ruleset with an egress section a default and no other ruleset a network entry
 * (guard/compile.py, _ruleset_tables and ruleset_defaults).
 * IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are decided as IPv4.
 *
 * Which TCP packets the egress program judges: those of sockets that connected
 * through guard_connect4/6 and were let through (they are marked in socket
 * storage), whether or not a policy covered the process then, so that a policy
 * applied later cuts the connections it denies. Packets of accepted connections
 * and listeners (SYN-ACKs, replies to clients) are not outbound connections and
 * pass; so do packets of TCP connections made before guard was loaded. Creating
 * the socket storage is most of an uncovered connect's cost (~0.8 us of ~1 us
 * measured on the host), the price of that guarantee; UDP connects are not
 * marked, as every other IP packet (UDP, ICMP, ...) is judged,
 * as the sendmsg hooks would judge it. Non-first fragments carry no ports and
 * pass: their first fragment was judged.
 *
 * Structs are zero-initialised and then assigned, never given constant
 * initialisers: LLVM turns those into copies from .rodata, which bcc cannot
 * relocate, and the code using them silently went missing (bcc 0.26, LLVM 14).
 *
 * Events: every deny / audit / would-deny from connect and sendmsg (user space
 * aggregates repeats). From egress only denials are reported (audited traffic
 * was reported when its socket connected or sent), and at most one event per
 * (ruleset, family, proto, addr, port) per second: the packets in between are
 * counted in the fold map and in GUARD_STAT_SUPPRESSED, and the next event of
 * that key carries them in ``count``.
 */

#define GUARD_AF_INET          2
#define GUARD_AF_INET6         10
#define GUARD_ETH_P_IP         0x0800
#define GUARD_ETH_P_IPV6       0x86DD
#define GUARD_IPPROTO_TCP      6
#define GUARD_IPPROTO_UDP      17
#define GUARD_SOCK_STREAM      1
#define GUARD_NET_FOLD_NS      1000000000ULL  /* one egress event per key per second */
#define GUARD_NET_FOLD_ENTRIES 16384
#define GUARD_NET_IPV6_EXT_MAX 4              /* IPv6 extension headers skipped */

struct guard_net_dest {
	__u8  family;               /* GUARD_AF_INET / GUARD_AF_INET6, after unmapping */
	__u8  proto;
	__u16 port;                 /* host byte order */
	__u8  addr[16];             /* IPv4 in the first 4 bytes, network order */
};

/* Who connected a socket: skb egress runs in any context (softirq, timers), so
 * the process fields of its events come from here, recorded at connect. */
struct guard_net_owner {
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 outbound;             /* 1: the socket connected through guard_connect4/6 */
	char  comm[GUARD_COMM_LEN];
};

struct guard_net_fold_key {
	__u32 ruleset;
	__u8  family;
	__u8  proto;
	__u16 port;
	__u8  addr[16];
};

struct guard_net_fold {
	__u64 last_ns;              /* when the last event of this key was sent */
	__u64 suppressed;           /* packets since then */
};

BPF_SK_STORAGE(guard_net_owners, struct guard_net_owner);
BPF_TABLE("lru_hash", struct guard_net_fold_key, struct guard_net_fold, guard_net_folds,
	  GUARD_NET_FOLD_ENTRIES);

static __always_inline __u32 guard_be32(__u32 x)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return __builtin_bswap32(x);
#else
	return x;
#endif
}

static __always_inline __u16 guard_be16(__u16 x)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return __builtin_bswap16(x);
#else
	return x;
#endif
}

/* ::ffff:a.b.c.d becomes a.b.c.d; words are in network order. */
static __always_inline void guard_net_dest6(struct guard_net_dest *d, __u32 w0, __u32 w1,
					    __u32 w2, __u32 w3)
{
	if (w0 == 0 && w1 == 0 && w2 == guard_be32(0x0000ffff)) {
		d->family = GUARD_AF_INET;
		__builtin_memcpy(&d->addr[0], &w3, 4);
		return;
	}
	d->family = GUARD_AF_INET6;
	__builtin_memcpy(&d->addr[0], &w0, 4);
	__builtin_memcpy(&d->addr[4], &w1, 4);
	__builtin_memcpy(&d->addr[8], &w2, 4);
	__builtin_memcpy(&d->addr[12], &w3, 4);
}

/*
 * The decision for one destination, or 0 when nothing decides (allow, silent).
 * ``ruleset`` is slot-qualified.
 */
static __always_inline int guard_net_decide(__u32 slot, int ruleset, struct guard_net_dest *d,
					    struct guard_decision *out)
{
	__u32 *table;

	if (d->family == GUARD_AF_INET) {
		struct guard_net4_key key = {};

		key.prefixlen = 32 + 32;
		key.ruleset = guard_be32((__u32)ruleset);
		__builtin_memcpy(key.addr, d->addr, 4);
		table = guard_net4.lookup(&key);
	} else {
		struct guard_net6_key key = {};

		key.prefixlen = 32 + 128;
		key.ruleset = guard_be32((__u32)ruleset);
		__builtin_memcpy(key.addr, d->addr, 16);
		table = guard_net6.lookup(&key);
	}
	if (table) {
		__u32 id = *table + slot * GUARD_MAX_PORT_TABLES;
		struct guard_port_table *t = guard_port_tables.lookup(&id);

		if (t) {
			__u32 count = t->count;

			for (int i = 0; i < GUARD_MAX_PORT_LINES; i++) {
				struct guard_port_line *line = &t->lines[i];

				if (i >= count)
					break;
				if (line->proto && line->proto != d->proto)
					continue;
				if (d->port < line->first || d->port > line->last)
					continue;
				out->rule_id = line->rule_id;
				out->verdict = line->verdict;
				out->present = 1;
				return 1;
			}
		}
	}
	{
		struct guard_ruleset *rs = guard_ruleset_get((__u32)ruleset);

		if (rs && rs->egress_default.present) {
			out->rule_id = rs->egress_default.rule_id;
			out->verdict = rs->egress_default.verdict;
			out->present = 1;
			return 1;
		}
	}
	return 0;
}

static __always_inline void guard_net_count(__u8 verdict)
{
	if (verdict == GUARD_DENY)
		guard_stat_add(GUARD_STAT_DENIED, 1);
	else if (verdict != GUARD_ALLOW)
		guard_stat_add(GUARD_STAT_AUDITED, 1);
}

static __always_inline void guard_net_event_fill(struct guard_event *e, __u8 hook, int ruleset,
						 struct guard_net_dest *d,
						 struct guard_decision *dec)
{
	e->kind = GUARD_KIND_CONNECT;
	e->hook = hook;
	e->verdict = dec->verdict;
	e->rule_id = dec->rule_id;
	e->ruleset = (__u32)ruleset;
	e->family = d->family;
	e->proto = d->proto;
	e->port = d->port;
	__builtin_memcpy(e->addr, d->addr, 16);
}

/* Remember the process behind a socket for the egress program's events (the
 * cgroup is not kept: events report the socket's, bpf_skb_cgroup_id). */
static __always_inline void guard_net_mark(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct guard_net_owner *owner;
	__u64 pid_tgid;

	if (!sk)
		return;
	owner = guard_net_owners.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!owner)
		return;
	pid_tgid = bpf_get_current_pid_tgid();
	owner->pid = pid_tgid >> 32;
	owner->tid = (__u32)pid_tgid;
	owner->uid = (__u32)bpf_get_current_uid_gid();
	owner->outbound = 1;
	bpf_get_current_comm(&owner->comm, sizeof(owner->comm));
}

/* connect and sendmsg: 1 lets the call go on, 0 makes it fail with EPERM. */
static __always_inline int guard_sock_addr_impl(struct bpf_sock_addr *ctx,
						struct guard_net_dest *d, __u8 hook,
						__u32 outbound)
{
	struct guard_decision dec = {};
	struct guard_scope scope = {};
	struct guard_event *e;

	guard_current_scope(&scope);   /* scope.slot: the one slot of this decision */
	if (scope.ruleset < 0 || !(scope.flags & GUARD_SCOPE_EGRESS)) {
		/*
		 * Not judged now, but a policy applied later must be able to cut
		 * this connection: its packets are judged only when the socket is
		 * marked outbound. Only TCP needs the mark (egress judges every
		 * other packet anyway), so datagrams pay nothing here.
		 */
		if (outbound && ctx->protocol == GUARD_IPPROTO_TCP)
			guard_net_mark(ctx);
		return 1;
	}
	d->proto = (__u8)ctx->protocol;
	if (guard_net_decide(scope.slot, scope.ruleset, d, &dec) && dec.verdict != GUARD_ALLOW) {
		guard_net_count(dec.verdict);
		e = guard_event_reserve();
		if (e) {
			guard_event_fill_task(e);
			guard_net_event_fill(e, hook, scope.ruleset, d, &dec);
			e->count = 1;
			guard_event_submit(e);
		}
		if (dec.verdict == GUARD_DENY)
			return 0;   /* refused: the socket is not connected, nothing to mark */
	}
	/* connect only: sendmsg runs per datagram, and judges each */
	if (outbound)
		guard_net_mark(ctx);
	return 1;
}

static __always_inline int guard_sock_addr4(struct bpf_sock_addr *ctx, __u8 hook,
					    __u32 outbound)
{
	/* zero-initialised, then assigned: see the note on .rodata at the top */
	struct guard_net_dest d = {};
	__u32 ip4 = ctx->user_ip4;

	d.family = GUARD_AF_INET;
	__builtin_memcpy(&d.addr[0], &ip4, 4);
	d.port = guard_be16((__u16)ctx->user_port);
	return guard_sock_addr_impl(ctx, &d, hook, outbound);
}

static __always_inline int guard_sock_addr6(struct bpf_sock_addr *ctx, __u8 hook,
					    __u32 outbound)
{
	struct guard_net_dest d = {};

	guard_net_dest6(&d, ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
			ctx->user_ip6[3]);
	d.port = guard_be16((__u16)ctx->user_port);
	return guard_sock_addr_impl(ctx, &d, hook, outbound);
}

int guard_connect4(struct bpf_sock_addr *ctx)
{
	return guard_sock_addr4(ctx, GUARD_HOOK_CONNECT4, 1);
}

int guard_connect6(struct bpf_sock_addr *ctx)
{
	return guard_sock_addr6(ctx, GUARD_HOOK_CONNECT6, 1);
}

int guard_sendmsg4(struct bpf_sock_addr *ctx)
{
	return guard_sock_addr4(ctx, GUARD_HOOK_SENDMSG4, 0);
}

int guard_sendmsg6(struct bpf_sock_addr *ctx)
{
	return guard_sock_addr6(ctx, GUARD_HOOK_SENDMSG6, 0);
}

/* --- skb egress ---------------------------------------------------------- */

/* guard_current_ruleset for the socket that sent a packet (a scope cache miss). */
static __always_inline int guard_skb_ruleset(struct __sk_buff *skb, __u32 slot)
{
	struct guard_scope_key key = { .slot = slot };

	for (int level = GUARD_MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		__u32 *ruleset;

		if (!id)
			continue;
		key.cgroup_id = id;
		ruleset = guard_scopes.lookup(&key);
		if (ruleset)
			return (int)(slot * GUARD_MAX_RULESETS + *ruleset);
	}
	return -1;
}

/* guard_current_scope for the socket that sent a packet: its cgroup's scope. */
static __always_inline void guard_skb_scope(struct __sk_buff *skb, struct guard_scope *s)
{
	__u64 cgroup;

	guard_scope_begin(s);
	cgroup = bpf_skb_cgroup_id(skb);
	if (guard_scope_cache_get(cgroup, s))
		return;
	guard_scope_cache_put(cgroup, s, guard_skb_ruleset(skb, s->slot));
}

/*
 * The destination of an outgoing packet (data starts at the network header).
 * Returns 0 when the packet is not one to judge (not IP, truncated, a non-first
 * fragment).
 */
static __always_inline int guard_skb_dest(struct __sk_buff *skb, struct guard_net_dest *d)
{
	__u32 l4;
	__u8 proto;

	if (skb->protocol == guard_be16(GUARD_ETH_P_IP)) {
		__u8 hdr[20];
		__u16 frag;

		if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)))
			return 0;
		__builtin_memcpy(&frag, &hdr[6], 2);
		if (guard_be16(frag) & 0x1fff)
			return 0;
		l4 = (hdr[0] & 0x0f) * 4;
		proto = hdr[9];
		d->family = GUARD_AF_INET;
		__builtin_memcpy(&d->addr[0], &hdr[16], 4);
	} else if (skb->protocol == guard_be16(GUARD_ETH_P_IPV6)) {
		__u8 hdr[40];
		__u32 w[4];

		if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)))
			return 0;
		__builtin_memcpy(w, &hdr[24], 16);
		guard_net_dest6(d, w[0], w[1], w[2], w[3]);
		proto = hdr[6];
		l4 = 40;
		for (int i = 0; i < GUARD_NET_IPV6_EXT_MAX; i++) {
			__u8 ext[4];

			if (proto != 0 && proto != 43 && proto != 60 && proto != 44)
				break;
			if (bpf_skb_load_bytes(skb, l4, ext, sizeof(ext)))
				return 0;
			if (proto == 44) {   /* fragment header: 8 bytes */
				__u16 off;

				__builtin_memcpy(&off, &ext[2], 2);
				if (guard_be16(off) & 0xfff8)
					return 0;
				l4 += 8;
			} else {
				l4 += ((__u32)ext[1] + 1) * 8;
			}
			proto = ext[0];
		}
	} else {
		return 0;
	}
	d->proto = proto;
	d->port = 0;
	if (proto == GUARD_IPPROTO_TCP || proto == GUARD_IPPROTO_UDP) {
		__u16 port;

		if (bpf_skb_load_bytes(skb, l4 + 2, &port, sizeof(port)))
			return 0;
		d->port = guard_be16(port);
	}
	return 1;
}

/*
 * Report a dropped packet, folding repeats: at most one event per key per
 * GUARD_NET_FOLD_NS. The CPU that wins the compare-and-swap on last_ns sends
 * the event and takes the suppressed count with it (a subtraction, so packets
 * counted meanwhile by other CPUs stay for the next event).
 */
static __always_inline void guard_skb_report(struct __sk_buff *skb, int ruleset,
					     struct guard_net_dest *d,
					     struct guard_decision *dec,
					     struct guard_net_owner *owner)
{
	struct guard_net_fold_key key = {
		.ruleset = (__u32)ruleset,
		.family = d->family,
		.proto = d->proto,
		.port = d->port,
	};
	struct guard_net_fold *fold;
	struct guard_event *e;
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 count = 1;

	__builtin_memcpy(key.addr, d->addr, 16);
	fold = guard_net_folds.lookup(&key);
	if (!fold) {
		struct guard_net_fold fresh = { .last_ns = now };

		guard_net_folds.update(&key, &fresh);
	} else {
		__u64 last = fold->last_ns;
		__u64 pending;

		if (now - last < GUARD_NET_FOLD_NS ||
		    __sync_val_compare_and_swap(&fold->last_ns, last, now) != last) {
			__sync_fetch_and_add(&fold->suppressed, 1);
			guard_stat_add(GUARD_STAT_SUPPRESSED, 1);
			return;
		}
		pending = fold->suppressed;
		__sync_fetch_and_sub(&fold->suppressed, pending);
		count += pending;
	}
	e = guard_event_reserve();
	if (!e)
		return;
	e->time_ns = now;
	e->cgroup_id = bpf_skb_cgroup_id(skb);
	if (owner) {
		e->pid = owner->pid;
		e->tid = owner->tid;
		e->uid = owner->uid;
		__builtin_memcpy(e->comm, owner->comm, GUARD_COMM_LEN);
	}
	guard_net_event_fill(e, GUARD_HOOK_SKB_EGRESS, ruleset, d, dec);
	e->count = count > 0xffffffffULL ? 0xffffffff : (__u32)count;
	guard_event_submit(e);
}

/* 1 lets the packet go, 0 drops it. */
int guard_egress(struct __sk_buff *skb)
{
	struct guard_decision dec = {};
	struct guard_scope scope = {};
	struct guard_net_dest d = {};
	struct guard_net_owner *owner;
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	/* cheapest first: most packets belong to sockets no egress section judges */
	guard_skb_scope(skb, &scope);   /* scope.slot: the one slot of this decision */
	if (scope.ruleset < 0 || !(scope.flags & GUARD_SCOPE_EGRESS))
		return 1;
	owner = guard_net_owners.sk_storage_get(sk, 0, 0);
	/*
	 * Only a TCP stream socket can be told apart by its mark: one that did not
	 * connect outbound through guard_connect4/6 is accepted, listening, or
	 * connected before guard loaded. Every other socket has each packet judged
	 * by the headers it really carries, raw sockets included whatever protocol
	 * they were opened with (with IP_HDRINCL a raw IPPROTO_TCP socket writes
	 * any header it likes).
	 */
	if (sk->type == GUARD_SOCK_STREAM && sk->protocol == GUARD_IPPROTO_TCP &&
	    (!owner || !owner->outbound))
		return 1;
	if (!guard_skb_dest(skb, &d))
		return 1;
	if (!guard_net_decide(scope.slot, scope.ruleset, &d, &dec) || dec.verdict != GUARD_DENY)
		return 1;
	guard_stat_add(GUARD_STAT_DENIED, 1);
	guard_skb_report(skb, scope.ruleset, &d, &dec, owner);
	return 0;
}
