// Port fences: a task may bind only inside the port ranges it was given (and
// port 0, i.e. an ephemeral port); any other bind fails with EPERM at bind
// time. Keyed by the task's v2 cgroup id; a cgroup without an entry is not a
// task of ours and is let through.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"
#include <bpf/bpf_endian.h>

#define MAX_RANGES 16

struct port_ranges {
    __u32 count;
    __u16 ranges[MAX_RANGES][2];
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_TASKS);
    __type(key, __u64);
    __type(value, struct port_ranges);
} task_ports SEC(".maps");

TASK_COUNTER_MAP(denied_binds, __u64);

static __always_inline int allowed(struct bpf_sock_addr *ctx)
{
    __u64 cgroup = bpf_get_current_cgroup_id();
    struct port_ranges *ranges = bpf_map_lookup_elem(&task_ports, &cgroup);
    __u16 port = bpf_ntohs((__u16)ctx->user_port);
    if (port == 0)
        return 1;
    /* Deny by default: a cgroup below the agent's subtree that was not
     * fenced binds no port but 0, as a task given no ports. */
    if (!ranges)
        return 0;
    for (int i = 0; i < MAX_RANGES; i++) {
        if (i >= ranges->count)
            break;
        if (port >= ranges->ranges[i][0] && port <= ranges->ranges[i][1])
            return 1;
    }
    __u64 one = 1;
    __u64 *denied = bpf_map_lookup_elem(&denied_binds, &cgroup);
    if (denied)
        __sync_fetch_and_add(denied, 1);
    else
        bpf_map_update_elem(&denied_binds, &cgroup, &one, BPF_NOEXIST);
    return 0;
}

SEC("cgroup/bind4")
int bind4(struct bpf_sock_addr *ctx)
{
    return allowed(ctx);
}

SEC("cgroup/bind6")
int bind6(struct bpf_sock_addr *ctx)
{
    return allowed(ctx);
}

char LICENSE[] SEC("license") = "GPL";
