/* SPDX-License-Identifier: GPL-2.0 */
/*
 * files.bpf.c - who may read and write which files: BPF-LSM programs on the
 * open path and on every path operation that changes a directory.
 *
 * Hooks, and why each one (docs/files.md says the same for users):
 *   file_open      every open that yields a readable or writable file, by any
 *                  route (open, openat2, io_uring, open_by_handle_at,
 *                  /proc/PID/fd/N, exec's own opens excepted). Access: read
 *                  = FMODE_READ; write = FMODE_WRITE or O_TRUNC. Decided on the
 *                  file really opened, so symlinks, "..", relative paths,
 *                  bind mounts and /proc/self/fd all end at the same dentry.
 *                  A stacked file system's open is judged twice: its own file
 *                  (an overlayfs inode), then the real file below, which
 *                  overlayfs opens as a backing file (FMODE_BACKING) with the
 *                  same mode, by the same task: a read-denied file is denied
 *                  through any overlay that has it as a lower layer, and a
 *                  write through an overlay whose upper layer is write-denied
 *                  is refused. The backing file's event names the user's path.
 *   path_mknod     a new name in a directory: open(O_CREAT) of a new file and
 *   path_mkdir     mknod(2) come through path_mknod; mkdir, symlink likewise.
 *   path_symlink   Decided as a write of the NEW name (NAME key, then the
 *                  subtree walk from its directory): a rule on a directory
 *                  covers files created in it after load.
 *   path_unlink    removing a name: a write of that file.
 *   path_rmdir
 *   path_rename    the source is read and written (moving a file out of a
 *                  subtree takes it out of the subtree's rules, so it counts as
 *                  reading it too), the destination is written (a rename INTO
 *                  a write-denied subtree is a write there); with
 *                  RENAME_EXCHANGE both sides move, so both are read and written.
 *   path_link      the new name is written; the source is read and written: a
 *                  hard link out of a subtree is a way around its rules.
 *                  For both, the destination is judged first and a denial
 *                  there ends it; each side reported has its own event.
 *   path_truncate  truncate(2) by path (ftruncate needs a writable fd, which
 *   path_chmod     file_open judged); chmod and chown change who may write the
 *   path_chown     file: writes.
 *
 * Why the path_* hooks and not the inode_* ones: they are called once per
 * system call at the syscall layer (io_uring's mkdirat, renameat, ... too),
 * they carry the mount, so an event names the file as the user reached it
 * (bind mount included), and a file system's own internal calls (overlayfs
 * copying a file up to its upper layer calls vfs_create on the upper file
 * system) are not judged a second time against identities no rule names.
 * They need CONFIG_SECURITY_PATH, which every distribution kernel with
 * AppArmor or TOMOYO built in has (Debian, Ubuntu, SUSE, Fedora).
 *
 * The decision for one dentry and its accesses is guard_inode.h's (EXACT and
 * NAME keys, then SUBTREE keys of the parent directories; each access on its
 * own, all in one walk), exactly as guard.evaluate.decide_open walks a plan;
 * with no rule an access is allowed (file rules have no default). Dentries are
 * read with plain loads (guard_inode.h says why).
 *
 * Cost: file_open runs for every open on the machine. The order is the
 * cheapest first: the open's flags; then the scope, cached per cgroup id
 * (guard_scope.h: stamped with the generation and slot it was computed for, so
 * a reload invalidates it without a write), whose flags say whether the
 * ruleset has file rules at all and for which accesses it has subtree rules;
 * then, per inode the decision meets (the file, its directory, and on the
 * walk, which runs only for accesses some subtree rule decides, every
 * ancestor), a hash of (ino, dev) in a few multiplications and one file filter
 * word read (an array element: the verifier inlines the lookup, no helper
 * call), and a hash map lookup only when the inode's bits are all set. An open
 * no rule matches does no hash lookup into guard_inodes, however many rules
 * there are (false positives aside: about 0.1% of inodes with 100,000 keys).
 *
 * Events: DENY -> -EPERM; AUDIT, WOULD_DENY and DENY -> one event (kind FILE,
 * hook FILE_OPEN or PATH_CHANGE, the access bits that got the reported
 * verdict). path is rebuilt from the dentry walk across mounts up to the
 * task's root, as d_path would print it; when it does not fit in
 * GUARD_PATH_LEN (or the walk is too deep) it keeps the final components and
 * starts with "...". Repeats are not folded here: user space aggregates
 * identical events (guard/audit.py), and events the ring buffer cannot take
 * are counted (GUARD_STAT_EVENTS_LOST), never lost silently.
 *
 * Structs are zeroed and then assigned, never given constant initialisers
 * (see net.bpf.c: bcc cannot relocate LLVM's .rodata copies).
 */
#include "guard_maps.h"
#include "guard_scope.h"
#include "guard_inode.h"
#include "guard_actor.h"

#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/mount.h>
#include <linux/path.h>
#include <linux/sched.h>
#include <linux/version.h>

#define GUARD_FILES_O_TRUNC    01000    /* uapi asm-generic/fcntl.h */
#define GUARD_FILES_FMODE_EXEC 0x20     /* FMODE_EXEC == __FMODE_EXEC, in f_mode and f_flags */
#define GUARD_FILES_RENAME_EXCHANGE 2   /* uapi linux/fs.h */

/* Path text: built backwards in a scratch buffer, then copied to the event. */
#define GUARD_FILES_PATH_END   (2 * GUARD_PATH_LEN - 1)         /* index of the NUL */
#define GUARD_FILES_PATH_MASK  (2 * GUARD_PATH_LEN - 1)
#define GUARD_FILES_PATH_BUF   (3 * GUARD_PATH_LEN)             /* mask + a name fit */
#define GUARD_FILES_PATH_STEPS (GUARD_MAX_PATH_DEPTH + 16)      /* dentries + mounts */

#define GUARD_FILES_RW (GUARD_ACCESS_READ | GUARD_ACCESS_WRITE)

/* Per-CPU scratch: a path being built; too big for the stack. */
struct guard_files_scratch {
	char path[GUARD_FILES_PATH_BUF];
	/* the path walk's state (guard_files_path) */
	__u64 dentry;
	__u64 mnt;                      /* struct guard_files_mount * */
	__u64 mnt_root;
	__u64 root_dentry;
	__u64 root_mnt;
	__u32 pos;
	__u32 complete;
};

/*
 * The start of the kernel's private struct mount (fs/mount.h), unchanged since
 * 3.x: it holds the vfsmount, and where that mount sits in its parent. Used
 * only to write the event's path text, never to decide.
 */
struct guard_files_mount {
	struct hlist_node mnt_hash;
	struct guard_files_mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
};

BPF_PERCPU_ARRAY(guard_files_scratches, struct guard_files_scratch, 1);

/* The path text walks pointers it keeps as numbers: probe reads there. */
#define GUARD_FILES_READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

/*
 * The scope of the current task when its ruleset has file rules: 1, and s
 * filled (s->subtree: the accesses some subtree rule of it decides); 0 when
 * no policy covers the task or its ruleset has no file rule.
 */
static __always_inline int guard_files_scope(struct guard_scope *s)
{
	guard_current_scope(s);
	return s->ruleset >= 0 && (s->flags & GUARD_SCOPE_FILES);
}

/*
 * Decide the accesses ``want`` for the file behind ``dentry`` (negative for a
 * name being created): guard_inode.h's decision, with plain loads.
 */
static __always_inline void guard_files_decide(struct dentry *dentry, struct guard_scope *s,
					       __u8 want, struct guard_inode_result *res)
{
	guard_inode_decide(dentry, (__u32)s->ruleset, want & GUARD_FILES_RW,
			   (__u8)(s->subtree & GUARD_FILES_RW), 0, res);
}

/* The verdict a result gives the operation: the stronger access's. */
static __always_inline __u8 guard_files_verdict(struct guard_inode_result *res)
{
	return res->write.verdict > res->read.verdict ? res->write.verdict : res->read.verdict;
}

/*
 * The path of (mount, dentry) as the task would write it: dentries up to the
 * mount's root, then on from where that mount sits in its parent, up to the
 * task's root (or the namespace's root mount). Written backwards into the
 * scratch buffer so that it ends at GUARD_FILES_PATH_END; the string always
 * starts at or after GUARD_PATH_LEN, so it fits in GUARD_PATH_LEN with its NUL.
 *
 * Verifier cost: the walk's position and pointers live in the scratch map
 * value and are reloaded at every step. The verifier does not track what a
 * map value holds, so every step starts from the same abstract state whatever
 * the steps before it did (a name or a mount crossing), and it checks the loop
 * body a few times per step instead of once per possible history.
 */
static __always_inline void guard_files_path(char *dst, struct vfsmount *vfsmnt,
					     struct dentry *dentry)
{
	__u32 zero = 0;
	struct guard_files_scratch *s = guard_files_scratches.lookup(&zero);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct guard_files_mount *mnt;
	struct guard_files_mount *up;
	struct fs_struct *fs = 0;
	struct dentry *cur;
	struct dentry *parent;
	struct dentry *mnt_root;
	const unsigned char *name;
	__u32 pos;
	__u32 len;

	if (!s)
		return;
	s->root_dentry = 0;
	s->root_mnt = 0;
	GUARD_FILES_READ(fs, task->fs);
	if (fs) {
		GUARD_FILES_READ(s->root_dentry, fs->root.dentry);
		GUARD_FILES_READ(s->root_mnt, fs->root.mnt);
	}
	s->dentry = (__u64)dentry;
	s->mnt = (__u64)container_of(vfsmnt, struct guard_files_mount, mnt);
	s->mnt_root = 0;
	GUARD_FILES_READ(s->mnt_root, vfsmnt->mnt_root);
	s->pos = GUARD_FILES_PATH_END;
	s->complete = 0;
	s->path[GUARD_FILES_PATH_END] = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < GUARD_FILES_PATH_STEPS; i++) {
		cur = (struct dentry *)s->dentry;
		mnt = (struct guard_files_mount *)s->mnt;
		if (!cur || !mnt)
			break;
		if ((__u64)cur == s->root_dentry && (__u64)&mnt->mnt == s->root_mnt) {
			s->complete = 1;
			break;
		}
		parent = guard_inode_parent(cur, GUARD_INODE_PROBE);
		mnt_root = (struct dentry *)s->mnt_root;
		if (cur == mnt_root || cur == parent || !parent) {
			up = 0;
			GUARD_FILES_READ(up, mnt->mnt_parent);
			if (cur != mnt_root || !up || up == mnt) {
				s->complete = 1;   /* the namespace's root, or a detached tree */
				break;
			}
			s->dentry = 0;
			GUARD_FILES_READ(s->dentry, mnt->mnt_mountpoint);
			s->mnt = (__u64)up;
			s->mnt_root = 0;
			GUARD_FILES_READ(s->mnt_root, up->mnt.mnt_root);
			continue;
		}
		name = 0;
		len = 0;
		GUARD_FILES_READ(name, cur->d_name.name);
		GUARD_FILES_READ(len, cur->d_name.len);
		len &= GUARD_NAME_LEN - 1;        /* NAME_MAX is 255 */
		pos = s->pos & GUARD_FILES_PATH_MASK;
		/* keep room for "...": the string must start at or after GUARD_PATH_LEN */
		if (!name || len + 1 + 3 + GUARD_PATH_LEN > pos)
			break;
		pos -= len;
		/* a fresh mask the compiler cannot drop: the verifier wants the size bounded here */
		asm volatile("" : "+r"(len));
		len &= GUARD_NAME_LEN - 1;
		bpf_probe_read_kernel(&s->path[pos & GUARD_FILES_PATH_MASK], len, name);
		pos = (pos - 1) & GUARD_FILES_PATH_MASK;
		s->path[pos] = '/';
		s->pos = pos;
		s->dentry = (__u64)parent;
	}
	pos = s->pos & GUARD_FILES_PATH_MASK;
	if (pos == GUARD_FILES_PATH_END) {
		pos -= 1;
		s->path[pos] = '/';
	}
	if (!s->complete && pos >= 3) {
		pos -= 3;
		s->path[pos] = '.';
		s->path[pos + 1] = '.';
		s->path[pos + 2] = '.';
	}
	bpf_probe_read_kernel_str(dst, GUARD_PATH_LEN, &s->path[pos & GUARD_FILES_PATH_MASK]);
}

/*
 * Counters, and the event for a decision worth reporting; returns the hook's
 * verdict. The path is written last, with nothing of the decision still live,
 * so the verifier walks the path loop once rather than once per outcome.
 */
static __always_inline int guard_files_report(struct guard_inode_result *res, __u32 ruleset,
					      __u8 hook, struct vfsmount *mnt,
					      struct dentry *dentry)
{
	struct guard_event *e;
	__u8 verdict = guard_files_verdict(res);
	__u8 access = 0;
	__u8 undecided = 0;
	__u32 rule_id = 0;
	int ret;

	if (res->read.undecided || res->write.undecided)
		guard_stat_add(GUARD_STAT_UNDECIDED, 1);
	if (verdict == GUARD_ALLOW)
		return 0;
	if (verdict == GUARD_DENY)
		guard_stat_add(GUARD_STAT_DENIED, 1);
	else
		guard_stat_add(GUARD_STAT_AUDITED, 1);
	ret = verdict == GUARD_DENY ? -EPERM : 0;
	/* The accesses that got the reported verdict, and the rule of one of them. */
	if (res->read.from != GUARD_FROM_NONE && res->read.verdict == verdict) {
		access |= GUARD_ACCESS_READ;
		rule_id = res->read.rule_id;
		undecided |= res->read.undecided;
	}
	if (res->write.from != GUARD_FROM_NONE && res->write.verdict == verdict) {
		access |= GUARD_ACCESS_WRITE;
		rule_id = res->write.rule_id;
		undecided |= res->write.undecided;
	}

	e = guard_actor_event(GUARD_KIND_FILE, hook, verdict, rule_id, ruleset);
	if (!e)
		return ret;
	e->access = access;
	e->flags = undecided ? GUARD_EVENT_UNDECIDED : 0;
	guard_files_path(e->path, mnt, dentry);
	guard_event_submit(e);
	return ret;
}

/* One dentry, one or two accesses: the whole decision of most path hooks. */
static __always_inline int guard_files_check(struct vfsmount *mnt, struct dentry *dentry,
					     __u8 want)
{
	struct guard_inode_result res = {};
	struct guard_scope scope = {};

	if (!dentry || !guard_files_scope(&scope))
		return 0;
	guard_files_decide(dentry, &scope, want, &res);
	return guard_files_report(&res, (__u32)scope.ruleset, GUARD_HOOK_PATH_CHANGE, mnt, dentry);
}

/*
 * Two dentries of one operation (rename, link): the destination is judged
 * first and a denial there ends it; otherwise the source is judged. Each side
 * that is reported gets its own event, naming its own path. Judged one after
 * the other, not merged: nothing of the first decision is live in the second,
 * which keeps the verifier's work at twice one check.
 */
static __always_inline int guard_files_check_two(struct vfsmount *mnt,
						 struct dentry *source, __u8 source_want,
						 struct dentry *target, __u8 target_want)
{
	int ret = guard_files_check(mnt, target, target_want);

	if (ret)
		return ret;
	return guard_files_check(mnt, source, source_want);
}

/*
 * The path a file was opened by, for the event: f_path, or for a backing file
 * (FMODE_BACKING, since 6.8: overlayfs opening the real file of one of its
 * files) the user's path, stored right after the struct file (struct
 * backing_file, fs/file_table.c; file_user_path() reads it the same way).
 */
static __always_inline void guard_files_user_path(struct file *file, fmode_t f_mode,
						  struct path *out)
{
	const void *src = &file->f_path;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	if (f_mode & FMODE_BACKING)
		src = (char *)file + sizeof(struct file);
#endif
	bpf_probe_read_kernel(out, sizeof(*out), src);
}

LSM_PROBE(file_open, struct file *file, int ret)
{
	struct guard_inode_result res = {};
	struct guard_scope scope = {};
	struct path user = {};
	unsigned int f_flags;
	fmode_t f_mode;
	__u8 want = 0;

	if (ret)
		return ret;
	f_mode = file->f_mode;
	f_flags = file->f_flags;
	/* exec's own opens belong to exec.bpf.c */
	if ((f_mode & GUARD_FILES_FMODE_EXEC) || (f_flags & GUARD_FILES_FMODE_EXEC))
		return 0;
	/*
	 * read: FMODE_READ; write: FMODE_WRITE or O_TRUNC, except for a file this
	 * open created, whose creation path_mknod judged as a write a moment ago.
	 * Bit arithmetic, not branches: one verifier state for every open mode.
	 */
	want = (f_mode & FMODE_READ) ? GUARD_ACCESS_READ : 0;
	want |= ((f_mode & FMODE_WRITE) | (f_flags & GUARD_FILES_O_TRUNC)) ? GUARD_ACCESS_WRITE : 0;
	want &= (f_mode & FMODE_CREATED) ? GUARD_ACCESS_READ : GUARD_FILES_RW;
	if (!want || !guard_files_scope(&scope))
		return 0;
	/* a backing file's f_path is the real file: judged by its own identity */
	guard_files_decide(file->f_path.dentry, &scope, want, &res);
	guard_files_user_path(file, f_mode, &user);
	return guard_files_report(&res, (__u32)scope.ruleset, GUARD_HOOK_FILE_OPEN,
				  user.mnt, user.dentry);
}

LSM_PROBE(path_mknod, const struct path *dir, struct dentry *dentry, unsigned long mode,
	  unsigned long dev, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(dir->mnt, dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_mkdir, const struct path *dir, struct dentry *dentry, unsigned long mode,
	  int ret)
{
	if (ret)
		return ret;
	return guard_files_check(dir->mnt, dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_symlink, const struct path *dir, struct dentry *dentry, const char *old_name,
	  int ret)
{
	if (ret)
		return ret;
	return guard_files_check(dir->mnt, dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_unlink, const struct path *dir, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(dir->mnt, dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_rmdir, const struct path *dir, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(dir->mnt, dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_rename, const struct path *old_dir, struct dentry *old_dentry,
	  const struct path *new_dir, struct dentry *new_dentry, unsigned long flags, int ret)
{
	__u8 target = GUARD_ACCESS_WRITE;

	if (ret)
		return ret;
	if (flags & GUARD_FILES_RENAME_EXCHANGE)
		target = GUARD_FILES_RW;    /* the destination's file moves to the source */
	/* rename never crosses mounts (EXDEV): one mount for both sides */
	return guard_files_check_two(new_dir->mnt, old_dentry, GUARD_FILES_RW,
				     new_dentry, target);
}

LSM_PROBE(path_link, struct dentry *old_dentry, const struct path *new_dir,
	  struct dentry *new_dentry, int ret)
{
	if (ret)
		return ret;
	/* link never crosses mounts (EXDEV): the source is on new_dir's mount */
	return guard_files_check_two(new_dir->mnt, old_dentry, GUARD_FILES_RW,
				     new_dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_truncate, const struct path *path, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(path->mnt, path->dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_chmod, const struct path *path, unsigned long mode, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(path->mnt, path->dentry, GUARD_ACCESS_WRITE);
}

LSM_PROBE(path_chown, const struct path *path, unsigned long uid, unsigned long gid, int ret)
{
	if (ret)
		return ret;
	return guard_files_check(path->mnt, path->dentry, GUARD_ACCESS_WRITE);
}
