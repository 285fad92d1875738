/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard.h - the one definition of what guard's kernel programs and user space
 * share: the event record, the map keys and values, verdicts and limits.
 *
 * Fixed-width types only. guard/layout.py mirrors every struct with ctypes and
 * tests/unit/test_layout.py proves sizes, offsets and enum values agree.
 *
 * Policy data never appears in C: policies are map entries, so a reload never
 * recompiles. Map *definitions* live in guard_maps.h (bcc macros) so this header
 * stays plain C that any compiler can check. What only the kernel side needs
 * lives beside the code using it: guard_scope.h (which ruleset covers a
 * cgroup), guard_inode.h (the decision for one file), guard_actor.h (the
 * acting process of an LSM event).
 */
#ifndef GUARD_H
#define GUARD_H

/* Limits. Every loop in the programs is bounded by one of these. */
#define GUARD_MAX_CGROUP_DEPTH   32    /* ancestors walked to find a scope */
#define GUARD_MAX_PATH_DEPTH     32    /* parent directories walked for subtree rules */
#define GUARD_MAX_PORT_LINES     16    /* lines in one port table */
#define GUARD_PATH_LEN           256   /* object path in an event */
#define GUARD_COMM_LEN           16
#define GUARD_NAME_LEN           256   /* a path component: NAME_MAX + 1 */
#define GUARD_SCOPE_PATH_LEN     256   /* a scope's cgroup path in guard_scope_paths, with
                                        * its NUL: longer paths are not followed (apply warns) */

/* Map sizes (entries). */
#define GUARD_MAX_SCOPES         8192
#define GUARD_MAX_RULESETS       1024  /* per generation slot */
#define GUARD_MAX_INODE_ENTRIES  1048576 /* guard_inodes: 100,000 exact exec paths and
                                         * 100,000 file paths are 400,000 keys a slot,
                                         * and both slots are full during a reload */
#define GUARD_MAX_NET_ENTRIES    262144
#define GUARD_MAX_PORT_TABLES    16384
#define GUARD_MAX_RULES          262144
#define GUARD_RINGBUF_BYTES      (4 * 1024 * 1024)

/*
 * The file filter (guard_file_filter, an array of __u64 words): per slot, a
 * Bloom filter of every (ino, dev) that appears in a guard_inodes key of that
 * slot (exec and file rules alike), the subtree summary (ino 0, dev 0)
 * excepted. An inode sets GUARD_FILE_FILTER_PROBES bits, all in one word, so
 * a test is one array read. Any of its bits clear proves that no key of the
 * slot has that inode, and the decision (guard_inode.h) skips the lookups (and
 * for NAME keys the name hash) it would have done: a non-matching open or exec
 * pays array reads, not hash lookups, whatever
 * the number of rules. All bits set may be other inodes' (a false positive:
 * about 0.1% of inodes with 100,000 keys, 2.4% with one bit per inode); then
 * the lookup is done as without the filter, so the filter never changes a
 * decision. Slot s uses words s * GUARD_FILE_FILTER_WORDS onwards.
 */
#define GUARD_FILE_FILTER_WORDS_LOG2 16
#define GUARD_FILE_FILTER_WORDS      65536    /* per slot: 512 KiB */
#define GUARD_FILE_FILTER_PROBES     3        /* bits per inode, in one word */

/*
 * The hash of (ino, dev): dev spread by an odd multiplier and added to ino,
 * then the 64-bit finalizer of MurmurHash3 (xor-shift, multiply, twice), whose
 * output bits each depend on every input bit. A mixer, not a plain
 * multiplicative hash: after a plain multiplication, consecutive inode numbers
 * of two file systems differ by a constant offset and crowd into the same
 * words, making half the inodes of one file system false positives for the
 * other. Arithmetic modulo 2^64. Its top 16 bits choose the word, the next
 * three 6-bit fields the bits. guard/layout.py file_filter_word_mask()
 * computes the same; tests/unit/test_file_filter.py compares the two.
 */
static inline __attribute__((always_inline)) __u64 guard_file_filter_hash(__u64 ino, __u32 dev)
{
	__u64 x = ino + (__u64)dev * 0x9E3779B97F4A7C15ULL;

	x ^= x >> 33;
	x *= 0xFF51AFD7ED558CCDULL;
	x ^= x >> 33;
	x *= 0xC4CEB9FE1A85EC53ULL;
	x ^= x >> 33;
	return x;
}

/* The word of an inode's hash, within its slot's words. */
static inline __attribute__((always_inline)) __u32 guard_file_filter_word(__u64 hash)
{
	return (__u32)(hash >> (64 - GUARD_FILE_FILTER_WORDS_LOG2));
}

/* The inode's bits in that word. */
static inline __attribute__((always_inline)) __u64 guard_file_filter_mask(__u64 hash)
{
	return (1ULL << ((hash >> 42) & 63)) | (1ULL << ((hash >> 36) & 63)) |
	       (1ULL << ((hash >> 30) & 63));
}

/*
 * Two generation slots make a reload atomic: user space fills the idle slot,
 * then writes guard_config (active_slot and generation, one 8-byte value) in
 * one map update. A program reads both fields in one 8-byte load
 * (guard_scope.h), once per decision, and every lookup of the decision uses
 * that slot, so a decision sees the whole old set or the whole new one.
 * Ruleset ids and port table ids are slot-local; the kernel adds
 * slot * GUARD_MAX_RULESETS (resp. GUARD_MAX_PORT_TABLES) itself.
 */
#define GUARD_SLOTS 2

enum guard_verdict {            /* ordered by strength: the stronger wins a tie */
	GUARD_ALLOW      = 0,
	GUARD_AUDIT      = 1,   /* allowed, reported */
	GUARD_WOULD_DENY = 2,   /* deny in an audit-mode policy: allowed, reported */
	GUARD_DENY       = 3,
};

enum guard_kind {
	GUARD_KIND_EXEC    = 1,
	GUARD_KIND_FILE    = 2,
	GUARD_KIND_CONNECT = 3,
	GUARD_KIND_TAMPER  = 4,   /* an attempt to switch guard off (tamper.bpf.c) */
};

enum guard_hook {               /* which kernel hook made the decision */
	GUARD_HOOK_BPRM_CHECK   = 1,
	GUARD_HOOK_MMAP_FILE    = 2,
	GUARD_HOOK_FILE_MPROTECT = 3,
	GUARD_HOOK_FILE_OPEN    = 4,
	GUARD_HOOK_PATH_CHANGE  = 5,  /* create, unlink, rename, link, truncate */
	GUARD_HOOK_CONNECT4     = 6,
	GUARD_HOOK_CONNECT6     = 7,
	GUARD_HOOK_SENDMSG4     = 8,
	GUARD_HOOK_SENDMSG6     = 9,
	GUARD_HOOK_SKB_EGRESS   = 10,
	GUARD_HOOK_BPF          = 11, /* tamper: the bpf() syscall */
	GUARD_HOOK_TASK_KILL    = 12, /* tamper: a signal to the daemon */
	GUARD_HOOK_PTRACE       = 13, /* tamper: ptrace, /proc/PID/mem... of the daemon */
	GUARD_HOOK_BPFFS_UNLINK = 14, /* tamper: unlink in bpffs (a pin) */
	GUARD_HOOK_BPFFS_RENAME = 15,
	GUARD_HOOK_BPFFS_RMDIR  = 16,
	GUARD_HOOK_BPFFS_UMOUNT = 17,
};

enum guard_inode_match {
	GUARD_MATCH_EXACT   = 1,  /* key is the file's own inode */
	GUARD_MATCH_SUBTREE = 2,  /* key is an ancestor directory's inode */
	GUARD_MATCH_NAME    = 3,  /* key is (parent inode, hash of the name) */
};

enum guard_access {             /* bits */
	GUARD_ACCESS_READ  = 1,
	GUARD_ACCESS_WRITE = 2,
	GUARD_ACCESS_EXEC  = 4,     /* running the file (exec rules); never in an event */
};

enum guard_flags {              /* guard_event.flags bits */
	GUARD_EVENT_UNDECIDED = 1,    /* the program could not finish its walk */
};

enum guard_stat {               /* indices of the per-CPU guard_stats array */
	GUARD_STAT_EVENTS        = 0, /* events written to the ring buffer */
	GUARD_STAT_EVENTS_LOST   = 1, /* events the ring buffer could not take */
	GUARD_STAT_UNDECIDED     = 2, /* walks that hit a bound; enforce mode denies */
	GUARD_STAT_DENIED        = 3,
	GUARD_STAT_AUDITED       = 4,
	GUARD_STAT_SUPPRESSED    = 5, /* packet events folded into a later one */
	GUARD_STAT_TAMPER        = 6, /* tamper attempts denied (also in DENIED) */
	GUARD_STAT_SCOPE_LOST    = 7, /* new cgroups at a scope path that guard_scopes
	                               * had no room for (scope.bpf.c): left unscoped */
	GUARD_STAT_COUNT         = 8,
};

/* --- map values and keys ------------------------------------------------ */

struct guard_config {           /* guard_config[0] */
	__u32 active_slot;          /* 0 or 1 */
	__u32 generation;           /* bumped on every applied reload */
};

struct guard_decision {
	__u32 rule_id;              /* index into the rule table of the slot; 0: none */
	__u8  verdict;              /* enum guard_verdict */
	__u8  present;              /* 1 when this decision exists */
	__u8  _pad[2];
};

struct guard_scope_key {        /* guard_scopes: cgroup -> ruleset */
	__u32 slot;
	__u32 _pad;
	__u64 cgroup_id;
};

/*
 * guard_scope_paths: a scope's cgroup path (relative to the cgroup2 root, as the
 * cgroup_mkdir tracepoint gives it: "/a/b"), zero-padded, -> slot-local ruleset id.
 * The whole path is the key, so the map compares every byte: no other path can
 * collide into a scope (scope.bpf.c).
 */
struct guard_scope_path_key {
	__u32 slot;
	char  path[GUARD_SCOPE_PATH_LEN];
};

struct guard_ruleset {          /* guard_rulesets[slot * GUARD_MAX_RULESETS + id] */
	struct guard_decision exec_default;
	struct guard_decision egress_default;
	__u32 has_files;            /* 1 when any file rule exists: skip the walk otherwise */
	__u32 subtree;              /* GUARD_ACCESS_* bits some subtree rule decides (the
	                             * summary key's present decisions): the parent walk
	                             * runs only for these accesses, exec included */
};

struct guard_inode_key {        /* guard_inodes: exec and file rules */
	__u64 ino;
	__u32 dev;                  /* the kernel's s_dev: (major << 20) | minor */
	__u32 ruleset;              /* slot * GUARD_MAX_RULESETS + id */
	__u32 match;                /* enum guard_inode_match */
	__u32 _pad;
	__u64 name_hash;            /* GUARD_MATCH_NAME only: FNV-1a 64 of the name */
};

/*
 * guard_names: the name of every NAME key, under the same key. The hash only
 * finds the entry; the kernel then compares the dentry's name with this one
 * byte for byte, and a different name is no match (a hash collision an
 * attacker computed offline matches nothing).
 */
struct guard_name {
	__u32 len;                  /* bytes in name, no NUL; 1..GUARD_NAME_LEN - 1 */
	unsigned char name[GUARD_NAME_LEN];
};

struct guard_inode_value {      /* guard_inodes: a decision per access */
	struct guard_decision read;     /* file rules */
	struct guard_decision write;
	struct guard_decision exec;     /* exec rules */
};

struct guard_net4_key {         /* LPM trie: prefixlen counts ruleset bits too */
	__u32 prefixlen;            /* 32 + the CIDR's prefix length */
	__u32 ruleset;              /* big-endian in the trie, written by user space */
	__u8  addr[4];
};

struct guard_net6_key {
	__u32 prefixlen;            /* 32 + the CIDR's prefix length */
	__u32 ruleset;              /* big-endian */
	__u8  addr[16];
};

struct guard_port_line {
	__u16 first;                /* host byte order, inclusive */
	__u16 last;
	__u8  proto;                /* IPPROTO_TCP, IPPROTO_UDP, 0 for any */
	__u8  verdict;
	__u16 _pad;
	__u32 rule_id;
};

struct guard_port_table {       /* guard_port_tables[slot * GUARD_MAX_PORT_TABLES + id] */
	__u32 count;
	__u32 _pad;
	struct guard_port_line lines[GUARD_MAX_PORT_LINES];
};

/*
 * guard_tamper[0]: who is guard, written once at start and then frozen
 * (BPF_MAP_FREEZE), so no bpf() caller can rewrite it afterwards.
 */
struct guard_tamper_config {
	__u32 daemon_tgid;          /* the daemon: exempt, and protected from signals/ptrace */
	__u32 _pad;
	__u64 host_cgroup_id;       /* a process whose deepest scope is this cgroup (a
	                             * whole-host policy) is not tamper-protected */
};

/* --- the event record: one per decision worth reporting ----------------- */

struct guard_event {
	__u64 time_ns;              /* bpf_ktime_get_boot_ns() */
	__u64 cgroup_id;
	__u32 pid;                  /* tgid */
	__u32 tid;
	__u32 ppid;
	__u32 uid;
	__u32 rule_id;
	__u32 ruleset;              /* slot-qualified, tells the slot of rule_id */
	__u32 count;                /* > 1 when the kernel folded repeats into this one */
	__u32 flags;                /* enum guard_flags */
	__u8  kind;                 /* enum guard_kind */
	__u8  hook;                 /* enum guard_hook */
	__u8  verdict;              /* enum guard_verdict */
	__u8  access;               /* enum guard_access bits, file events */
	__u8  family;               /* AF_INET / AF_INET6, connect events */
	__u8  proto;
	__u16 port;                 /* host byte order; tamper: bpf command, signal, ptrace mode */
	__u8  addr[16];             /* IPv4 in the first 4 bytes; tamper: target tgid (u32) */
	char  comm[GUARD_COMM_LEN];
	char  path[GUARD_PATH_LEN]; /* exec: the file run; file: the file opened;
	                             * tamper: the pin's name, the target's comm */
	char  exe[GUARD_PATH_LEN];  /* the acting process's executable, if known */
};

#endif /* GUARD_H */
