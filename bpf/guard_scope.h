/* SPDX-License-Identifier: GPL-2.0 */
/*
 * guard_scope.h - which ruleset judges an actor, written once for every
 * family: the ancestor walk and the scope cache in front of it.
 *
 * A scope is a cgroup that guard_scopes names (per slot). The ruleset of an
 * actor is that of the deepest scoped cgroup containing the actor's cgroup:
 * the current task's (LSM and sock_addr programs) or the socket's that sent a
 * packet (cgroup_skb). One walk serves both (guard_scope_walk): it takes the
 * packet, a constant NULL for task callers, so each program keeps only the
 * helper its type allows (bpf_get_current_ancestor_cgroup_id, or
 * bpf_skb_ancestor_cgroup_id).
 *
 * The scope cache: the answer for a cgroup, remembered per cgroup id, so that
 * a decision does one hash lookup instead of the walk (one helper call per
 * level, GUARD_MAX_CGROUP_DEPTH of them, and a lookup per existing level).
 * The same cgroup gives the same answer to every family and program type: the
 * scope depends only on the cgroup's ancestors and the slot's guard_scopes
 * entries. An entry carries everything a family needs to return early without
 * another lookup (struct guard_scope_cached).
 *
 * Why a cached entry is exact: within one generation user space never writes the
 * active slot's maps (guard/apply.py fills the idle slot, flips, and only then
 * clears the old one), and a cgroup's ancestors never change (cgroup2 refuses to
 * move a directory to another parent; ids are never reused). The kernel writes
 * the active slot's guard_scopes in two cases only (scope.bpf.c), neither of which
 * an entry can depend on: the entry of a cgroup being made at a scope path (before
 * any process can be in it, and before it has descendants), and the removal of the
 * entries of a removed cgroup. So an entry is stamped with
 * the (generation, slot) it was computed for and is used only by a decision that
 * read that same pair: a reload invalidates every entry without a write.
 *
 * The pair comes from ONE 8-byte load of guard_config, and is cacheable only
 * when slot == generation & 1, which every apply keeps (it flips the slot and
 * bumps the generation together, from 0/0). A read torn between two configs
 * breaks that parity: such a decision walks without the cache, still with the
 * one slot it read, and neither reads nor writes an entry (stamped with the new
 * generation and the old slot, an entry would send the cgroup to the old slot,
 * emptied after the flip, for the whole generation). Entries never go stale in
 * another way; an evicted one is recomputed.
 *
 * The value carries its key: an LRU element can be recycled for another cgroup
 * while a program that looked it up still holds it (prealloc hash elements are
 * reused at once), and such a copy then names another cgroup and is refused.
 */
#ifndef GUARD_SCOPE_H
#define GUARD_SCOPE_H

#include "guard_maps.h"

#define GUARD_SCOPE_CACHE_ENTRIES 16384

enum guard_scope_flags {        /* what the cgroup's ruleset has */
	GUARD_SCOPE_EGRESS = 1,     /* an egress section (its egress default exists) */
	GUARD_SCOPE_FILES  = 2,     /* a file rule (has_files) */
	GUARD_SCOPE_EXEC   = 4,     /* an exec section (its exec default exists) */
};

struct guard_scope_cached {
	__u64 cgroup_id;            /* the key, again: see above */
	__u64 scope_cgroup;         /* the scoped cgroup that matched; 0: none */
	__u32 generation;
	__u32 slot;
	__s32 ruleset;              /* slot-qualified; -1: no policy covers the cgroup */
	__u32 flags;                /* enum guard_scope_flags */
	__u32 subtree;              /* the ruleset's subtree bits (GUARD_ACCESS_*) */
	__u32 _pad;
};

BPF_TABLE("lru_hash", __u64, struct guard_scope_cached, guard_scope_cache,
	  GUARD_SCOPE_CACHE_ENTRIES);

/* One decision's scope: the slot it read once, and what it found in that slot. */
struct guard_scope {
	__u32 slot;                 /* the slot every lookup of the decision uses */
	__u32 generation;
	__u32 cacheable;            /* the (generation, slot) pair may key the cache */
	__s32 ruleset;              /* slot-qualified; -1: no policy covers the actor */
	__u32 flags;                /* enum guard_scope_flags */
	__u32 subtree;              /* the ruleset's subtree bits */
	__u64 scope_cgroup;         /* the scoped cgroup that matched; 0: none */
};

/* Read guard_config once for a decision: slot, generation, and whether they agree. */
static __always_inline void guard_scope_begin(struct guard_scope *s)
{
	__u32 zero = 0;
	struct guard_config *config = guard_config.lookup(&zero);
	struct guard_config copy = {};
	__u64 word;

	s->ruleset = -1;
	s->flags = 0;
	s->subtree = 0;
	s->scope_cgroup = 0;
	if (!config) {
		s->slot = 0;
		s->generation = 0;
		s->cacheable = 0;
		return;
	}
	word = *(volatile __u64 *)config;   /* one load: both fields of one config */
	__builtin_memcpy(&copy, &word, sizeof(copy));
	s->slot = copy.active_slot & 1;
	s->generation = copy.generation;
	s->cacheable = copy.active_slot == (copy.generation & 1);
}

/*
 * The slot-qualified ruleset of the deepest scoped cgroup containing the
 * actor's cgroup, or -1, and in *matched that scoped cgroup (0 for none).
 * The actor is the socket of ``skb``, or the current task when ``skb`` is a
 * constant NULL. Ancestor level 0 is the cgroup2 root; levels past the
 * actor's own cgroup return 0 and are skipped.
 */
static __always_inline int guard_scope_walk(struct __sk_buff *skb, __u32 slot, __u64 *matched)
{
	struct guard_scope_key key = {};

	key.slot = slot;
	*matched = 0;
	for (int level = GUARD_MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = skb ? bpf_skb_ancestor_cgroup_id(skb, level)
			       : bpf_get_current_ancestor_cgroup_id(level);
		__u32 *ruleset;

		if (!id)
			continue;
		key.cgroup_id = id;
		ruleset = guard_scopes.lookup(&key);
		if (ruleset) {
			*matched = id;
			return (int)(slot * GUARD_MAX_RULESETS + *ruleset);
		}
	}
	return -1;
}

/* 1, and s filled, when the cache has the cgroup for s's (generation, slot). */
static __always_inline int guard_scope_cache_get(__u64 cgroup, struct guard_scope *s)
{
	struct guard_scope_cached *cached;
	__u64 scope_cgroup;
	__s32 ruleset;
	__u32 flags;
	__u32 subtree;

	if (!s->cacheable)
		return 0;
	cached = guard_scope_cache.lookup(&cgroup);
	if (!cached)
		return 0;
	/* the key last: an element rewritten for another cgroup meanwhile shows it there */
	ruleset = *(volatile __s32 *)&cached->ruleset;
	flags = *(volatile __u32 *)&cached->flags;
	subtree = *(volatile __u32 *)&cached->subtree;
	scope_cgroup = *(volatile __u64 *)&cached->scope_cgroup;
	if (*(volatile __u32 *)&cached->generation != s->generation ||
	    *(volatile __u32 *)&cached->slot != s->slot ||
	    *(volatile __u64 *)&cached->cgroup_id != cgroup)
		return 0;
	s->ruleset = ruleset;
	s->flags = flags;
	s->subtree = subtree;
	s->scope_cgroup = scope_cgroup;
	return 1;
}

/* Fill s from a walk's answer (in s->slot), and remember it for the cgroup. */
static __always_inline void guard_scope_cache_put(__u64 cgroup, struct guard_scope *s,
						  int ruleset, __u64 scope_cgroup)
{
	struct guard_scope_cached fresh = {};
	struct guard_ruleset *rs;
	__u32 flags = 0;
	__u32 subtree = 0;

	if (ruleset >= 0) {
		rs = guard_ruleset_get((__u32)ruleset);
		if (rs) {
			if (rs->egress_default.present)
				flags |= GUARD_SCOPE_EGRESS;
			if (rs->has_files)
				flags |= GUARD_SCOPE_FILES;
			if (rs->exec_default.present)
				flags |= GUARD_SCOPE_EXEC;
			subtree = rs->subtree;
		}
	}
	s->ruleset = ruleset;
	s->flags = flags;
	s->subtree = subtree;
	s->scope_cgroup = scope_cgroup;
	if (!s->cacheable)
		return;
	fresh.cgroup_id = cgroup;
	fresh.scope_cgroup = scope_cgroup;
	fresh.generation = s->generation;
	fresh.slot = s->slot;
	fresh.ruleset = ruleset;
	fresh.flags = flags;
	fresh.subtree = subtree;
	guard_scope_cache.update(&cgroup, &fresh);
}

/*
 * The scope of one decision, through the cache; the actor as for
 * guard_scope_walk. s->slot is the slot every other lookup of the decision
 * must use.
 */
static __always_inline void guard_scope_of(struct __sk_buff *skb, struct guard_scope *s)
{
	__u64 cgroup = skb ? bpf_skb_cgroup_id(skb) : bpf_get_current_cgroup_id();
	__u64 matched = 0;
	int ruleset;

	guard_scope_begin(s);
	if (guard_scope_cache_get(cgroup, s))
		return;
	ruleset = guard_scope_walk(skb, s->slot, &matched);
	guard_scope_cache_put(cgroup, s, ruleset, matched);
}

/* The scope of the current task (LSM, sock_addr programs). */
static __always_inline void guard_current_scope(struct guard_scope *s)
{
	guard_scope_of(0, s);
}

/* The scope of the socket that sent a packet (cgroup_skb programs). */
static __always_inline void guard_skb_scope(struct __sk_buff *skb, struct guard_scope *s)
{
	if (!skb) {
		/* never (the context), but it tells the compiler so: the task's
		 * helpers, which cgroup_skb programs may not call, are then left out */
		guard_scope_begin(s);
		return;
	}
	guard_scope_of(skb, s);
}

#endif /* GUARD_SCOPE_H */
