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
