// Per-task accounting and events, keyed by the task's v2 cgroup id. A cgroup
// is accounted only once the agent put a zeroed entry for it in `task_stats`.
// Its threads are marked when they are born (wakeup_new) with a task-local
// storage entry that remembers the key, so the hot paths (every switch and
// wakeup on the machine) cost one storage lookup for everyone else.
//
// CPU time is the scheduler's own runtime counter (se.sum_exec_runtime),
// summed as deltas when a thread switches out; the agent's sampler runs the
// `flush` iterator first so threads that have not switched out since (a busy
// loop alone on a core) are counted up to the last tick too. Run-queue
// latency is wakeup (or preemption) to switch-in, as a log2 histogram.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

// The few kernel fields we read, relocated against the running kernel's BTF
// (CO-RE), so no kernel headers or vmlinux.h are needed.
struct kernfs_node {
    __u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
    struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
    struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct sched_entity {
    __u64 sum_exec_runtime;
} __attribute__((preserve_access_index));

struct task_struct {
    int pid;
    int tgid;
    int exit_code;
    __u64 utime;
    __u64 stime;
    struct sched_entity se;
    struct css_set *cgroups;
    char comm[16];
} __attribute__((preserve_access_index));

struct seq_file;
struct bpf_iter_meta {
    struct seq_file *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__task {
    struct bpf_iter_meta *meta;
    struct task_struct *task;
} __attribute__((preserve_access_index));

#define RUNQ_SLOTS 32

struct task_stats {
    __u64 cpu_ns;
    __u64 user_ns;   // raw tick-sampled split of cpu_ns (task utime)
    __u64 system_ns; // (task stime)
    __u64 runq_count;
    __u64 runq_total_ns;
    __u64 runq_slots[RUNQ_SLOTS]; // slot i: latency in [2^i, 2^(i+1)) microseconds
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct task_stats);
} task_stats SEC(".maps");

// What we last counted of each thread, and when it became runnable.
struct thread_state {
    __u64 cgroup; // the task's key in task_stats
    __u64 runtime;
    __u64 utime;
    __u64 stime;
    __u64 runnable_since;
};

struct {
    __uint(type, BPF_MAP_TYPE_TASK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, int);
    __type(value, struct thread_state);
} threads SEC(".maps");

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
    return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

// Moves `*last` up to `now` and returns how far it moved; a racing caller
// that already moved it further gets 0, so nothing is counted twice.
static __always_inline __u64 advance(__u64 *last, __u64 now)
{
    for (int i = 0; i < 4; i++) {
        __u64 seen = *last;
        if (now <= seen)
            return 0;
        if (__sync_val_compare_and_swap(last, seen, now) == seen)
            return now - seen;
    }
    return 0;
}

// The runtime since the thread was last counted (every switch-out).
static __always_inline void count_cpu(struct task_struct *task, struct thread_state *thread)
{
    struct task_stats *stats = bpf_map_lookup_elem(&task_stats, &thread->cgroup);
    if (!stats)
        return;
    __u64 ran = advance(&thread->runtime, task->se.sum_exec_runtime);
    if (ran)
        __sync_fetch_and_add(&stats->cpu_ns, ran);
}

// The tick-sampled user/system split only serves to divide cpu_ns, so it is
// counted off the hot path: at each flush and when the thread exits.
static __always_inline void count_split(struct task_struct *task, struct thread_state *thread)
{
    struct task_stats *stats = bpf_map_lookup_elem(&task_stats, &thread->cgroup);
    if (!stats)
        return;
    __u64 user = advance(&thread->utime, task->utime);
    __u64 system = advance(&thread->stime, task->stime);
    if (user)
        __sync_fetch_and_add(&stats->user_ns, user);
    if (system)
        __sync_fetch_and_add(&stats->system_ns, system);
}

// A thread of a tracked task: its storage entry, created on first sight
// when `create` (a new thread, or one the flush finds running).
static __always_inline struct thread_state *tracked(struct task_struct *task, int create)
{
    struct thread_state *thread = bpf_task_storage_get(&threads, task, 0, 0);
    if (thread || !create)
        return thread;
    __u64 cgroup = task_cgroup(task);
    if (!bpf_map_lookup_elem(&task_stats, &cgroup))
        return 0;
    thread = bpf_task_storage_get(&threads, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (thread)
        thread->cgroup = cgroup;
    return thread;
}

static __always_inline __u32 log2_slot(__u64 micros)
{
    __u32 slot = 0;
    for (int i = 0; i < RUNQ_SLOTS - 1; i++) {
        if (micros < 2)
            break;
        micros >>= 1;
        slot++;
    }
    return slot;
}

SEC("tp_btf/sched_wakeup")
int wakeup(__u64 *ctx)
{
    struct thread_state *thread = tracked((struct task_struct *)ctx[0], 0);
    if (thread)
        thread->runnable_since = bpf_ktime_get_ns();
    return 0;
}

// A new thread: the one place its cgroup is read (it is born in its task's).
SEC("tp_btf/sched_wakeup_new")
int wakeup_new(__u64 *ctx)
{
    struct thread_state *thread = tracked((struct task_struct *)ctx[0], 1);
    if (thread)
        thread->runnable_since = bpf_ktime_get_ns();
    return 0;
}

// sched_switch(bool preempt, prev, next, unsigned int prev_state); it runs
// while `prev` is still current.
SEC("tp_btf/sched_switch")
int switch_task(__u64 *ctx)
{
    struct task_struct *prev = (struct task_struct *)ctx[1];
    struct task_struct *next = (struct task_struct *)ctx[2];
    __u64 prev_state = ctx[3];

    struct thread_state *thread = tracked(prev, 0);
    if (thread) {
        count_cpu(prev, thread);
        // Preempted while runnable (TASK_RUNNING): it waits in the queue again.
        if (prev_state == 0)
            thread->runnable_since = bpf_ktime_get_ns();
    }

    thread = tracked(next, 0);
    if (!thread || !thread->runnable_since)
        return 0;
    struct task_stats *stats = bpf_map_lookup_elem(&task_stats, &thread->cgroup);
    if (!stats)
        return 0;
    __u64 waited = bpf_ktime_get_ns() - thread->runnable_since;
    thread->runnable_since = 0;
    __u32 slot = log2_slot(waited / 1000);
    if (slot < RUNQ_SLOTS)
        __sync_fetch_and_add(&stats->runq_slots[slot], 1);
    __sync_fetch_and_add(&stats->runq_count, 1);
    __sync_fetch_and_add(&stats->runq_total_ns, waited);
    return 0;
}

// Run by the agent before each sample: counts what running threads have
// used since they last switched in (up to the scheduler's last update).
SEC("iter/task")
int flush(struct bpf_iter__task *ctx)
{
    struct task_struct *task = ctx->task;
    if (!task)
        return 0;
    struct thread_state *thread = tracked(task, 0);
    if (thread) {
        count_cpu(task, thread);
        count_split(task, thread);
    }
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

// sched_process_exit(task, group_dead): one event per process, not per thread.
SEC("tp_btf/sched_process_exit")
int exit_process(__u64 *ctx)
{
    struct task_struct *task = (struct task_struct *)ctx[0];
    struct thread_state *thread = tracked(task, 0);
    if (thread)
        count_split(task, thread);
    if (task->pid != task->tgid)
        return 0;
    __u64 cgroup = bpf_get_current_cgroup_id();
    if (bpf_map_lookup_elem(&task_stats, &cgroup))
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
