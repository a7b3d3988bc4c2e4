// The kernel's own per-cgroup books, read in one pass: a sleepable cgroup
// iterator, attached at the agent's subtree (pre-order), flushes the
// subtree's rstat once, at its root, then writes one fixed-size record per
// cgroup below it: CPU from the rstat base stats (what cpu.stat shows),
// memory from the memcg page counter (what memory.current or
// memory.usage_in_bytes shows), and the PSI totals (what cpu.pressure,
// memory.pressure and io.pressure show). The records go to a memory-mapped
// array per hierarchy, one slot per live cgroup in walk order, which the
// agent reads in place after the walk: no file per task, no walk of
// threads, no syscall per task. (Not through the iterator's own output: a cgroup walk
// cannot go on across a second read(), and one read holds 32 KiB, about
// 340 records.)
//
// The counters our own programs keep per task (bytes and packets each way,
// bandwidth drops, denied binds and device opens) are read in the same pass:
// the agent loads this object over those programs' maps (same definitions
// as in network.bpf.c, ports.bpf.c and devices.bpf.c).
//
// On a hybrid host the memory controller is on v1: a v2 cgroup has no memcg
// of its own there, so the walk takes the one its tasks are charged to,
// from the css_set of its first task set (every task of a container is in
// the same v1 memcg): one walk still.
//
// Fields are read with plain loads where the verifier can follow the
// pointer (BTF), a probe read only past a container_of or a cast: in this
// VM a probe read costs about as much as the rest of a cgroup's record.
#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "counters.h"
#ifdef WITH_RUNQ
#include "runq.h"
RUNQ_STORAGE(runq);
#endif

struct kernfs_node {
    __u64 id;
} __attribute__((preserve_access_index));

struct task_cputime {
    __u64 stime;
    __u64 utime;
    __u64 sum_exec_runtime;
} __attribute__((preserve_access_index));

struct cgroup_base_stat {
    struct task_cputime cputime;
} __attribute__((preserve_access_index));

typedef struct {
    long counter;
} atomic_long_t;

struct page_counter {
    atomic_long_t usage;
} __attribute__((preserve_access_index));

struct cgroup_subsys_state {
    struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct list_head {
    struct list_head *next;
    struct list_head *prev;
};

// A task set's css per controller (whatever hierarchy it is on).
struct css_set {
    struct cgroup_subsys_state *subsys[12];
} __attribute__((preserve_access_index));

// Links a cgroup to the task sets with tasks in it (cgroup->cset_links).
struct cgrp_cset_link {
    struct css_set *cset;
    struct list_head cset_link;
} __attribute__((preserve_access_index));

// Its css is its first member: a css pointer is the mem_cgroup's.
struct mem_cgroup {
    struct cgroup_subsys_state css;
    struct page_counter memory;
} __attribute__((preserve_access_index));

struct psi_group {
    bool enabled;
    __u64 total[8];
} __attribute__((preserve_access_index));

struct cgroup_root {
    int hierarchy_id;
} __attribute__((preserve_access_index));

struct cgroup {
    struct cgroup_subsys_state self;
    struct cgroup_root *root;
    int level;
    struct kernfs_node *kn;
    struct cgroup_subsys_state *subsys[12];
    struct list_head cset_links;
    struct cgroup_base_stat bstat;
    struct psi_group *psi;
} __attribute__((preserve_access_index));

enum cgroup_subsys_id {
    memory_cgrp_id = 4,
};

enum psi_states {
    PSI_IO_SOME = 0,
    PSI_IO_FULL = 1,
    PSI_MEM_SOME = 2,
    PSI_MEM_FULL = 3,
    PSI_CPU_SOME = 4,
    PSI_CPU_FULL = 5,
};

struct bpf_iter_meta {
    __u64 seq_num;
    struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__cgroup {
    struct bpf_iter_meta *meta;
    struct cgroup *cgroup;
} __attribute__((preserve_access_index));

// The rstat flush kfunc's call, its immediate patched at load with the
// kernel's BTF id of cgroup_rstat_flush (to 6.15) or css_rstat_flush (6.16
// on; its css argument is the cgroup's first member, `self`): aya, our
// loader, does not resolve kfunc calls itself. BPF_JMP|BPF_CALL with
// src_reg BPF_PSEUDO_KFUNC_CALL (2); 0x7ff0b001 is the placeholder. On a
// kernel with neither, the agent patches in `r0 = 0` instead, and takes the
// CPU figure from elsewhere.
#define RSTAT_FLUSH(cgrp)                                                     \
    asm volatile("r1 = %[arg]\n\t"                                            \
                 ".byte 0x85, 0x20, 0x00, 0x00, 0x01, 0xb0, 0xf0, 0x7f"       \
                 :                                                            \
                 : [arg] "r"(cgrp)                                            \
                 : "r0", "r1", "r2", "r3", "r4", "r5", "memory")

// Set by the agent at load (sysconf(_SC_PAGESIZE)): the page counter counts pages.
const volatile __u64 page_size = 4096;
// Set by the agent at load where the memory controller is on a v1
// hierarchy (/proc/cgroups).
const volatile bool memory_on_v1 = false;

// The other programs' per-task counters, shared at load.
TASK_COUNTER_MAP(task_net, struct net_stats);
TASK_COUNTER_MAP(denied_binds, __u64);
TASK_COUNTER_MAP(denied_opens, __u64);

// One cgroup's books; the agent's `Record` has the same layout.
struct record {
    __u64 walk; // the walk that wrote it: others are stale
    __u64 cgroup;
    __u64 cpu_ns;
    __u64 user_ns;
    __u64 system_ns;
    __u64 memory_bytes;
    __u64 cpu_some_ns;
    __u64 cpu_full_ns;
    __u64 memory_some_ns;
    __u64 memory_full_ns;
    __u64 io_some_ns;
    __u64 io_full_ns;
    struct net_stats net;
    __u64 denied_binds;
    __u64 denied_opens;
    __u32 flags;
    __u32 level;
};

#define HAS_MEMORY 1
#define HAS_PSI 2
#define HAS_RUNQ 4

// Walks so far; the agent runs one at a time.
__u64 walks = 0;
// The slot the walk's next record goes to. Not the iterator's seq_num: the
// kernel counts the dead cgroups it passes over (a removed cgroup stays in
// its parent's list while anything holds it, as a dying memcg does) without
// running the program for them, which would leave holes in the slots.
__u32 next_slot = 1;

// The records in walk order. Slot 0 is the walk's header (its number,
// written at the subtree's root); the agent reads the slots after it while
// they carry the same number. (Not a clock: a sleepable walk may move
// between CPUs, whose clocks an emulated machine does not keep in step.)
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, MAX_TASKS + 1);
    __type(key, __u32);
    __type(value, struct record);
} books SEC(".maps");

#ifdef WITH_RUNQ
// The run-queue histograms of the cgroups that keep one (HAS_RUNQ), in the
// slots of their records; the others' slots are not written.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, MAX_TASKS + 1);
    __type(key, __u32);
    __type(value, struct histogram);
} histograms SEC(".maps");
#endif

// The memcg a cgroup's memory is charged to: its own where the controller
// is on for it (pure v2); on a hybrid host the v1 memcg of its tasks,
// through its first task set; 0 where neither (no tasks, or no controller).
static __always_inline struct mem_cgroup *memcg_of(struct cgroup *cgrp)
{
    int memory = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id) & 15;
    if (memory >= 12)
        return 0;
    if (!memory_on_v1) {
        struct cgroup_subsys_state *css = cgrp->subsys[memory];
        // A css is this cgroup's own only where the controller is enabled here.
        if (css && css->cgroup == cgrp)
            return (struct mem_cgroup *)css;
        return 0;
    }
    struct list_head *head = &cgrp->cset_links;
    struct list_head *first = head->next;
    if (!first || first == head)
        return 0; // no tasks
    __u64 link = (__u64)first - bpf_core_field_offset(struct cgrp_cset_link, cset_link);
    struct css_set *cset = 0;
    bpf_probe_read_kernel(&cset, sizeof(cset),
                          (void *)(link + bpf_core_field_offset(struct cgrp_cset_link, cset)));
    struct cgroup_subsys_state *css = 0;
    if (cset)
        bpf_probe_read_kernel(&css, sizeof(css), &cset->subsys[memory]);
    return (struct mem_cgroup *)css;
}

// total[PSI_AVGS][state]: PSI_AVGS is the first row, so a state's flat
// index is its value on this kernel, whatever the row's length (6 or 7
// states, so the first 8 totals are always in the array's 12 or 14).
#define PSI_TOTAL(totals, state) totals[bpf_core_enum_value(enum psi_states, state) & 7]

SEC("iter.s/cgroup")
int read_books(struct bpf_iter__cgroup *ctx)
{
    struct cgroup *cgrp = ctx->cgroup;
    if (!cgrp)
        return 0;
    // The first cgroup of a pre-order walk is the subtree's root: one flush
    // there brings every cgroup below it up to date.
    if (ctx->meta->seq_num == 0) {
        RSTAT_FLUSH(cgrp);
        struct record header = {};
        __u32 zero = 0;
        header.walk = __sync_add_and_fetch(&walks, 1);
        bpf_map_update_elem(&books, &zero, &header, BPF_ANY);
        next_slot = 1;
        return 0;
    }
    // Slot 1 for the first cgroup below the root. The record is written
    // in place (an array's lookup is a pointer into it): every field, as
    // the slot holds an older walk's.
    __u32 slot = next_slot;
    if (slot > MAX_TASKS)
        return 0;
    struct record *record = bpf_map_lookup_elem(&books, &slot);
    if (!record)
        return 0;
    next_slot = slot + 1;
    __u64 id = cgrp->kn->id;
    record->cgroup = id;
    record->level = cgrp->level;
    __u32 flags = 0;

    struct mem_cgroup *memcg = memcg_of(cgrp);
    long pages = 0;
    if (memcg) {
        bpf_probe_read_kernel(&pages, sizeof(pages), &memcg->memory.usage.counter);
        flags |= HAS_MEMORY;
    }
    record->memory_bytes = (__u64)pages * page_size;

    record->cpu_ns = cgrp->bstat.cputime.sum_exec_runtime;
    record->user_ns = cgrp->bstat.cputime.utime;
    record->system_ns = cgrp->bstat.cputime.stime;

    struct psi_group *psi = 0;
    if (bpf_core_field_exists(cgrp->psi))
        psi = cgrp->psi;
    bool enabled = psi != 0;
    if (psi && bpf_core_field_exists(psi->enabled))
        enabled = psi->enabled;
    if (enabled) {
        __u64 *totals = psi->total;
        record->cpu_some_ns = PSI_TOTAL(totals, PSI_CPU_SOME);
        record->cpu_full_ns = bpf_core_enum_value_exists(enum psi_states, PSI_CPU_FULL)
                                  ? PSI_TOTAL(totals, PSI_CPU_FULL)
                                  : 0;
        record->memory_some_ns = PSI_TOTAL(totals, PSI_MEM_SOME);
        record->memory_full_ns = PSI_TOTAL(totals, PSI_MEM_FULL);
        record->io_some_ns = PSI_TOTAL(totals, PSI_IO_SOME);
        record->io_full_ns = PSI_TOTAL(totals, PSI_IO_FULL);
        flags |= HAS_PSI;
    }
    struct net_stats *net = bpf_map_lookup_elem(&task_net, &id);
    if (net) {
        record->net = *net;
    } else {
        struct net_stats none = {};
        record->net = none;
    }
    __u64 *denied = bpf_map_lookup_elem(&denied_binds, &id);
    record->denied_binds = denied ? *denied : 0;
    denied = bpf_map_lookup_elem(&denied_opens, &id);
    record->denied_opens = denied ? *denied : 0;
#ifdef WITH_RUNQ
    struct histogram *kept = bpf_cgrp_storage_get(&runq, cgrp, 0, 0);
    struct histogram *copy = bpf_map_lookup_elem(&histograms, &slot);
    if (kept && copy) {
        *copy = *kept;
        flags |= HAS_RUNQ;
    }
#endif
    record->flags = flags;
    // Last: the agent takes a record as this walk's by its number.
    record->walk = walks;
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
