/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard_actor.h - the acting process of an event, for LSM programs only.
 *
 * guard_event_fill_task (guard_maps.h) uses only helpers every program type
 * has. LSM programs may read the current task_struct (cgroup programs may not:
 * net.bpf.c leaves ppid to user space), so their events also carry the
 * parent's tgid and the executable's name; this header is that fill, and the
 * start of every LSM event, included by exec.bpf.c, files.bpf.c and
 * tamper.bpf.c.
 */
#ifndef GUARD_ACTOR_H
#define GUARD_ACTOR_H

#include "guard_maps.h"

#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/mm_types.h>
#include <linux/sched.h>

/*
 * The process fields of an event for the current task: guard_event_fill_task's,
 * ppid from task->real_parent, and the executable's name (not its full path:
 * no d_path here; none for a task without an mm, such as a kernel thread).
 */
static __always_inline void guard_event_fill_actor(struct guard_event *e)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *exe;

	guard_event_fill_task(e);
	e->ppid = task->real_parent->tgid;
	exe = task->mm->exe_file;
	if (exe)
		bpf_probe_read_kernel_str(e->exe, sizeof(e->exe), exe->f_path.dentry->d_name.name);
}

/*
 * A reserved event of an LSM decision with what every such event has: the
 * actor, kind, hook, verdict, rule, slot-qualified ruleset and a count of one.
 * NULL when the ring buffer is full (counted by guard_event_reserve).
 */
static __always_inline struct guard_event *guard_actor_event(__u8 kind, __u8 hook, __u8 verdict,
							     __u32 rule_id, __u32 ruleset)
{
	struct guard_event *e = guard_event_reserve();

	if (!e)
		return 0;
	guard_event_fill_actor(e);
	e->kind = kind;
	e->hook = hook;
	e->verdict = verdict;
	e->rule_id = rule_id;
	e->ruleset = ruleset;
	e->count = 1;
	return e;
}

#endif /* GUARD_ACTOR_H */
