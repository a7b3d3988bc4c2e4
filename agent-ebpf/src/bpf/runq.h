// The run-queue histogram: kept in an asking task's cgroup (cgroup local
// storage, RUNQ_STORAGE), written by runq.bpf.c at each switch-in and read
// by books.bpf.c's walk (built WITH_RUNQ, over the same map); or, before
// 6.2, in the accounting program's per-task entry.
#ifndef BUTTE_RUNQ_H
#define BUTTE_RUNQ_H

#define RUNQ_SLOTS 32

// The map type's number (6.2 on), which the uapi headers Debian 12 installs
// do not name yet; libbpf's helper definitions have bpf_cgrp_storage_get.
#define MAP_TYPE_CGRP_STORAGE 32

// The agent's `Histogram` has the same layout.
struct histogram {
    __u64 count;
    __u64 total_ns;
    __u64 slots[RUNQ_SLOTS]; // slot i: latency in [2^i, 2^(i+1)) microseconds
};

// The storage map, in the objects that use it (the type exists from 6.2).
#define RUNQ_STORAGE(name)                      \
    struct {                                    \
        __uint(type, MAP_TYPE_CGRP_STORAGE);    \
        __uint(map_flags, BPF_F_NO_PREALLOC);   \
        __type(key, int);                       \
        __type(value, struct histogram);        \
    } name SEC(".maps")

// Counts one wait of `waited_ns` (enqueue to switch-in).
static __always_inline void count_wait(struct histogram *histogram, __u64 waited_ns)
{
    __u64 micros = waited_ns / 1000;
    __u32 slot = 0;
    for (int i = 0; i < RUNQ_SLOTS - 1; i++) {
        if (micros < 2)
            break;
        micros >>= 1;
        slot++;
    }
    if (slot < RUNQ_SLOTS)
        __sync_fetch_and_add(&histogram->slots[slot], 1);
    __sync_fetch_and_add(&histogram->count, 1);
    __sync_fetch_and_add(&histogram->total_ns, waited_ns);
}

#endif
