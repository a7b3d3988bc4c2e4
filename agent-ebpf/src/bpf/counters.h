// Per-task counter maps that more than one object uses: each program keeps
// its own, and books.bpf.c is loaded over all of them to read them in its
// walk, so their definitions must be one.
#ifndef BUTTE_COUNTERS_H
#define BUTTE_COUNTERS_H

// What network.bpf.c counts per task.
struct net_stats {
    __u64 tx_bytes;
    __u64 tx_packets;
    __u64 tx_dropped;
    __u64 rx_bytes;
    __u64 rx_packets;
    __u64 rx_dropped;
};

// A hash map of MAX_TASKS entries keyed by a task's v2 cgroup id.
#define TASK_COUNTER_MAP(name, value_type)      \
    struct {                                    \
        __uint(type, BPF_MAP_TYPE_HASH);        \
        __uint(max_entries, MAX_TASKS);         \
        __type(key, __u64);                     \
        __type(value, value_type);              \
    } name SEC(".maps")

#endif
