//! Network accounting and bandwidth limits: cgroup_skb egress and ingress
//! programs count bytes and packets per task and hold its egress to its
//! `network_bandwidth` with a token bucket (ingress too, when it asks).

use std::path::Path;

use aya::maps::{HashMap, MapData};
use std::os::fd::AsFd;

use aya::programs::CgroupSkb;
use aya::{Ebpf, Pod};

use crate::pins::{Links, Pins, attach_cgroup};
use crate::{FenceError, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/network.bpf.o"));

/// What the kernel counted for one task's sockets; bytes are IP packets
/// (headers included), packets count each segment of a GSO batch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Packets dropped by the egress limit.
    pub tx_dropped: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Packets dropped by the ingress limit.
    pub rx_dropped: u64,
}

// SAFETY: plain old data with the C layout of `struct net_stats` (all u64).
#[allow(unsafe_code)]
unsafe impl Pod for NetStats {}

/// `struct bucket` of the C side; its first word is the program's spin lock.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    lock: u32,
    unused: u32,
    rate: u64,
    depth: u64,
    tokens: u64,
    last_ns: u64,
}

// SAFETY: plain old data with the C layout of `struct bucket` (two u32, then
// u64s: no padding).
#[allow(unsafe_code)]
unsafe impl Pod for Bucket {}

/// Two 64 KiB GSO batches: the least a bucket holds, and what it starts with.
const MIN_BUCKET: u64 = 128 * 1024;

/// The bucket of a `mbit_per_s` limit: a quarter second of traffic, and never
/// less than two GSO batches. TCP collapsed to ~12 Mbit/s whatever the limit
/// with a 128 KB bucket (KERNEL.md). It starts nearly empty, so a new task
/// does not open with a quarter second of unlimited burst.
fn bucket(mbit_per_s: f64) -> Bucket {
    let rate = (mbit_per_s * 1_000_000.0 / 8.0).max(1.0) as u64;
    let depth = (rate / 4).max(MIN_BUCKET);
    Bucket {
        rate,
        depth,
        tokens: MIN_BUCKET,
        ..Bucket::default()
    }
}

/// A task's limits: egress in Mbit/s, and whether ingress is policed to the same rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub egress_mbit_per_s: Option<f64>,
    pub police_ingress: bool,
}

/// The loaded and attached network programs, with their maps.
pub struct Network {
    bpf: Ebpf,
    stats: HashMap<MapData, u64, NetStats>,
    egress: HashMap<MapData, u64, Bucket>,
    ingress: HashMap<MapData, u64, Bucket>,
    /// Its links (see `pins::Links`).
    links: Links,
}

impl Network {
    /// Loads the programs and attaches them to `subtree` (a v2 cgroup
    /// directory); with `pins`, over the pinned maps and links (see `pins`).
    pub fn attach(subtree: &Path, pins: Option<&Pins>) -> Result<Self, FenceError> {
        let maps = ["task_net", "egress_limits", "ingress_limits"];
        let (mut bpf, maps_dir) = crate::load("network", OBJECT, pins, &maps)?;
        let cgroup = crate::open_cgroup(subtree)?;
        let mut links = Links::new(pins, maps_dir, "network");
        // BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS.
        for (name, attach_type) in [("egress", 1), ("ingress", 0)] {
            let program: &mut CgroupSkb = crate::program_mut(&mut bpf, name)?;
            program
                .load()
                .map_err(|e| failed(name, "load into the kernel", &e))?;
            let fd = crate::program_fd(program.fd(), name)?;
            links.add(attach_cgroup(
                pins,
                "network",
                name,
                fd.as_fd(),
                cgroup.as_fd(),
                attach_type,
            )?);
        }
        Ok(Self {
            links,
            stats: crate::take_cgroup_map(&mut bpf, "task_net")?,
            egress: crate::take_cgroup_map(&mut bpf, "egress_limits")?,
            ingress: crate::take_cgroup_map(&mut bpf, "ingress_limits")?,
            bpf,
        })
    }

    /// Takes over the links an earlier agent pinned (see `pins::Links::commit`).
    pub fn commit(&mut self) -> Result<(), FenceError> {
        self.links.commit()
    }

    /// Starts counting the task in `cgroup_id` and applies its limits;
    /// `keep_counts`: counts it already has stay (a recovered task).
    pub fn track(
        &mut self,
        cgroup_id: u64,
        limits: Limits,
        keep_counts: bool,
    ) -> Result<(), FenceError> {
        if let Some(rate) = limits.egress_mbit_per_s {
            self.egress
                .insert(cgroup_id, bucket(rate), 0)
                .map_err(|e| crate::insert_failed("egress_limits", &e))?;
            if limits.police_ingress {
                self.ingress
                    .insert(cgroup_id, bucket(rate), 0)
                    .map_err(|e| crate::insert_failed("ingress_limits", &e))?;
            }
        }
        if keep_counts && self.stats.get(&cgroup_id, 0).is_ok() {
            return Ok(());
        }
        self.stats
            .insert(cgroup_id, NetStats::default(), 0)
            .map_err(|e| crate::insert_failed("task_net", &e))
    }

    /// What was counted for the task, if it is tracked.
    pub fn stats(&self, cgroup_id: u64) -> Option<NetStats> {
        self.stats.get(&cgroup_id, 0).ok()
    }

    /// The per-task counters map (the books read it in their pass).
    pub fn stats_map(&self) -> &aya::maps::MapData {
        aya::maps::IterableMap::map(&self.stats)
    }

    /// Every tracked task's counts, by cgroup id, in a few syscalls.
    pub fn all_stats(&self) -> Result<std::collections::HashMap<u64, NetStats>, FenceError> {
        crate::lookup_all(aya::maps::IterableMap::map(&self.stats), "task_net")
    }

    /// Removes the task's entries (it ended).
    pub fn forget(&mut self, cgroup_id: u64) {
        let _ = self.stats.remove(&cgroup_id);
        let _ = self.egress.remove(&cgroup_id);
        let _ = self.ingress.remove(&cgroup_id);
    }

    /// Kernel time spent in these programs so far (needs `kernel.bpf_stats_enabled`).
    pub fn run_time(&self) -> std::time::Duration {
        crate::run_time(&self.bpf, &[])
    }

    /// Times these programs ran (same condition).
    pub fn run_count(&self) -> u64 {
        crate::run_count(&self.bpf, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_a_quarter_second_and_start_with_two_gso_batches() {
        let b = bucket(100.0);
        assert_eq!(b.rate, 12_500_000);
        assert_eq!(b.depth, 3_125_000);
        assert_eq!(b.tokens, MIN_BUCKET);
        assert_eq!(bucket(1.0).depth, MIN_BUCKET);
    }
}
