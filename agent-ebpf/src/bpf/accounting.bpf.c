// Per-task accounting and events, keyed by the task's v2 cgroup id. A cgroup
// is accounted only once the agent put a zeroed entry for it in `task_stats`.
// Where the kernel's per-cgroup books give CPU time (books.bpf.c), the agent
// attaches sched_switch only while some task keeps a run-queue histogram
// (`runq_wanted`), and runs neither iterator.
//
// The hot path is sched_switch, which runs for every switch on the machine,
// so it keeps no per-thread state: a thread's counts are found by one hash
// lookup on its v2 cgroup id. (Filtering first on the cgroup's parent being
// the agent's subtree cost more than it saved: it touched one more cold
// line per lookup, 750-900 against 670-680 ns a run at 500 tasks.)
//
// - CPU time: the scheduler's own runtime counter, se.sum_exec_runtime,
//   which only ever grows. A thread's last switch (state TASK_DEAD) adds its
//   whole runtime to `exited_cpu_ns`; the `flush` iterator, run by the
//   sampler before each read, sums the runtime of threads not yet dead into
//   a snapshot (`live_cpu_ns`) and moves what died since the last flush
//   into `cpu_ns`, so a read counts a thread at most once. Slices counted
//   at switch-out lost each thread's last one (BENCHMARKS.md). A thread
//   moved into another cgroup takes its whole runtime along; the agent
//   never moves one.
// - Run-queue latency: at switch-in, the scheduler's own enqueue stamp
//   (sched_info.last_queued, rq clock) against the run queue's clock, as a
//   log2 histogram. This is the wait /proc/PID/schedstat sums as run_delay.
// - The tick-sampled user/system split (utime/stime) only divides the CPU
//   time: live threads' by the `split` iterator every few samples (a
//   snapshot), exited threads' at exit (taking them out of the snapshot).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "runq.h"

#include "sched.h"

struct bpf_iter_meta {
    __u64 seq_num;
} __attribute__((preserve_access_index));

struct bpf_iter__task {
    struct bpf_iter_meta *meta;
    struct task_struct *task;
} __attribute__((preserve_access_index));


struct task_stats {
    __u64 cpu_ns;    // exited threads' runtime, up to the last flush
    __u64 user_ns;   // exited threads' utime
    __u64 system_ns; // exited threads' stime
    struct histogram runq; // run-queue waits, where runq_wanted
    // Snapshot of the live threads, replaced by each flush:
    __u64 live_cpu_ns;    // runtime of live threads
    __u64 live_user_ns;   // utime of live threads
    __u64 live_system_ns; // stime of live threads
    // Runtime of threads that exited since the last flush, which moves it
    // into cpu_ns (until then they may still be in the snapshot).
    __u64 exited_cpu_ns;
    // Nonzero: the task keeps a run-queue latency histogram.
    __u64 runq_wanted;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_TASKS);
    __type(key, __u64);
    __type(value, struct task_stats);
} task_stats SEC(".maps");

// task_struct flags and states.
#define PF_EXITING 0x00000004
#define TASK_DEAD 0x00000080

#define EVENT_EXEC 1
#define EVENT_EXIT 2
#define EVENT_OOM_KILL 3

struct event {
    __u64 cgroup;
    __u64 time_ns;
    __u32 kind;
    __u32 pid;
    __s32 exit_code;
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline __u64 task_cgroup(struct task_struct *task)
{
    return task->cgroups->dfl_cgrp->kn->id;
}

// The counts of the task `thread` belongs to, or 0 if it is not ours.
static __always_inline struct task_stats *stats_of(struct task_struct *thread)
{
    __u64 key = task_cgroup(thread);
    return bpf_map_lookup_elem(&task_stats, &key);
}

// sched_switch(bool preempt, prev, next, ...); it runs after the scheduler
// updated prev's runtime and its run queue's clock, and before next's
// arrival is booked (sched_info.last_queued still set). prev's state is read
// from the task rather than the tracepoint's fourth argument, which only
// kernels from 5.18 pass.
SEC("tp_btf/sched_switch")
int switch_task(__u64 *ctx)
{
    struct task_struct *prev = (struct task_struct *)ctx[1];
    struct task_struct *next = (struct task_struct *)ctx[2];

    // A thread's last switch: its runtime is final.
    if (prev->__state == TASK_DEAD) {
        struct task_stats *stats = stats_of(prev);
        if (stats)
            __sync_fetch_and_add(&stats->exited_cpu_ns, prev->se.sum_exec_runtime);
    }

    // pid 0: the idle thread of a CPU.
    if (!next->pid)
        return 0;
    __u64 queued = next->sched_info.last_queued;
    if (!queued)
        return 0;
    struct task_stats *stats = stats_of(next);
    if (!stats || !stats->runq_wanted)
        return 0;
    __u64 now = next->se.cfs_rq->rq->clock;
    if (now <= queued)
        return 0;
    count_wait(&stats->runq, now - queued);
    return 0;
}

struct bpf_map;

// Banks what exited since the last flush and empties the snapshot.
static long start_flush(struct bpf_map *map, __u64 *key, struct task_stats *stats, void *ctx)
{
    stats->live_cpu_ns = 0;
    __u64 exited = __sync_lock_test_and_set(&stats->exited_cpu_ns, 0);
    __sync_fetch_and_add(&stats->cpu_ns, exited);
    return 0;
}

// Run by the agent before each sample: replaces the live CPU snapshot with
// the runtime of every thread not yet dead (a dead one, a zombie leader, was
// counted at its last switch).
SEC("iter/task")
int flush(struct bpf_iter__task *ctx)
{
    if (ctx->meta->seq_num == 0)
        bpf_for_each_map_elem(&task_stats, start_flush, 0, 0);
    struct task_struct *thread = ctx->task;
    if (!thread || thread->__state == TASK_DEAD)
        return 0;
    struct task_stats *stats = stats_of(thread);
    if (stats)
        __sync_fetch_and_add(&stats->live_cpu_ns, thread->se.sum_exec_runtime);
    return 0;
}

// What the last `split` added of a thread to its task's live_user/system_ns,
// so its exit takes it back out: off the hot path, only `split` and exit
// touch it.
struct split_seen {
    __u64 generation;
    __u64 user;
    __u64 system;
};

struct {
    __uint(type, BPF_MAP_TYPE_TASK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, int);
    __type(value, struct split_seen);
} split_seen SEC(".maps");

// Counts `split` runs; a thread's split_seen is current when it matches.
__u64 split_generation = 0;

static long clear_live_split(struct bpf_map *map, __u64 *key, struct task_stats *stats, void *ctx)
{
    stats->live_user_ns = 0;
    stats->live_system_ns = 0;
    return 0;
}

// Run by the agent every few samples (the split moves slowly and visiting
// every thread costs): replaces the live utime/stime snapshot.
SEC("iter/task")
int split(struct bpf_iter__task *ctx)
{
    if (ctx->meta->seq_num == 0) {
        __sync_fetch_and_add(&split_generation, 1);
        bpf_for_each_map_elem(&task_stats, clear_live_split, 0, 0);
    }
    struct task_struct *thread = ctx->task;
    // An exiting thread's utime/stime is counted at its exit.
    if (!thread || (thread->flags & PF_EXITING))
        return 0;
    struct task_stats *stats = stats_of(thread);
    if (!stats)
        return 0;
    struct split_seen *seen =
        bpf_task_storage_get(&split_seen, thread, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!seen)
        return 0;
    __u64 user = thread->utime, system = thread->stime;
    seen->generation = split_generation;
    seen->user = user;
    seen->system = system;
    __sync_fetch_and_add(&stats->live_user_ns, user);
    __sync_fetch_and_add(&stats->live_system_ns, system);
    return 0;
}

static __always_inline void emit(__u32 kind, struct task_struct *task, __u64 cgroup)
{
    struct event *event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
    if (!event)
        return;
    event->cgroup = cgroup;
    event->time_ns = bpf_ktime_get_ns();
    event->kind = kind;
    event->pid = task->tgid;
    event->exit_code = task->exit_code;
    bpf_probe_read_kernel_str(event->comm, sizeof(event->comm), task->comm);
    bpf_ringbuf_submit(event, 0);
}

// sched_process_exec(task, old_pid, bprm)
SEC("tp_btf/sched_process_exec")
int exec(__u64 *ctx)
{
    __u64 cgroup = bpf_get_current_cgroup_id();
    if (bpf_map_lookup_elem(&task_stats, &cgroup))
        emit(EVENT_EXEC, (struct task_struct *)ctx[0], cgroup);
    return 0;
}

// sched_process_exit(task, group_dead): per thread; its runtime is counted
// at its last switch, still to come. One event per process, not per thread.
SEC("tp_btf/sched_process_exit")
int exit_process(__u64 *ctx)
{
    struct task_struct *task = (struct task_struct *)ctx[0];
    __u64 cgroup = task_cgroup(task);
    struct task_stats *stats = bpf_map_lookup_elem(&task_stats, &cgroup);
    if (!stats)
        return 0;
    struct split_seen *seen = bpf_task_storage_get(&split_seen, task, 0, 0);
    if (seen && seen->generation == split_generation) {
        __sync_fetch_and_sub(&stats->live_user_ns, seen->user);
        __sync_fetch_and_sub(&stats->live_system_ns, seen->system);
    }
    __sync_fetch_and_add(&stats->user_ns, task->utime);
    __sync_fetch_and_add(&stats->system_ns, task->stime);
    if (task->pid == task->tgid)
        emit(EVENT_EXIT, task, cgroup);
    return 0;
}

// mark_victim(task, uid): the OOM killer chose `task`.
SEC("tp_btf/mark_victim")
int oom_victim(__u64 *ctx)
{
    struct task_struct *task = (struct task_struct *)ctx[0];
    __u64 cgroup = task_cgroup(task);
    if (bpf_map_lookup_elem(&task_stats, &cgroup))
        emit(EVENT_OOM_KILL, task, cgroup);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
