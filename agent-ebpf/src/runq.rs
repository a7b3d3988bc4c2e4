//! Run-queue latency histograms kept in each asking task's cgroup (cgroup
//! local storage, runq.bpf.c), where CPU time comes from the kernel's books
//! and sched_switch has no other job: its program is attached only while
//! some task keeps a histogram, and finds a thread's histogram through the
//! thread's own cgroup rather than a hash lookup. Kernels before 6.2 have no
//! cgroup storage; there the accounting program keeps the histograms.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use aya::maps::{CgrpStorage, Map, MapData};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, Pod};

use crate::accounting::RUNQ_SLOTS;
use crate::{FenceError, MAX_TASKS, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/runq.bpf.o"));

const PROGRAM: &str = "runq_latency";

/// A task's run-queue waits: `struct histogram` of the C side (runq.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Waits counted.
    pub count: u64,
    /// Their sum, nanoseconds.
    pub total_ns: u64,
    /// Slot i: waits of [2^i, 2^(i+1)) microseconds.
    pub slots: [u64; RUNQ_SLOTS],
}

// SAFETY: plain old data, the C side's layout, any bit pattern valid.
#[allow(unsafe_code)]
unsafe impl Pod for Histogram {}

/// The loaded program, its link while attached, and the cgroups that keep
/// a histogram (an open fd each: the storage map's key).
pub struct RunqHistograms {
    bpf: Ebpf,
    /// The cgroup storage map (kept as a `Map`: a typed view is made per use).
    map: Map,
    link: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
    cgroups: HashMap<u64, File>,
}

impl RunqHistograms {
    /// Loads the program (not attached until a task asks); fails where the
    /// kernel has no cgroup storage (before 6.2).
    pub fn load() -> Result<Self, FenceError> {
        let mut bpf = aya::EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| failed("runq", "load", &e))?;
        let btf = Btf::from_sys_fs().map_err(|e| failed(PROGRAM, "read kernel BTF", &e))?;
        let program: &mut BtfTracePoint = crate::program_mut(&mut bpf, PROGRAM)?;
        program
            .load("sched_switch", &btf)
            .map_err(|e| failed(PROGRAM, "load into the kernel", &e))?;
        let opening = |detail: String| FenceError::Map {
            map: "runq",
            step: "open",
            detail,
        };
        let map = bpf
            .take_map("runq")
            .ok_or_else(|| opening("missing from the object".into()))?;
        if !matches!(map, Map::CgrpStorage(_)) {
            return Err(opening("not a cgroup storage map".into()));
        }
        Ok(Self {
            bpf,
            map,
            link: None,
            cgroups: HashMap::new(),
        })
    }

    /// Starts (or starts over) the histogram of the task whose v2 cgroup is
    /// `cgroup` (its id `key`), and attaches the program if it was not.
    pub fn track(&mut self, key: u64, cgroup: &Path) -> Result<(), FenceError> {
        if !self.cgroups.contains_key(&key) && self.cgroups.len() >= MAX_TASKS {
            return Err(crate::map_full("runq"));
        }
        let dir = crate::open_cgroup(cgroup)?;
        CgrpStorage::<_, Histogram>::try_from(&mut self.map)
            .and_then(|mut storage| storage.insert(&dir, Histogram::default(), 0))
            .map_err(|e| crate::insert_failed("runq", &e))?;
        self.cgroups.insert(key, dir);
        self.attach_as_needed()
    }

    /// Ends the task's histogram (its storage also goes with its cgroup),
    /// and detaches the program after the last one.
    pub fn forget(&mut self, key: u64) {
        if let Some(dir) = self.cgroups.remove(&key)
            && let Ok(mut storage) = CgrpStorage::<_, Histogram>::try_from(&mut self.map)
        {
            let _ = storage.remove(&dir);
        }
        if let Err(error) = self.attach_as_needed() {
            tracing::warn!(%error, "cannot detach sched_switch; it runs on");
        }
    }

    /// Whether the program runs on every context switch now.
    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// Every kept histogram, by cgroup id: one lookup per task that keeps
    /// one (the books' walk reads them all at once, where it shares the map).
    pub fn all(&self) -> HashMap<u64, Histogram> {
        let Ok(storage) = CgrpStorage::<_, Histogram>::try_from(&self.map) else {
            return HashMap::new();
        };
        self.cgroups
            .iter()
            .filter_map(|(key, dir)| Some((*key, storage.get(dir, 0).ok()?)))
            .collect()
    }

    /// The storage map, for the books' walk to read.
    pub fn map(&self) -> Option<&MapData> {
        match &self.map {
            Map::CgrpStorage(data) => Some(data),
            _ => None,
        }
    }

    /// Kernel time spent in the program so far (with `kernel.bpf_stats_enabled`).
    pub fn run_time(&self) -> std::time::Duration {
        crate::run_time(&self.bpf, &[])
    }

    /// Times the program ran (same condition).
    pub fn run_count(&self) -> u64 {
        crate::run_count(&self.bpf, &[])
    }

    fn attach_as_needed(&mut self) -> Result<(), FenceError> {
        let needed = !self.cgroups.is_empty();
        let program: &mut BtfTracePoint = crate::program_mut(&mut self.bpf, PROGRAM)?;
        match (needed, self.link.take()) {
            (true, None) => {
                self.link = Some(
                    program
                        .attach()
                        .map_err(|e| failed(PROGRAM, "attach", &e))?,
                );
            }
            (false, Some(link)) => {
                program
                    .detach(link)
                    .map_err(|e| failed(PROGRAM, "detach", &e))?;
            }
            (_, kept) => self.link = kept,
        }
        Ok(())
    }
}
