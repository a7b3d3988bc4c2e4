// Network accounting and bandwidth limits per task, keyed by the v2 cgroup
// id of the socket's cgroup. Egress over the task's `network_bandwidth` is
// dropped with congestion notification, so TCP backs off instead of
// retransmitting into a wall; ingress is policed only when the task asked.
//
// The bucket must hold ~250 ms of traffic: with 128 KB TCP collapsed to
// ~12 Mbit/s whatever the limit (KERNEL.md). The agent sizes it.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"


TASK_COUNTER_MAP(task_net, struct net_stats);

struct bucket {
    struct bpf_spin_lock lock;
    __u32 unused;
    __u64 rate;   // bytes per second
    __u64 depth;  // bytes
    __u64 tokens; // bytes
    __u64 last_ns;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_TASKS);
    __type(key, __u64);
    __type(value, struct bucket);
} egress_limits SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_TASKS);
    __type(key, __u64);
    __type(value, struct bucket);
} ingress_limits SEC(".maps");

#define NSEC_PER_SEC 1000000000ULL

// Takes `len` bytes of tokens if the bucket holds them.
static __always_inline int take(struct bucket *bucket, __u64 len)
{
    __u64 now = bpf_ktime_get_ns();
    int ok;
    bpf_spin_lock(&bucket->lock);
    // The first packet finds last_ns 0: the bucket holds what it started with.
    __u64 elapsed = bucket->last_ns && now > bucket->last_ns ? now - bucket->last_ns : 0;
    if (elapsed > NSEC_PER_SEC)
        elapsed = NSEC_PER_SEC;
    bucket->last_ns = now;
    __u64 tokens = bucket->tokens + elapsed * bucket->rate / NSEC_PER_SEC;
    if (tokens > bucket->depth)
        tokens = bucket->depth;
    ok = tokens >= len;
    if (ok)
        tokens -= len;
    bucket->tokens = tokens;
    bpf_spin_unlock(&bucket->lock);
    return ok;
}

static __always_inline __u64 packets(struct __sk_buff *skb)
{
    return skb->gso_segs > 1 ? skb->gso_segs : 1;
}

SEC("cgroup_skb/egress")
int egress(struct __sk_buff *skb)
{
    __u64 cgroup = bpf_skb_cgroup_id(skb);
    struct net_stats *stats = bpf_map_lookup_elem(&task_net, &cgroup);
    if (!stats)
        return 1;
    struct bucket *limit = bpf_map_lookup_elem(&egress_limits, &cgroup);
    if (limit && !take(limit, skb->len)) {
        __sync_fetch_and_add(&stats->tx_dropped, packets(skb));
        return 2; // drop, and tell TCP it met congestion
    }
    __sync_fetch_and_add(&stats->tx_bytes, skb->len);
    __sync_fetch_and_add(&stats->tx_packets, packets(skb));
    return 1;
}

SEC("cgroup_skb/ingress")
int ingress(struct __sk_buff *skb)
{
    __u64 cgroup = bpf_skb_cgroup_id(skb);
    struct net_stats *stats = bpf_map_lookup_elem(&task_net, &cgroup);
    if (!stats)
        return 1;
    struct bucket *limit = bpf_map_lookup_elem(&ingress_limits, &cgroup);
    if (limit && !take(limit, skb->len)) {
        __sync_fetch_and_add(&stats->rx_dropped, packets(skb));
        return 0;
    }
    __sync_fetch_and_add(&stats->rx_bytes, skb->len);
    __sync_fetch_and_add(&stats->rx_packets, packets(skb));
    return 1;
}

char LICENSE[] SEC("license") = "GPL";
