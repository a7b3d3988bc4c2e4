// The scheduler's fields our sched_switch and task programs read
// (accounting.bpf.c, runq.bpf.c), relocated against the running kernel's
// BTF (CO-RE), so no kernel headers or vmlinux.h are needed. In tp_btf and
// iter programs these are plain loads, not helper calls.
#ifndef BUTTE_SCHED_H
#define BUTTE_SCHED_H

struct kernfs_node {
    __u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
    struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
    struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct rq {
    __u64 clock;
} __attribute__((preserve_access_index));

struct cfs_rq {
    struct rq *rq;
} __attribute__((preserve_access_index));

struct sched_entity {
    __u64 sum_exec_runtime;
    struct cfs_rq *cfs_rq;
} __attribute__((preserve_access_index));

struct sched_info {
    __u64 last_queued;
} __attribute__((preserve_access_index));

struct task_struct {
    unsigned int __state;
    unsigned int flags;
    int pid;
    int tgid;
    int exit_code;
    __u64 utime;
    __u64 stime;
    struct sched_entity se;
    struct sched_info sched_info;
    struct css_set *cgroups;
    char comm[16];
} __attribute__((preserve_access_index));

#endif
