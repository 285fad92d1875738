/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard_maps.h - the maps every guard program shares, and the helpers that
 * read them (scope lookup, event emission, counters). Included once per
 * compile: the loader compiles all program files as one unit, so the maps
 * exist once and every program sees the same ones.
 *
 * Failure behaviour: a lookup that cannot complete (a bound reached) makes an
 * enforcing decision deny and counts GUARD_STAT_UNDECIDED; a missing map entry
 * is never an error, it means "no rule here".
 */
#ifndef GUARD_MAPS_H
#define GUARD_MAPS_H

#include "guard.h"

BPF_ARRAY(guard_config, struct guard_config, 1);
BPF_HASH(guard_scopes, struct guard_scope_key, __u32, GUARD_MAX_SCOPES);
BPF_ARRAY(guard_rulesets, struct guard_ruleset, GUARD_SLOTS * GUARD_MAX_RULESETS);
BPF_F_TABLE("hash", struct guard_inode_key, struct guard_decision, guard_exec,
	    GUARD_MAX_EXEC_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct guard_inode_key, struct guard_file_value, guard_files,
	    GUARD_MAX_FILE_ENTRIES, BPF_F_NO_PREALLOC);
/* guard_files' inodes as bits, per slot (guard.h): here so that apply finds it in every family */
BPF_ARRAY(guard_file_filter, __u64, GUARD_SLOTS * GUARD_FILE_FILTER_WORDS);
BPF_LPM_TRIE(guard_net4, struct guard_net4_key, __u32, GUARD_MAX_NET_ENTRIES);
BPF_LPM_TRIE(guard_net6, struct guard_net6_key, __u32, GUARD_MAX_NET_ENTRIES);
BPF_F_TABLE("hash", __u32, struct guard_port_table, guard_port_tables,
	    GUARD_SLOTS * GUARD_MAX_PORT_TABLES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(guard_stats, __u64, GUARD_STAT_COUNT);
BPF_RINGBUF_OUTPUT(guard_events, GUARD_RINGBUF_BYTES / 4096);

static __always_inline void guard_stat_add(__u32 index, __u64 n)
{
	__u64 *value = guard_stats.lookup(&index);

	if (value)
		*value += n;
}

/* The slot every lookup of this decision uses; read once per decision. */
static __always_inline __u32 guard_active_slot(void)
{
	__u32 zero = 0;
	struct guard_config *config = guard_config.lookup(&zero);

	return config ? (config->active_slot & 1) : 0;
}

static __always_inline struct guard_ruleset *guard_ruleset_get(__u32 ruleset)
{
	return guard_rulesets.lookup(&ruleset);
}

/*
 * The ruleset of the deepest scoped cgroup containing the current task's
 * cgroup, slot-qualified, or -1 when no policy covers the task. Ancestor level
 * 0 is the cgroup2 root; levels past the task's own return 0 and are skipped.
 */
static __always_inline int guard_current_ruleset(__u32 slot)
{
	struct guard_scope_key key = { .slot = slot };

	for (int level = GUARD_MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
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

/*
 * The scope cache: the ruleset of a cgroup, remembered per cgroup id, so that a
 * decision does one hash lookup instead of the ancestor walk above (one helper
 * call per level, GUARD_MAX_CGROUP_DEPTH of them, and a lookup per existing
 * level). Used by net.bpf.c for the connecting task's cgroup and for a packet's
 * socket cgroup (the same cgroup gives the same answer either way: the scope
 * depends only on the cgroup's ancestors and the slot's guard_scopes entries).
 *
 * Why a cached entry is exact: within one generation the active slot's maps are
 * never written (guard/apply.py fills the idle slot, flips, and only then clears
 * the old one), and a cgroup's ancestors never change (cgroup2 refuses to move a
 * directory to another parent; ids are never reused). So an entry is stamped with
 * the (generation, slot) it was computed for and is used only by a decision that
 * read that same pair: a reload invalidates every entry without a write.
 *
 * The pair comes from ONE 8-byte load of guard_config, and is cacheable only
 * when slot == generation & 1, which every apply keeps (it flips the slot and
 * bumps the generation together, from 0/0). A read torn between two configs
 * breaks that parity: such a decision walks without the cache, still with the
 * one slot it read. Entries never go stale in another way; an evicted one is
 * recomputed.
 *
 * The value carries its key: an LRU element can be recycled for another cgroup
 * while a program that looked it up still holds it (prealloc hash elements are
 * reused at once), and such a copy then names another cgroup and is refused.
 */
#define GUARD_SCOPE_CACHE_ENTRIES 16384

enum guard_scope_flags {         /* what the cgroup's ruleset has */
	GUARD_SCOPE_EGRESS = 1,     /* an egress section (its egress default exists) */
	GUARD_SCOPE_FILES  = 2,     /* a file rule (has_files) */
};

struct guard_scope_cached {
	__u64 cgroup_id;            /* the key, again: see above */
	__u32 generation;
	__u32 slot;
	__s32 ruleset;              /* slot-qualified; -1: no policy covers the cgroup */
	__u32 flags;                /* enum guard_scope_flags */
};

BPF_TABLE("lru_hash", __u64, struct guard_scope_cached, guard_scope_cache,
	  GUARD_SCOPE_CACHE_ENTRIES);

/* One decision's scope: the slot it read once, and what it found in that slot. */
struct guard_scope {
	__u32 slot;
	__u32 generation;
	__u32 cacheable;            /* the (generation, slot) pair may key the cache */
	__s32 ruleset;              /* slot-qualified; -1: no policy covers the actor */
	__u32 flags;                /* enum guard_scope_flags */
};

/* Read guard_config once for a decision: slot, generation, and whether they agree. */
static __always_inline void guard_scope_begin(struct guard_scope *s)
{
	__u32 zero = 0;
	struct guard_config *config = guard_config.lookup(&zero);
	struct guard_config copy = {};
	__u64 word;

	s->ruleset = -1;
	s->flags = 0;
	if (!config) {
		s->slot = 0;
		s->generation = 0;
		s->cacheable = 0;
		return;
	}
	word = *(volatile __u64 *)config;   /* one load: both fields of one config */
	__builtin_memcpy(&copy, &word, sizeof(copy));
	s->slot = copy.active_slot & 1;
	s->generation = copy.generation;
	s->cacheable = copy.active_slot == (copy.generation & 1);
}

/* 1 and s->ruleset/flags set when the cache has the cgroup for s's (generation, slot). */
static __always_inline int guard_scope_cache_get(__u64 cgroup, struct guard_scope *s)
{
	struct guard_scope_cached *cached;
	__s32 ruleset;
	__u32 flags;

	if (!s->cacheable)
		return 0;
	cached = guard_scope_cache.lookup(&cgroup);
	if (!cached)
		return 0;
	/* the key last: an element rewritten for another cgroup meanwhile shows it there */
	ruleset = *(volatile __s32 *)&cached->ruleset;
	flags = *(volatile __u32 *)&cached->flags;
	if (*(volatile __u32 *)&cached->generation != s->generation ||
	    *(volatile __u32 *)&cached->slot != s->slot ||
	    *(volatile __u64 *)&cached->cgroup_id != cgroup)
		return 0;
	s->ruleset = ruleset;
	s->flags = flags;
	return 1;
}

/* Set s->ruleset (slot-qualified or -1, from a walk in s->slot) and its flags, and
 * remember them for the cgroup. */
static __always_inline void guard_scope_cache_put(__u64 cgroup, struct guard_scope *s,
						  int ruleset)
{
	struct guard_scope_cached fresh = {};
	struct guard_ruleset *rs;
	__u32 flags = 0;

	if (ruleset >= 0) {
		rs = guard_ruleset_get((__u32)ruleset);
		if (rs) {
			if (rs->egress_default.present)
				flags |= GUARD_SCOPE_EGRESS;
			if (rs->has_files)
				flags |= GUARD_SCOPE_FILES;
		}
	}
	s->ruleset = ruleset;
	s->flags = flags;
	if (!s->cacheable)
		return;
	fresh.cgroup_id = cgroup;
	fresh.generation = s->generation;
	fresh.slot = s->slot;
	fresh.ruleset = ruleset;
	fresh.flags = flags;
	guard_scope_cache.update(&cgroup, &fresh);
}

/*
 * The scope of the current task for one decision: guard_current_ruleset, through
 * the cache. s->slot is the slot every other lookup of the decision must use.
 */
static __always_inline void guard_current_scope(struct guard_scope *s)
{
	__u64 cgroup;

	guard_scope_begin(s);
	cgroup = bpf_get_current_cgroup_id();
	if (guard_scope_cache_get(cgroup, s))
		return;
	guard_scope_cache_put(cgroup, s, guard_current_ruleset(s->slot));
}

#define GUARD_NAME_BUF   256        /* NAME_MAX + 1 */
#define GUARD_FNV_OFFSET 2166136261u
#define GUARD_FNV_PRIME  16777619u

/*
 * FNV-1a 32 of a dentry name (kernel pointer ``name``), byte for byte what
 * guard.resolve.fnv1a32() computes for the basename: the NAME keys of exec and
 * file rules. ``buf`` is GUARD_NAME_BUF bytes of a per-CPU map value (a name
 * is too big for the stack). A name that cannot be read hashes to 0, which
 * user space never registers (resolve.py warns about the one name in four
 * billion whose real hash is 0).
 */
static __always_inline __u32 guard_name_hash_of(const unsigned char *name, unsigned char *buf)
{
	__u32 hash = GUARD_FNV_OFFSET;
	int len;

	if (!name)
		return 0;
	len = bpf_probe_read_kernel_str(buf, GUARD_NAME_BUF, name);
	if (len <= 1)
		return 0;
	/* Not unrolled: an unrolled copy hides the index bound from the verifier. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < GUARD_NAME_BUF; i++) {
		if (i >= len - 1)
			break;
		hash ^= buf[i];
		hash *= GUARD_FNV_PRIME;
	}
	return hash;
}

/*
 * Fill the process fields of an event for the current task. Only helpers every
 * program type has: cgroup programs may not read task_struct, so LSM programs
 * fill ppid themselves and user space fills it from /proc for the others.
 */
static __always_inline void guard_event_fill_task(struct guard_event *e)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	e->time_ns = bpf_ktime_get_boot_ns();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
}

/*
 * Reserve an event, or count it lost when the ring buffer is full, so that
 * user space can report exactly how many events it never saw.
 */
static __always_inline struct guard_event *guard_event_reserve(void)
{
	struct guard_event *e = guard_events.ringbuf_reserve(sizeof(struct guard_event));

	if (!e) {
		guard_stat_add(GUARD_STAT_EVENTS_LOST, 1);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	return e;
}

static __always_inline void guard_event_submit(struct guard_event *e)
{
	guard_stat_add(GUARD_STAT_EVENTS, 1);
	guard_events.ringbuf_submit(e, 0);
}

#endif /* GUARD_MAPS_H */
