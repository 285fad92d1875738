/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tamper.bpf.c - the processes guard confines cannot switch guard off.
 *
 * Loaded with the exec family (BPF-LSM). A process is *protected* when the
 * deepest scoped cgroup containing it is a policy's own scope rather than the
 * host cgroup (guard_tamper.host_cgroup_id): whole-host policies cover PID 1
 * and the operators' shells, which must keep bpf() and their signals. The
 * daemon (guard_tamper.daemon_tgid) is never protected from itself.
 *
 * Hooks, each refusing a protected process with EPERM and reporting a
 * GUARD_KIND_TAMPER event:
 *   bpf                  every bpf() command: detaching or replacing programs,
 *                        writing maps, opening pins all go through it.
 *   task_kill            any signal but 0 to the daemon's thread group.
 *   ptrace_access_check  ptrace of the daemon, and what the kernel checks the
 *                        same way: /proc/PID/mem, process_vm_writev,
 *                        pidfd_getfd (stealing its link fds).
 *   inode_unlink, inode_rename, inode_rmdir
 *                        any change of a name in a bpffs: guard's pins.
 *   sb_umount            unmounting a bpffs (the pins go with its last mount).
 *
 * Cheap checks first: a kill or ptrace of another process, or a name change
 * outside bpffs, costs one comparison; only then is the scope looked up,
 * through guard_scope.h's cache like every family's (the cached entry keeps
 * the scoped cgroup that matched, which tells a whole-host scope).
 *
 * These hooks are only this family's: another family needing one of them
 * must share it (one LSM_PROBE per hook and compile unit).
 */
#include "guard_maps.h"
#include "guard_scope.h"
#include "guard_actor.h"

#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/mount.h>
#include <linux/sched.h>
#include <linux/version.h>

#define GUARD_BPF_FS_MAGIC 0xcafe4a11   /* uapi linux/magic.h */

BPF_ARRAY(guard_tamper, struct guard_tamper_config, 1);

static __always_inline struct guard_tamper_config *guard_tamper_config(void)
{
	__u32 zero = 0;

	return guard_tamper.lookup(&zero);
}

/*
 * 1 when the current task is protected, with the slot-qualified ruleset of its
 * deepest scope in *ruleset.
 */
static __always_inline int guard_tamper_protected(struct guard_tamper_config *cfg,
						  __u32 *ruleset)
{
	struct guard_scope scope = {};

	if ((__u32)(bpf_get_current_pid_tgid() >> 32) == cfg->daemon_tgid)
		return 0;
	guard_current_scope(&scope);
	if (scope.ruleset < 0 || scope.scope_cgroup == cfg->host_cgroup_id)
		return 0;   /* no policy, or only a whole-host policy, covers it */
	*ruleset = (__u32)scope.ruleset;
	return 1;
}

/* The event of a refused attempt; detail, target and name as guard.h documents. */
static __always_inline int guard_tamper_deny(__u32 ruleset, __u8 hook, __u32 detail,
					     __u32 target, const char *name)
{
	struct guard_event *e;

	guard_stat_add(GUARD_STAT_DENIED, 1);
	guard_stat_add(GUARD_STAT_TAMPER, 1);
	e = guard_actor_event(GUARD_KIND_TAMPER, hook, GUARD_DENY, 0, ruleset);
	if (e) {
		e->port = (__u16)detail;
		__builtin_memcpy(e->addr, &target, sizeof(target));
		if (name)
			bpf_probe_read_kernel_str(e->path, sizeof(e->path), name);
		guard_event_submit(e);
	}
	return -EPERM;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 14, 0)
LSM_PROBE(bpf, int cmd, union bpf_attr *attr, unsigned int size, bool kernel, int ret)
#else
LSM_PROBE(bpf, int cmd, union bpf_attr *attr, unsigned int size, int ret)
#endif
{
	struct guard_tamper_config *cfg;
	__u32 ruleset = 0;

	if (ret)
		return ret;
	cfg = guard_tamper_config();
	if (!cfg || !guard_tamper_protected(cfg, &ruleset))
		return 0;
	return guard_tamper_deny(ruleset, GUARD_HOOK_BPF, (__u32)cmd, 0, 0);
}

LSM_PROBE(task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
	  const struct cred *cred, int ret)
{
	struct guard_tamper_config *cfg;
	__u32 ruleset = 0;

	if (ret)
		return ret;
	cfg = guard_tamper_config();
	if (!cfg || !sig || !cfg->daemon_tgid || (__u32)p->tgid != cfg->daemon_tgid)
		return 0;
	if (!guard_tamper_protected(cfg, &ruleset))
		return 0;
	return guard_tamper_deny(ruleset, GUARD_HOOK_TASK_KILL, (__u32)sig, p->tgid, p->comm);
}

LSM_PROBE(ptrace_access_check, struct task_struct *child, unsigned int mode, int ret)
{
	struct guard_tamper_config *cfg;
	__u32 ruleset = 0;

	if (ret)
		return ret;
	cfg = guard_tamper_config();
	if (!cfg || !cfg->daemon_tgid || (__u32)child->tgid != cfg->daemon_tgid)
		return 0;
	if (!guard_tamper_protected(cfg, &ruleset))
		return 0;
	return guard_tamper_deny(ruleset, GUARD_HOOK_PTRACE, mode, child->tgid, child->comm);
}

/* A name change in a directory of a bpffs by a protected process. */
static __always_inline int guard_tamper_bpffs(struct inode *dir, struct dentry *dentry, __u8 hook)
{
	struct guard_tamper_config *cfg;
	__u32 ruleset = 0;

	if (!dir || dir->i_sb->s_magic != GUARD_BPF_FS_MAGIC)
		return 0;
	cfg = guard_tamper_config();
	if (!cfg || !guard_tamper_protected(cfg, &ruleset))
		return 0;
	return guard_tamper_deny(ruleset, hook, 0, 0, (const char *)dentry->d_name.name);
}

LSM_PROBE(inode_unlink, struct inode *dir, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return guard_tamper_bpffs(dir, dentry, GUARD_HOOK_BPFFS_UNLINK);
}

LSM_PROBE(inode_rmdir, struct inode *dir, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return guard_tamper_bpffs(dir, dentry, GUARD_HOOK_BPFFS_RMDIR);
}

LSM_PROBE(inode_rename, struct inode *old_dir, struct dentry *old_dentry,
	  struct inode *new_dir, struct dentry *new_dentry, int ret)
{
	if (ret)
		return ret;
	return guard_tamper_bpffs(old_dir, old_dentry, GUARD_HOOK_BPFFS_RENAME);
}

LSM_PROBE(sb_umount, struct vfsmount *mnt, int flags, int ret)
{
	struct guard_tamper_config *cfg;
	__u32 ruleset = 0;

	if (ret)
		return ret;
	if (mnt->mnt_sb->s_magic != GUARD_BPF_FS_MAGIC)
		return 0;
	cfg = guard_tamper_config();
	if (!cfg || !guard_tamper_protected(cfg, &ruleset))
		return 0;
	return guard_tamper_deny(ruleset, GUARD_HOOK_BPFFS_UMOUNT, (__u32)flags, 0, 0);
}
