/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard_inode.h - the decision for one file, written once for exec and files:
 * which rule of a ruleset decides an access (read, write, exec) to the file
 * behind a dentry. exec.bpf.c asks for GUARD_ACCESS_EXEC, files.bpf.c for
 * read and write; guard.evaluate (decide_exec, decide_open) is the offline
 * twin and walks a plan the same way.
 *
 * guard_inodes holds every key of exec and file rules, a decision per access
 * (struct guard_inode_value); a key with no decision for an access is, for
 * that access, no key at all. Most specific first (guard_inode_decide):
 *   1. the file itself: its EXACT key (inode number + the kernel's s_dev;
 *      absent for a name being created) and its NAME key (parent directory
 *      inode + FNV-1a 64 of the dentry name, the name itself compared with
 *      the one stored in guard_names on a hit). Both are "this exact path"
 *      rules: if both decide an access the stronger verdict wins, as for any
 *      tie. EXACT follows the file through symlinks, hard links and bind
 *      mounts; NAME follows the name through a rename-over (package upgrade)
 *      or a file created after load.
 *   2. SUBTREE keys of the parent directories, deepest first, walking
 *      d_parent up to the root of the file's superblock, at most
 *      GUARD_MAX_PATH_DEPTH directories; an entry without a decision for the
 *      access is passed over. User space (guard/resolve.py) registers the
 *      root of every mount below a subtree rule's directory with that rule's
 *      decision.
 *   3. nothing: GUARD_FROM_NONE. The caller applies its default (exec's
 *      ruleset default; file rules have none).
 * Each access is decided on its own, all in the same walk. The walk runs only
 * for the accesses some subtree rule of the ruleset decides (the ruleset's
 * subtree bits, cached with the scope): user space marks them with a summary
 * entry, the SUBTREE key with ino 0 and dev 0, whose decision per access is
 * the strongest any subtree rule of the ruleset gives. When the walk reaches
 * its bound (or a directory it cannot read) before the root, the program
 * cannot know which subtree rule covers the file, and likewise when it stops
 * at a disconnected dentry (its own parent, but not its superblock's root:
 * open_by_handle_at of a file whose path the dentry cache has dropped), whose
 * ancestors are unknown: the access gets the
 * summary's decision, flagged undecided (the caller counts
 * GUARD_STAT_UNDECIDED and flags the event): an enforcing ruleset with any
 * deny there therefore denies, fail closed.
 *
 * Cost: every lookup by an inode is preceded by a test of that inode's bits in
 * the slot's file filter (guard_file_filter, see guard.h): a clear bit means
 * no key of the slot names the inode, and the lookup is skipped; for the NAME
 * key the parent's bits are tested before the name is read and hashed. Bits
 * all set cost only the lookup the decision would do without the filter, so
 * the filter changes the cost of a decision, never its outcome.
 */
#ifndef GUARD_INODE_H
#define GUARD_INODE_H

#include "guard_maps.h"

#include <linux/dcache.h>
#include <linux/fs.h>

enum guard_from {               /* where a decision came from; ordered by specificity */
	GUARD_FROM_NONE    = 0,
	GUARD_FROM_DEFAULT = 1,     /* the ruleset's exec default (exec.bpf.c) */
	GUARD_FROM_SUBTREE = 2,     /* a SUBTREE key, or the summary when undecided */
	GUARD_FROM_FILE    = 3,     /* EXACT or NAME key */
};

struct guard_inode_one {        /* the decision for one access */
	__u32 rule_id;
	__u8  verdict;
	__u8  from;                 /* enum guard_from */
	__u8  undecided;
	__u8  _pad;
};

struct guard_inode_result {
	struct guard_inode_one read;
	struct guard_inode_one write;
	struct guard_inode_one exec;
};

/*
 * How the decision reads below a dentry, a constant of each caller:
 *   GUARD_INODE_PROBE   through bpf_probe_read_kernel. exec needs it: the
 *                       dentry of an overlayfs mapping (the user's path of a
 *                       backing file) is not a pointer the verifier lets a
 *                       program dereference. Without it, plain loads: every
 *                       dentry files sees comes from a hook's arguments, typed
 *                       by BTF, and the verifier turns such loads into
 *                       fault-tolerant ones (a NULL pointer reads as 0); a
 *                       load is one instruction where a probe read is a helper
 *                       call, and on the path of every open() that difference
 *                       is most of the program's cost.
 *   GUARD_INODE_EXISTS  the file has an inode (exec: the file being run); one
 *                       that cannot be read leaves every access undecided,
 *                       with no summary (the caller's default decides).
 *                       Without it a negative dentry (a name being created)
 *                       has no EXACT key and goes on to its NAME key.
 */
#define GUARD_INODE_PROBE  1
#define GUARD_INODE_EXISTS 2

#define GUARD_INODE_LOAD(how, dst, src)                                          \
	do {                                                                     \
		if ((how) & GUARD_INODE_PROBE)                                   \
			bpf_probe_read_kernel(&(dst), sizeof(dst), &(src));      \
		else                                                             \
			(dst) = (src);                                           \
	} while (0)

#define GUARD_FNV_OFFSET 0xCBF29CE484222325ULL
#define GUARD_FNV_PRIME  0x100000001B3ULL

/*
 * Scratch space for a dentry name: too large for the 512-byte stack. It keeps
 * the name read for the hash, so that a NAME key's hit compares the very bytes
 * that were hashed.
 */
struct guard_inode_name {
	unsigned char bytes[GUARD_NAME_LEN];
	__u32 len;                  /* bytes, no NUL */
};
BPF_PERCPU_ARRAY(guard_inode_names, struct guard_inode_name, 1);

/*
 * FNV-1a 64 of a dentry name (kernel pointer ``name``), byte for byte what
 * guard.resolve.fnv1a64() computes for the basename: the NAME keys' hash. The
 * name stays in the per-CPU buffer for guard_inode_name_is(). A name that
 * cannot be read hashes to 0, which user space never registers.
 */
static __always_inline __u64 guard_name_hash_of(const unsigned char *name)
{
	__u32 zero = 0;
	struct guard_inode_name *buf = guard_inode_names.lookup(&zero);
	__u64 hash = GUARD_FNV_OFFSET;
	int len;

	if (!buf || !name)
		return 0;
	buf->len = 0;
	len = bpf_probe_read_kernel_str(buf->bytes, GUARD_NAME_LEN, name);
	if (len <= 1)
		return 0;
	buf->len = len - 1;
	/* Not unrolled: an unrolled copy hides the index bound from the verifier. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < GUARD_NAME_LEN; i++) {
		if (i >= len - 1)
			break;
		hash ^= buf->bytes[i];
		hash *= GUARD_FNV_PRIME;
	}
	return hash;
}

/* The NAME key's hash of a dentry's name; 0 when unreadable. */
static __always_inline __u64 guard_inode_name_hash(struct dentry *dentry, __u8 how)
{
	const unsigned char *name = 0;

	GUARD_INODE_LOAD(how, name, dentry->d_name.name);
	return guard_name_hash_of(name);
}

/*
 * After a NAME key's hit: 1 when the name just hashed (the per-CPU buffer) is
 * the name stored for the key in guard_names, byte for byte; 0 otherwise (a
 * colliding name, or no stored name), and then the key is no match. Run only
 * on a hit, so a name no rule has costs nothing here.
 */
static __always_inline int guard_inode_name_is(struct guard_inode_key *key)
{
	__u32 zero = 0;
	struct guard_inode_name *buf = guard_inode_names.lookup(&zero);
	struct guard_name *want = guard_names.lookup(key);
	__u32 len;

	if (!buf || !want)
		return 0;
	len = want->len;
	if (len != buf->len || len >= GUARD_NAME_LEN)
		return 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < GUARD_NAME_LEN - 1; i++) {
		if (i >= len)
			break;
		if (buf->bytes[i] != want->name[i])
			return 0;
	}
	return 1;
}

/* The filter words of the slot a slot-qualified ruleset belongs to. */
static __always_inline __u32 guard_inode_filter_base(__u32 ruleset)
{
	return ((ruleset / GUARD_MAX_RULESETS) & 1) * GUARD_FILE_FILTER_WORDS;
}

/*
 * 0 when no guard_inodes key of the filter's slot has (ino, dev): a lookup by
 * it would miss. ``base`` is the slot's first word. An array lookup, which the
 * verifier inlines; an index out of range (never: the word is below
 * GUARD_FILE_FILTER_WORDS) counts as a hit, so the lookup is done.
 */
static __always_inline int guard_inode_filter(__u32 base, __u64 ino, __u32 dev)
{
	__u64 hash = guard_file_filter_hash(ino, dev);
	__u64 mask = guard_file_filter_mask(hash);
	__u32 index = base + guard_file_filter_word(hash);
	__u64 *word = guard_file_filter.lookup(&index);

	if (!word)
		return 1;
	return (*word & mask) == mask;
}

/* The kernel's identity of a dentry's inode: i_ino and i_sb->s_dev. 0 without one. */
static __always_inline int guard_inode_identity(struct dentry *dentry, __u8 how,
						__u64 *ino, __u32 *dev)
{
	struct inode *inode = 0;
	struct super_block *sb = 0;
	unsigned long i_ino = 0;
	dev_t s_dev = 0;

	GUARD_INODE_LOAD(how, inode, dentry->d_inode);
	if (!inode)
		return 0;
	GUARD_INODE_LOAD(how, sb, inode->i_sb);
	if (!sb)
		return 0;
	GUARD_INODE_LOAD(how, i_ino, inode->i_ino);
	GUARD_INODE_LOAD(how, s_dev, sb->s_dev);
	*ino = i_ino;
	*dev = s_dev;
	return 1;
}

static __always_inline struct dentry *guard_inode_parent(struct dentry *dentry, __u8 how)
{
	struct dentry *parent = 0;

	GUARD_INODE_LOAD(how, parent, dentry->d_parent);
	return parent;
}

/*
 * A dentry that is its own parent (IS_ROOT): 1 when the walk that reached it
 * is complete, 0 when the dentry is disconnected and the walk could not reach
 * the root. Complete: the superblock's root (sb->s_root), or a file that was
 * never in a tree (a pipe, socket or memfd: no path leads to it, so no subtree
 * rule can cover it). Disconnected: DCACHE_DISCONNECTED, set on every dentry
 * the kernel makes from a file handle or an inode alone (d_obtain_alias:
 * open_by_handle_at, NFS export) until its path is connected again; its
 * real ancestors exist but are not in the dentry cache, so the subtree rules
 * that cover it are unknown.
 */
static __always_inline int guard_inode_top_is_root(struct dentry *top, __u8 how)
{
	struct super_block *sb = 0;
	struct dentry *root = 0;
	unsigned int flags = 0;

	GUARD_INODE_LOAD(how, sb, top->d_sb);
	if (sb)
		GUARD_INODE_LOAD(how, root, sb->s_root);
	if (root == top)
		return 1;
	GUARD_INODE_LOAD(how, flags, top->d_flags);
	return !(flags & DCACHE_DISCONNECTED);
}

/* The file level (EXACT, NAME): a present decision; the stronger of two on a tie. */
static __always_inline void guard_inode_take_file(struct guard_inode_one *one,
						  struct guard_decision *d)
{
	if (!d->present)
		return;
	if (one->from < GUARD_FROM_FILE || d->verdict > one->verdict) {
		one->rule_id = d->rule_id;
		one->verdict = d->verdict;
		one->from = GUARD_FROM_FILE;
	}
}

static __always_inline void guard_inode_take_files(struct guard_inode_result *res,
						   struct guard_inode_value *v, __u8 want)
{
	if (want & GUARD_ACCESS_READ)
		guard_inode_take_file(&res->read, &v->read);
	if (want & GUARD_ACCESS_WRITE)
		guard_inode_take_file(&res->write, &v->write);
	if (want & GUARD_ACCESS_EXEC)
		guard_inode_take_file(&res->exec, &v->exec);
}

/* A SUBTREE key on the walk, for one access still open: 1 when it decides it. */
static __always_inline int guard_inode_take_subtree(struct guard_inode_one *one,
						    struct guard_decision *d)
{
	if (!d->present)
		return 0;
	one->rule_id = d->rule_id;
	one->verdict = d->verdict;
	one->from = GUARD_FROM_SUBTREE;
	return 1;
}

/* The accesses of ``need`` still open after a SUBTREE key's decisions. */
static __always_inline __u8 guard_inode_take_subtrees(struct guard_inode_result *res,
						      struct guard_inode_value *v, __u8 need)
{
	if ((need & GUARD_ACCESS_READ) && guard_inode_take_subtree(&res->read, &v->read))
		need &= ~GUARD_ACCESS_READ;
	if ((need & GUARD_ACCESS_WRITE) && guard_inode_take_subtree(&res->write, &v->write))
		need &= ~GUARD_ACCESS_WRITE;
	if ((need & GUARD_ACCESS_EXEC) && guard_inode_take_subtree(&res->exec, &v->exec))
		need &= ~GUARD_ACCESS_EXEC;
	return need;
}

/*
 * An access the walk could not decide: the summary's decision (``d``, the
 * strongest any subtree rule could give), or none (allow, rule 0) when the
 * file itself could not be read.
 */
static __always_inline void guard_inode_take_undecided(struct guard_inode_one *one,
						       struct guard_decision *d)
{
	one->rule_id = 0;
	one->verdict = GUARD_ALLOW;
	if (d && d->present) {
		one->rule_id = d->rule_id;
		one->verdict = d->verdict;
	}
	one->from = GUARD_FROM_SUBTREE;
	one->undecided = 1;
}

static __always_inline void guard_inode_undecided(struct guard_inode_result *res,
						  struct guard_inode_value *summary, __u8 need)
{
	if (need & GUARD_ACCESS_READ)
		guard_inode_take_undecided(&res->read, summary ? &summary->read : 0);
	if (need & GUARD_ACCESS_WRITE)
		guard_inode_take_undecided(&res->write, summary ? &summary->write : 0);
	if (need & GUARD_ACCESS_EXEC)
		guard_inode_take_undecided(&res->exec, summary ? &summary->exec : 0);
}

/* The accesses of ``want`` that no key of the file level decided. */
static __always_inline __u8 guard_inode_open(struct guard_inode_result *res, __u8 want)
{
	__u8 open = 0;

	if ((want & GUARD_ACCESS_READ) && res->read.from == GUARD_FROM_NONE)
		open |= GUARD_ACCESS_READ;
	if ((want & GUARD_ACCESS_WRITE) && res->write.from == GUARD_FROM_NONE)
		open |= GUARD_ACCESS_WRITE;
	if ((want & GUARD_ACCESS_EXEC) && res->exec.from == GUARD_FROM_NONE)
		open |= GUARD_ACCESS_EXEC;
	return open;
}

/*
 * Decide the accesses ``want`` (GUARD_ACCESS_* bits) for the file behind
 * ``dentry`` in a slot-qualified ruleset whose subtree rules decide the
 * accesses ``subtree``; ``how``: GUARD_INODE_* flags, a constant. ``res``
 * starts zeroed; each access of ``want`` ends decided, or GUARD_FROM_NONE.
 */
static __always_inline void guard_inode_decide(struct dentry *dentry, __u32 ruleset, __u8 want,
					       __u8 subtree, __u8 how,
					       struct guard_inode_result *res)
{
	struct guard_inode_key key = {};
	struct guard_inode_value *value;
	struct dentry *parent;
	struct dentry *cur;
	__u32 base = guard_inode_filter_base(ruleset);
	__u8 need;
	int complete = 0;
	int failed = 0;

	key.ruleset = ruleset;

	/* 1. the file itself: its inode (when it exists), and its name in its directory */
	if (guard_inode_identity(dentry, how, &key.ino, &key.dev)) {
		if (guard_inode_filter(base, key.ino, key.dev)) {
			key.match = GUARD_MATCH_EXACT;
			value = guard_inodes.lookup(&key);
			if (value)
				guard_inode_take_files(res, value, want);
		}
	} else if (how & GUARD_INODE_EXISTS) {
		guard_inode_undecided(res, 0, want);
		return;
	}
	/* the name is read and hashed only when some key names its directory */
	parent = guard_inode_parent(dentry, how);
	if (parent && parent != dentry && guard_inode_identity(parent, how, &key.ino, &key.dev) &&
	    guard_inode_filter(base, key.ino, key.dev)) {
		key.name_hash = guard_inode_name_hash(dentry, how);
		if (key.name_hash) {
			key.match = GUARD_MATCH_NAME;
			value = guard_inodes.lookup(&key);
			/* the hash finds the entry, the name decides whether it matches */
			if (value && guard_inode_name_is(&key))
				guard_inode_take_files(res, value, want);
		}
	}

	/* 2. subtree rules, deepest first; only for accesses some subtree rule has */
	need = guard_inode_open(res, want) & subtree;
	if (!need)
		return;
	key.match = GUARD_MATCH_SUBTREE;
	key.name_hash = 0;
	cur = dentry;
	for (int depth = 0; depth < GUARD_MAX_PATH_DEPTH; depth++) {
		parent = guard_inode_parent(cur, how);
		if (parent == cur) {
			/* the superblock's root, or a disconnected dentry: undecided */
			complete = guard_inode_top_is_root(cur, how);
			failed = !complete;
			break;
		}
		if (!parent || !guard_inode_identity(parent, how, &key.ino, &key.dev)) {
			failed = 1;     /* unreadable: undecided */
			break;
		}
		cur = parent;
		if (!guard_inode_filter(base, key.ino, key.dev))
			continue;
		value = guard_inodes.lookup(&key);
		if (value) {
			need = guard_inode_take_subtrees(res, value, need);
			if (!need)
				return;
		}
	}
	/* At the bound, the last directory checked may be the root itself. */
	if (!complete && !failed)
		complete = guard_inode_parent(cur, how) == cur && guard_inode_top_is_root(cur, how);
	if (complete)
		return;
	/*
	 * Undecided: the summary's decision. It exists whenever the subtree bits
	 * have the access (apply writes both from the same summary entry, in one
	 * slot).
	 */
	key.ino = 0;
	key.dev = 0;
	value = guard_inodes.lookup(&key);
	if (value)
		guard_inode_undecided(res, value, need);
}

#endif /* GUARD_INODE_H */
