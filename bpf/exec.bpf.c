/* SPDX-License-Identifier: GPL-2.0 */
/*
 * exec.bpf.c - who may run what: BPF-LSM programs on the exec path.
 *
 * Hooks:
 *   bprm_check_security  every exec, and again for each interpreter stage
 *                        (a "#!" script's interpreter, binfmt_misc), so a
 *                        denied interpreter is denied through a script too.
 *   mmap_file            PROT_EXEC mappings of a file: closes
 *   file_mprotect        "ld-linux.so DENIED" and hand-made loaders. Only an
 *                        explicit deny rule refuses here, never the default:
 *                        in allowlist mode every shared library would be
 *                        refused otherwise. An allowlist closes the loader
 *                        route by not allowing the loader binary itself.
 *
 * The decision for one file is guard_inode.h's for GUARD_ACCESS_EXEC (the
 * file's EXACT and NAME keys, then SUBTREE keys of its parent directories,
 * deepest first), then here:
 *   3. the ruleset's exec default (bprm_check only), else allow.
 * When the walk cannot finish (its bound, an unreadable directory or file),
 * the program cannot know which subtree rule (if any) covers the file: it
 * applies the strongest verdict the ruleset could have given (the summary's,
 * and for bprm_check the default's when stronger or when the summary gave
 * none), counts GUARD_STAT_UNDECIDED and flags the event. An enforcing ruleset
 * with any deny there therefore denies: fail closed.
 *
 * Cost: the scope comes from guard_scope.h's cache (one lookup per exec or
 * mapping; the ancestor walk only for a cgroup not seen since the last
 * reload), and a ruleset without an exec section ends there. Every inode the
 * decision meets is tested against the file filter before its lookup.
 *
 * Identity comes from the file the kernel really runs (bprm->file); for an
 * overlayfs mapping that mprotect sees through its backing file, the user's
 * (overlay) path is used, which is the identity user space resolved. That
 * dentry is read with probe reads (GUARD_INODE_PROBE), so every dentry of
 * this family is.
 */
#include "guard_maps.h"
#include "guard_scope.h"
#include "guard_inode.h"
#include "guard_actor.h"

#include <linux/binfmts.h>
#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/mm_types.h>
#include <linux/sched.h>
#include <linux/version.h>

#define GUARD_PROT_EXEC  0x4        /* uapi asm-generic/mman-common.h */

/* How exec reads below a dentry (guard_inode.h): probe reads; the file has an inode. */
#define GUARD_EXEC_HOW (GUARD_INODE_PROBE | GUARD_INODE_EXISTS)

/*
 * The scope of the current task when its ruleset has an exec section: 1, and
 * s filled; 0 when no policy covers the task or none of its policies has exec
 * rules.
 */
static __always_inline int guard_exec_scope(struct guard_scope *s)
{
	guard_current_scope(s);
	return s->ruleset >= 0 && (s->flags & GUARD_SCOPE_EXEC);
}

/*
 * Decide for the file behind a dentry, in the scope's ruleset. use_default: 1
 * for exec (the ruleset default applies), 0 for mappings (only explicit rules
 * apply).
 */
static __always_inline void guard_exec_decide(struct dentry *dentry, struct guard_scope *s,
					      int use_default, struct guard_inode_one *out)
{
	struct guard_inode_result res = {};
	struct guard_ruleset *rs;
	struct guard_decision *d;

	guard_inode_decide(dentry, (__u32)s->ruleset, GUARD_ACCESS_EXEC,
			   (__u8)(s->subtree & GUARD_ACCESS_EXEC), GUARD_EXEC_HOW, &res);
	*out = res.exec;
	if (!use_default)
		return;
	rs = guard_ruleset_get((__u32)s->ruleset);
	if (!rs)
		return;
	d = &rs->exec_default;
	if (!d->present)
		return;
	if (out->undecided) {
		/* the strongest the ruleset could have given: the summary, or the default */
		if (d->verdict > out->verdict || !out->rule_id) {
			out->rule_id = d->rule_id;
			out->verdict = d->verdict;
		}
	} else if (out->from == GUARD_FROM_NONE) {
		/* 3. the default */
		out->rule_id = d->rule_id;
		out->verdict = d->verdict;
		out->from = GUARD_FROM_DEFAULT;
	}
}

/* Counters and the event for a decision worth reporting; returns the hook's verdict. */
static __always_inline int guard_exec_report(struct guard_inode_one *res, __u32 ruleset,
					     __u8 hook, const char *path)
{
	struct guard_event *e;

	if (res->undecided)
		guard_stat_add(GUARD_STAT_UNDECIDED, 1);
	if (res->verdict == GUARD_ALLOW)
		return 0;
	if (res->verdict == GUARD_DENY)
		guard_stat_add(GUARD_STAT_DENIED, 1);
	else
		guard_stat_add(GUARD_STAT_AUDITED, 1);

	e = guard_actor_event(GUARD_KIND_EXEC, hook, res->verdict, res->rule_id, ruleset);
	if (e) {
		e->flags = res->undecided ? GUARD_EVENT_UNDECIDED : 0;
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), path);
		guard_event_submit(e);
	}
	return res->verdict == GUARD_DENY ? -EPERM : 0;
}

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm, int ret)
{
	struct guard_inode_one res = {};
	struct guard_scope scope = {};
	struct file *file;

	if (ret)
		return ret;
	if (!guard_exec_scope(&scope))
		return 0;
	file = bprm->file;
	if (!file)
		return 0;
	guard_exec_decide(file->f_path.dentry, &scope, 1, &res);
	/* interp is the file really run at this stage: the script, then its interpreter */
	return guard_exec_report(&res, (__u32)scope.ruleset, GUARD_HOOK_BPRM_CHECK, bprm->interp);
}

/* The dentry and inode a mapping's file stands for, as user space resolved them. */
static __always_inline struct dentry *guard_user_dentry(struct file *file)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	/*
	 * Since 6.8 a backing file (overlayfs puts one in vma->vm_file) has the
	 * real path in f_path and the user's path right after the struct file
	 * (struct backing_file, fs/file_table.c); file_user_path() reads it the
	 * same way.
	 */
	if (file->f_mode & FMODE_BACKING) {
		struct path *user = (struct path *)((char *)file + sizeof(struct file));
		struct dentry *dentry = 0;

		bpf_probe_read_kernel(&dentry, sizeof(dentry), &user->dentry);
		return dentry;
	}
#endif
	return file->f_path.dentry;
}

static __always_inline int guard_exec_map(struct file *file, unsigned long prot, __u8 hook)
{
	struct guard_inode_one res = {};
	struct guard_scope scope = {};
	struct task_struct *task;
	const unsigned char *name = 0;
	struct dentry *dentry;

	if (!file || !(prot & GUARD_PROT_EXEC))
		return 0;
	if (!guard_exec_scope(&scope))
		return 0;
	/*
	 * The kernel maps the program it is executing into the new image: that
	 * file was judged by bprm_check_security a moment ago (only an allowed or
	 * audited one gets here), so judging it again would only repeat events.
	 */
	task = bpf_get_current_task_btf();
	if (hook == GUARD_HOOK_MMAP_FILE && task->mm->exe_file == file)
		return 0;
	dentry = guard_user_dentry(file);
	if (!dentry)
		return 0;
	guard_exec_decide(dentry, &scope, 0, &res);
	bpf_probe_read_kernel(&name, sizeof(name), &dentry->d_name.name);
	return guard_exec_report(&res, (__u32)scope.ruleset, hook, (const char *)name);
}

LSM_PROBE(mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	  unsigned long flags, int ret)
{
	if (ret)
		return ret;
	return guard_exec_map(file, prot, GUARD_HOOK_MMAP_FILE);
}

LSM_PROBE(file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	  unsigned long prot, int ret)
{
	if (ret)
		return ret;
	return guard_exec_map(vma->vm_file, prot, GUARD_HOOK_FILE_MPROTECT);
}
