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
 * The decision for one file (guard_exec_decide), most specific first:
 *   1. the file itself: its EXACT key (inode number + the kernel's s_dev) and
 *      its NAME key (parent directory inode + FNV-1a 32 of the dentry name).
 *      Both are "this exact path" rules: if both are present the stronger
 *      verdict wins, as for any tie. EXACT follows the file through symlinks,
 *      hard links and bind mounts; NAME follows the name through a
 *      rename-over (package upgrade) or a file created after load.
 *   2. SUBTREE keys of the parent directories, deepest first, walking
 *      d_parent up to the filesystem root, at most GUARD_MAX_PATH_DEPTH
 *      directories. The chain stops at the root of the file's superblock;
 *      user space (guard/resolve.py) registers the root of every mount below
 *      a subtree rule's directory with that rule's decision.
 *   3. the ruleset's exec default (bprm_check only), else allow.
 *
 * The walk is skipped when the ruleset has no subtree rule: user space marks
 * a ruleset that has some with a summary entry, the SUBTREE key with ino 0 and
 * dev 0, whose verdict is the strongest verdict of any of its subtree rules.
 * When the walk reaches its bound before the root, the program cannot know
 * which subtree rule (if any) covers the file: it applies the strongest
 * verdict the ruleset could have given (the summary, and the default for
 * exec), counts GUARD_STAT_UNDECIDED and flags the event. An enforcing
 * ruleset with any deny there therefore denies: fail closed.
 *
 * Identity comes from the file the kernel really runs (bprm->file); for an
 * overlayfs mapping that mprotect sees through its backing file, the user's
 * (overlay) path is used, which is the identity user space resolved.
 */
#include "guard_maps.h"

#include <linux/binfmts.h>
#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/mm_types.h>
#include <linux/sched.h>
#include <linux/version.h>

#define GUARD_PROT_EXEC  0x4        /* uapi asm-generic/mman-common.h */

/* Where a decision came from; ordered by specificity. */
#define GUARD_FROM_NONE    0
#define GUARD_FROM_DEFAULT 1
#define GUARD_FROM_SUBTREE 2
#define GUARD_FROM_FILE    3        /* EXACT or NAME key */

struct guard_exec_result {
	__u32 rule_id;
	__u8  verdict;
	__u8  from;                     /* GUARD_FROM_* */
	__u8  undecided;
	__u8  _pad;
};

/*
 * Every read below a dentry goes through bpf_probe_read_kernel: the dentry of
 * an overlayfs mapping (guard_user_dentry) is not a pointer the verifier lets
 * a program dereference directly, and one code path serves all hooks.
 */
#define GUARD_READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

/* Scratch space for a dentry name: too large for the 512-byte stack. */
struct guard_exec_name {
	unsigned char bytes[GUARD_NAME_BUF];
};
BPF_PERCPU_ARRAY(guard_exec_names, struct guard_exec_name, 1);

/* The NAME key's hash of a dentry's name (guard_maps.h); 0 when unreadable. */
static __always_inline __u32 guard_name_hash(struct dentry *dentry)
{
	__u32 zero = 0;
	struct guard_exec_name *buf = guard_exec_names.lookup(&zero);
	const unsigned char *name = 0;

	if (!buf)
		return 0;
	GUARD_READ(name, dentry->d_name.name);
	return guard_name_hash_of(name, buf->bytes);
}

/* The kernel's identity of a dentry's inode: i_ino and i_sb->s_dev. 0 if unreadable. */
static __always_inline int guard_dentry_identity(struct dentry *dentry, __u64 *ino, __u32 *dev)
{
	struct inode *inode = 0;
	struct super_block *sb = 0;
	unsigned long i_ino = 0;
	dev_t s_dev = 0;

	GUARD_READ(inode, dentry->d_inode);
	if (!inode)
		return 0;
	GUARD_READ(i_ino, inode->i_ino);
	GUARD_READ(sb, inode->i_sb);
	if (!sb)
		return 0;
	GUARD_READ(s_dev, sb->s_dev);
	*ino = i_ino;
	*dev = s_dev;
	return 1;
}

static __always_inline struct dentry *guard_dentry_parent(struct dentry *dentry)
{
	struct dentry *parent = 0;

	GUARD_READ(parent, dentry->d_parent);
	return parent;
}

/* Take d into res when it exists and is more specific, or as specific and stronger. */
static __always_inline void guard_exec_take(struct guard_exec_result *res,
					    struct guard_decision *d, __u8 from)
{
	if (!d || !d->present)
		return;
	if (from > res->from || (from == res->from && d->verdict > res->verdict)) {
		res->rule_id = d->rule_id;
		res->verdict = d->verdict;
		res->from = from;
	}
}

/* The strongest verdict the ruleset could have given: a walk that cannot finish. */
static __always_inline void guard_exec_undecided(struct guard_exec_result *res,
						 struct guard_decision *summary,
						 struct guard_ruleset *rs, int use_default)
{
	res->undecided = 1;
	res->from = GUARD_FROM_SUBTREE;
	res->rule_id = 0;
	res->verdict = GUARD_ALLOW;
	if (summary && summary->present) {
		res->rule_id = summary->rule_id;
		res->verdict = summary->verdict;
	}
	if (use_default && rs->exec_default.present &&
	    (rs->exec_default.verdict > res->verdict || !res->rule_id)) {
		res->rule_id = rs->exec_default.rule_id;
		res->verdict = rs->exec_default.verdict;
	}
}

/*
 * Decide for the file behind a dentry, in a slot-qualified ruleset.
 * use_default: 1 for exec (the ruleset default applies), 0 for mappings
 * (only explicit rules apply).
 */
static __always_inline void guard_exec_decide(struct dentry *dentry, __u32 ruleset,
					      struct guard_ruleset *rs, int use_default,
					      struct guard_exec_result *res)
{
	struct guard_inode_key key = {};
	struct guard_decision *summary;
	struct dentry *parent;
	struct dentry *cur;
	int complete = 0;

	key.ruleset = ruleset;

	/* 1. the file itself: its inode, and its name in its directory */
	key.match = GUARD_MATCH_EXACT;
	if (!guard_dentry_identity(dentry, &key.ino, &key.dev)) {
		guard_exec_undecided(res, 0, rs, use_default);
		return;
	}
	guard_exec_take(res, guard_exec.lookup(&key), GUARD_FROM_FILE);

	parent = guard_dentry_parent(dentry);
	if (parent && parent != dentry) {
		key.name_hash = guard_name_hash(dentry);
		if (key.name_hash && guard_dentry_identity(parent, &key.ino, &key.dev)) {
			key.match = GUARD_MATCH_NAME;
			guard_exec_take(res, guard_exec.lookup(&key), GUARD_FROM_FILE);
		}
	}
	if (res->from == GUARD_FROM_FILE)
		return;

	/* 2. subtree rules, deepest first; skipped when the ruleset has none */
	key.ino = 0;
	key.dev = 0;
	key.match = GUARD_MATCH_SUBTREE;
	key.name_hash = 0;
	summary = guard_exec.lookup(&key);
	if (summary && summary->present) {
		int failed = 0;

		cur = dentry;
		for (int depth = 0; depth < GUARD_MAX_PATH_DEPTH; depth++) {
			parent = guard_dentry_parent(cur);
			if (parent == cur) {
				complete = 1;   /* cur is the superblock's root */
				break;
			}
			if (!parent || !guard_dentry_identity(parent, &key.ino, &key.dev)) {
				failed = 1;     /* unreadable: undecided */
				break;
			}
			guard_exec_take(res, guard_exec.lookup(&key), GUARD_FROM_SUBTREE);
			if (res->from == GUARD_FROM_SUBTREE)
				return;
			cur = parent;
		}
		/* At the bound, the last directory checked may be the root itself. */
		if (!complete && !failed)
			complete = guard_dentry_parent(cur) == cur;
		if (!complete) {
			guard_exec_undecided(res, summary, rs, use_default);
			return;
		}
	}

	/* 3. the default */
	if (use_default)
		guard_exec_take(res, &rs->exec_default, GUARD_FROM_DEFAULT);
}

/* Counters and the event for a decision worth reporting; returns the hook's verdict. */
static __always_inline int guard_exec_report(struct guard_exec_result *res, __u32 ruleset,
					     __u8 hook, const char *path)
{
	struct task_struct *task;
	struct guard_event *e;
	struct file *exe;

	if (res->undecided)
		guard_stat_add(GUARD_STAT_UNDECIDED, 1);
	if (res->verdict == GUARD_ALLOW)
		return 0;
	if (res->verdict == GUARD_DENY)
		guard_stat_add(GUARD_STAT_DENIED, 1);
	else
		guard_stat_add(GUARD_STAT_AUDITED, 1);

	e = guard_event_reserve();
	if (e) {
		guard_event_fill_task(e);
		task = bpf_get_current_task_btf();
		e->ppid = task->real_parent->tgid;
		e->kind = GUARD_KIND_EXEC;
		e->hook = hook;
		e->verdict = res->verdict;
		e->rule_id = res->rule_id;
		e->ruleset = ruleset;
		e->count = 1;
		e->flags = res->undecided ? GUARD_EVENT_UNDECIDED : 0;
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), path);
		/* The acting program's name (not its full path: no d_path here). */
		exe = task->mm->exe_file;
		if (exe)
			bpf_probe_read_kernel_str(e->exe, sizeof(e->exe),
						  exe->f_path.dentry->d_name.name);
		guard_event_submit(e);
	}
	return res->verdict == GUARD_DENY ? -EPERM : 0;
}

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm, int ret)
{
	struct guard_exec_result res = {};
	struct guard_ruleset *rs;
	struct file *file;
	__u32 slot;
	int ruleset;

	if (ret)
		return ret;
	slot = guard_active_slot();
	ruleset = guard_current_ruleset(slot);
	if (ruleset < 0)
		return 0;
	rs = guard_ruleset_get((__u32)ruleset);
	if (!rs || !rs->exec_default.present)
		return 0;   /* no policy of this ruleset has an exec section */
	file = bprm->file;
	if (!file)
		return 0;
	guard_exec_decide(file->f_path.dentry, (__u32)ruleset, rs, 1, &res);
	/* interp is the file really run at this stage: the script, then its interpreter */
	return guard_exec_report(&res, (__u32)ruleset, GUARD_HOOK_BPRM_CHECK, bprm->interp);
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

		GUARD_READ(dentry, user->dentry);
		return dentry;
	}
#endif
	return file->f_path.dentry;
}

static __always_inline int guard_exec_map(struct file *file, unsigned long prot, __u8 hook)
{
	struct guard_exec_result res = {};
	struct guard_ruleset *rs;
	struct task_struct *task;
	const unsigned char *name = 0;
	struct dentry *dentry;
	__u32 slot;
	int ruleset;

	if (!file || !(prot & GUARD_PROT_EXEC))
		return 0;
	slot = guard_active_slot();
	ruleset = guard_current_ruleset(slot);
	if (ruleset < 0)
		return 0;
	rs = guard_ruleset_get((__u32)ruleset);
	if (!rs || !rs->exec_default.present)
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
	guard_exec_decide(dentry, (__u32)ruleset, rs, 0, &res);
	GUARD_READ(name, dentry->d_name.name);
	return guard_exec_report(&res, (__u32)ruleset, hook, (const char *)name);
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
