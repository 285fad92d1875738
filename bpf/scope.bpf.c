/* SPDX-License-Identifier: GPL-2.0 */
/*
 * scope.bpf.c - scopes follow cgroups through their life: a cgroup created at a
 * scope's path (a unit started after guard, a restarted unit, a scope directory
 * made later) is in that scope before any process can enter it, with no reload.
 *
 * guard/apply.py writes, per slot, guard_scope_paths: each scope's cgroup path
 * -> its slot-local ruleset, beside guard_scopes ((slot, cgroup id) -> ruleset,
 * for the cgroups that existed at apply). On every cgroup v2 mkdir, the program
 * below looks the new cgroup's path up in both slots and, for each slot that
 * has it, writes guard_scopes[(slot, new id)]. A cgroup created BELOW a scope
 * needs nothing: guard_scope_walk checks ancestors. A cgroup created at a path
 * some scope is below (a parent slice made again) gets no entry itself, and
 * each of its children down to the scope path is matched when it is made
 * (children are made after their parents).
 *
 * Kernel facts relied on (kernel/cgroup/cgroup.c, include/trace/events/cgroup.h,
 * 6.12 as Debian ships it; unchanged in 6.18, the host's kernel):
 *  - cgroup_mkdir() takes cgroup_mutex (cgroup_kn_lock_live), creates the
 *    cgroup and its kernfs directory, runs TRACE_CGROUP_PATH(mkdir, cgrp), then
 *    kernfs_activate(): before activation kernfs lookups and readdir skip the
 *    node (fs/kernfs/dir.c: kernfs_active()), so nothing can open the directory
 *    or write its cgroup.procs, and no process can be in it, when this program
 *    runs; cgroup_mutex is released only after activation (cgroup_kn_unlock).
 *  - the tracepoint runs synchronously in the mkdir(2) of the creating process
 *    (a perf tracepoint program: trace_call_bpf from the event), under
 *    trace_cgroup_path_lock with interrupts off: the program only looks up and
 *    updates preallocated hash maps.
 *  - the event's path is cgroup_path() = kernfs_path(cgrp->kn): relative to the
 *    hierarchy's root, not to the caller's cgroup namespace ("/a/b"); its id is
 *    cgroup_id(cgrp), the kernfs node id, the value bpf_get_current_cgroup_id()
 *    returns and the directory's st_ino; its root is cgrp->root->hierarchy_id.
 *  - the event fires for every hierarchy, cgroup v1 ones included. The default
 *    (v2) hierarchy is cgrp_dfl_root, set up first in cgroup_init() and given
 *    hierarchy id 0 by cgroup_init_root_id() (idr_alloc_cyclic from 0), never
 *    released; v1 roots get other ids. Only root == 0 is followed.
 *  - cgroup_rmdir() fires the rmdir event only when cgroup_destroy_locked()
 *    succeeded, which it refuses for a populated cgroup; cgroup ids are 64-bit
 *    and never reused.
 *  - cgroup_mutex is one global mutex: every mkdir of every hierarchy holds it
 *    from before the event to after activation, and BPF_PROG_QUERY on a cgroup
 *    takes it too (kernel/bpf/cgroup.c: cgroup_bpf_query). apply's barrier
 *    (guard/cgroups.py mutex_barrier) relies on both.
 * The event record is read through the tracefs format (bcc's TRACEPOINT_PROBE),
 * not through struct cgroup, so the program does not depend on the layout of
 * the kernel's private structs.
 *
 * Why the scope cache (guard_scope.h) stays exact: the entry written here is
 * for a cgroup no process has been in, with no descendants yet, so no cached
 * answer (keyed by cgroup id) can have been computed without it. The rmdir
 * program deletes the entries of a removed cgroup, so restarts do not fill
 * guard_scopes; a write that finds it full is counted (GUARD_STAT_SCOPE_LOST).
 *
 * The key is the whole zero-padded path, compared byte for byte by the map: a
 * process that may create cgroups (a delegated subtree) cannot make a path
 * that matches another scope's without being that path. A path as long as the
 * key (possibly cut by the read) never matches: apply registers only shorter.
 *
 * Cost: runs on cgroup mkdir and rmdir only; the exec, open and connect
 * programs are unchanged.
 */
#include "guard_maps.h"

#define GUARD_DFL_HIERARCHY 0   /* cgrp_dfl_root.hierarchy_id */

BPF_PERCPU_ARRAY(guard_mkdir_key, struct guard_scope_path_key, 1);

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	struct guard_scope_path_key *key;
	struct guard_scope_key scope = {};
	unsigned short offset;
	__u32 zero = 0;
	long n;

	if (args->root != GUARD_DFL_HIERARCHY)
		return 0;
	key = guard_mkdir_key.lookup(&zero);
	if (!key)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	offset = args->data_loc_path & 0xFFFF;
	n = bpf_probe_read_kernel_str(key->path, sizeof(key->path), (char *)args + offset);
	if (n <= 0 || n >= (long)sizeof(key->path))
		return 0;
	scope.cgroup_id = args->id;
#pragma unroll
	for (__u32 slot = 0; slot < GUARD_SLOTS; slot++) {
		__u32 *ruleset;
		__u32 value;

		key->slot = slot;
		ruleset = guard_scope_paths.lookup(key);
		if (!ruleset)
			continue;
		value = *ruleset;
		scope.slot = slot;
		if (guard_scopes.update(&scope, &value))
			guard_stat_add(GUARD_STAT_SCOPE_LOST, 1);
	}
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	struct guard_scope_key scope = {};

	if (args->root != GUARD_DFL_HIERARCHY)
		return 0;
	scope.cgroup_id = args->id;
#pragma unroll
	for (__u32 slot = 0; slot < GUARD_SLOTS; slot++) {
		scope.slot = slot;
		guard_scopes.delete(&scope);
	}
	return 0;
}
