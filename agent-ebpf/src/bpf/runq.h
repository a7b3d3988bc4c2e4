// The run-queue histogram kept in an asking task's cgroup (cgroup local
// storage): written by runq.bpf.c at each switch-in, read by books.bpf.c's
// walk (built WITH_RUNQ, over the same map).
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

struct {
    __uint(type, MAP_TYPE_CGRP_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, int);
    __type(value, struct histogram);
} runq SEC(".maps");

#endif
