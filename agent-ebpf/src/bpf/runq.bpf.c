// The run-queue latency histogram of the tasks that ask for one, kept in
// each task's cgroup (cgroup local storage, 6.2 on): at switch-in, the
// scheduler's enqueue stamp (sched_info.last_queued, rq clock) against the
// run queue's clock, as a log2 histogram; the wait /proc/PID/schedstat sums
// as run_delay. A cgroup has storage only while the agent gave it some, so
// a thread of any other cgroup costs a pointer chase and one short list
// walk, not a hash lookup; and the storage goes with the cgroup.
//
// Where CPU time comes from the kernel's books this is the only program on
// sched_switch, attached while some task keeps a histogram. Elsewhere
// (older kernels, no books) accounting.bpf.c keeps the histogram.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "sched.h"
#include "runq.h"

RUNQ_STORAGE(runq);

// sched_switch(bool preempt, prev, next, ...): it runs before next's
// arrival is booked (sched_info.last_queued still set).
SEC("tp_btf/sched_switch")
int runq_latency(__u64 *ctx)
{
    struct task_struct *next = (struct task_struct *)ctx[2];
    // pid 0: the idle thread of a CPU.
    if (!next->pid)
        return 0;
    __u64 queued = next->sched_info.last_queued;
    if (!queued)
        return 0;
    struct histogram *histogram = bpf_cgrp_storage_get(&runq, next->cgroups->dfl_cgrp, 0, 0);
    if (!histogram)
        return 0;
    __u64 now = next->se.cfs_rq->rq->clock;
    if (now <= queued)
        return 0;
    count_wait(histogram, now - queued);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
