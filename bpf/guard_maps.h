/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard_maps.h - the maps every guard program shares, and the helpers every
 * program type may use with them (counters, event emission).
 *
 * Every program file includes it; the loader (guard/loader.py) compiles all
 * requested program files as one unit and pastes each header of bpf/ in
 * where it is first included (bcc rewrites map calls such as
 * guard_config.lookup() only in its main file), so the maps exist once and
 * every program sees the same ones. The include guard makes the other
 * includes no-ops.
 *
 * The other shared headers, each included by the program files that use it:
 *   guard_scope.h   which ruleset covers a cgroup: the ancestor walk and the
 *                   scope cache (every family)
 *   guard_inode.h   the decision for one file: EXACT, NAME, SUBTREE keys of
 *                   guard_inodes, behind the file filter (exec, files)
 *   guard_actor.h   the acting process of an LSM event: ppid, executable
 *                   (LSM families only: cgroup programs may not read tasks)
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
/* scope paths, per slot: what scope.bpf.c matches a new cgroup's path against */
BPF_HASH(guard_scope_paths, struct guard_scope_path_key, __u32, GUARD_MAX_SCOPES);
BPF_ARRAY(guard_rulesets, struct guard_ruleset, GUARD_SLOTS * GUARD_MAX_RULESETS);
/* exec and file rules: one key per inode (or name, or subtree), a decision per access */
BPF_F_TABLE("hash", struct guard_inode_key, struct guard_inode_value, guard_inodes,
	    GUARD_MAX_INODE_ENTRIES, BPF_F_NO_PREALLOC);
/* the name of every NAME key of guard_inodes, under the same key (guard.h) */
BPF_F_TABLE("hash", struct guard_inode_key, struct guard_name, guard_names,
	    GUARD_MAX_INODE_ENTRIES, BPF_F_NO_PREALLOC);
/* guard_inodes' inodes as bits, per slot (guard.h) */
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

static __always_inline struct guard_ruleset *guard_ruleset_get(__u32 ruleset)
{
	return guard_rulesets.lookup(&ruleset);
}

/*
 * Fill the process fields of an event for the current task. Only helpers every
 * program type has: cgroup programs may not read task_struct, so LSM programs
 * add ppid and the executable with guard_actor.h, and user space fills ppid
 * from /proc for the others.
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
