// Device fences: a task may open (or mknod) only the devices on its allow
// list; anything else is EPERM. Keyed by the task's v2 cgroup id; a cgroup
// without an entry is not a task of ours and is let through.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"

#define MAX_RULES 64
#define ANY 0xffffffffu

struct device_rule {
    __u32 type;   // BPF_DEVCG_DEV_CHAR, BPF_DEVCG_DEV_BLOCK, or 0 for both
    __u32 major;  // ANY for all
    __u32 minor;  // ANY for all
    __u32 access; // BPF_DEVCG_ACC_* bits allowed
};

struct device_rules {
    __u32 count;
    struct device_rule rules[MAX_RULES];
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_TASKS);
    __type(key, __u64);
    __type(value, struct device_rules);
} task_devices SEC(".maps");

TASK_COUNTER_MAP(denied_opens, __u64);

SEC("cgroup/dev")
int devices(struct bpf_cgroup_dev_ctx *ctx)
{
    __u64 cgroup = bpf_get_current_cgroup_id();
    struct device_rules *list = bpf_map_lookup_elem(&task_devices, &cgroup);
    /* Deny by default: a cgroup below the agent's subtree that was not
     * fenced (a bug, or one a task made) opens no device. */
    if (!list)
        return 0;
    __u32 type = ctx->access_type & 0xffff;
    __u32 access = ctx->access_type >> 16;
    for (int i = 0; i < MAX_RULES; i++) {
        if (i >= list->count)
            break;
        struct device_rule *rule = &list->rules[i];
        if ((rule->type == 0 || rule->type == type) &&
            (rule->major == ANY || rule->major == ctx->major) &&
            (rule->minor == ANY || rule->minor == ctx->minor) &&
            (access & rule->access) == access)
            return 1;
    }
    __u64 one = 1;
    __u64 *denied = bpf_map_lookup_elem(&denied_opens, &cgroup);
    if (denied)
        __sync_fetch_and_add(denied, 1);
    else
        bpf_map_update_elem(&denied_opens, &cgroup, &one, BPF_NOEXIST);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
