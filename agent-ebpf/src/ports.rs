//! Port fences: cgroup/bind4 and cgroup/bind6 let a task bind only inside
//! the port ranges it was given (and port 0); anything else is EPERM at bind
//! time. Mesos's network/ports isolator finds such a bind afterwards by
//! polling and kills the task; this prevents it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use std::os::fd::AsFd;

use aya::programs::CgroupSockAddr;
use aya::{Ebpf, Pod};

use crate::pins::{Links, Pins, attach_cgroup};
use crate::{FenceError, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ports.bpf.o"));

const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_CGROUP_INET6_BIND: u32 = 9;

/// Ranges one task may have (the C side's MAX_RANGES).
pub const MAX_RANGES: usize = 16;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PortRanges {
    count: u32,
    ranges: [[u16; 2]; MAX_RANGES],
}

// SAFETY: plain old data with the C layout of `struct port_ranges` (u32 then
// u16 pairs: no padding, every bit pattern valid).
#[allow(unsafe_code)]
unsafe impl Pod for PortRanges {}

/// The v2 cgroup id of a cgroup directory: its inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, FenceError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| FenceError::Cgroup {
            path: dir.display().to_string(),
            detail: e.to_string(),
        })
}

/// The loaded and attached port programs, with their maps.
pub struct PortFence {
    _bpf: Ebpf,
    /// Its links (see `pins::Links`).
    links: Links,
    ports: HashMap<MapData, u64, PortRanges>,
    denied: HashMap<MapData, u64, u64>,
}

impl PortFence {
    /// Loads the programs and attaches them to `subtree` (a v2 cgroup
    /// directory); with `pins`, over the pinned maps and links (see `pins`).
    pub fn attach(subtree: &Path, pins: Option<&Pins>) -> Result<Self, FenceError> {
        let (mut bpf, maps_dir) =
            crate::load("ports", OBJECT, pins, &["task_ports", "denied_binds"])?;
        let cgroup = crate::open_cgroup(subtree)?;
        let mut links = Links::new(pins, maps_dir, "ports");
        for (name, attach_type) in [
            ("bind4", BPF_CGROUP_INET4_BIND),
            ("bind6", BPF_CGROUP_INET6_BIND),
        ] {
            let program: &mut CgroupSockAddr = crate::program_mut(&mut bpf, name)?;
            program
                .load()
                .map_err(|e| failed("bind", "load into the kernel", &e))?;
            let fd = crate::program_fd(program.fd(), name)?;
            links.add(attach_cgroup(
                pins,
                "ports",
                name,
                fd.as_fd(),
                cgroup.as_fd(),
                attach_type,
            )?);
        }
        let ports = crate::take_cgroup_map(&mut bpf, "task_ports")?;
        let denied = crate::take_cgroup_map(&mut bpf, "denied_binds")?;
        Ok(Self {
            _bpf: bpf,
            links,
            ports,
            denied,
        })
    }

    /// Takes over the links an earlier agent pinned (see `pins::Links::commit`).
    pub fn commit(&mut self) -> Result<(), FenceError> {
        self.links.commit()
    }

    /// Fences the task in `cgroup_id` to `ranges` (inclusive; none = only port 0).
    pub fn allow(&mut self, cgroup_id: u64, ranges: &[(u16, u16)]) -> Result<(), FenceError> {
        if ranges.len() > MAX_RANGES {
            return Err(FenceError::TooMany {
                what: "port ranges",
                count: ranges.len(),
                limit: MAX_RANGES,
            });
        }
        let mut value = PortRanges {
            count: ranges.len() as u32,
            ..Default::default()
        };
        for (slot, &(begin, end)) in value.ranges.iter_mut().zip(ranges) {
            *slot = [begin, end];
        }
        self.ports
            .insert(cgroup_id, value, 0)
            .map_err(|e| crate::insert_failed("task_ports", &e))
    }

    /// The denied-binds map (the books read it in their pass).
    pub fn denied_map(&self) -> &aya::maps::MapData {
        aya::maps::IterableMap::map(&self.denied)
    }

    /// Binds the task was refused.
    /// Every task's refusals (tasks with none have no entry), in a few syscalls.
    pub fn all_denied(&self) -> Result<std::collections::HashMap<u64, u64>, FenceError> {
        crate::lookup_all(aya::maps::IterableMap::map(&self.denied), "denied_binds")
    }

    /// Removes the task's entries (it ended).
    pub fn forget(&mut self, cgroup_id: u64) {
        let _ = self.ports.remove(&cgroup_id);
        let _ = self.denied.remove(&cgroup_id);
    }
}
