//! Butte's eBPF programs and typed handles over them. Programs are attached
//! once, at the agent's cgroup subtree, and act on every task below it; a
//! launch only writes the task's map entries, keyed by its v2 cgroup id (the
//! inode number of its v2 directory).

pub mod accounting;
pub mod books;
pub mod devices;
pub mod network;
pub mod pins;
pub mod ports;
pub mod runq;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// a program could not be loaded or attached
    #[error("eBPF program {program} failed to {step}: {detail}")]
    Program {
        program: &'static str,
        step: &'static str,
        detail: String,
    },
    /// a map operation failed
    #[error("eBPF map {map} failed to {step}: {detail}")]
    Map {
        map: &'static str,
        step: &'static str,
        detail: String,
    },
    /// more entries than the program checks
    #[error("{count} {what} given; a task may have at most {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    /// the cgroup directory is unusable
    #[error("cannot open cgroup {path}: {detail}")]
    Cgroup { path: String, detail: String },
    #[error("eBPF pin {path}: {detail}")]
    Pin { path: String, detail: String },
}

/// An error with its causes, `outer: inner: os error`, so a failed load or
/// attach says why (aya's own message stops at the call that failed).
pub(crate) struct Chain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

// The most tasks one agent tracks at once: every per-task map holds this
// many entries (set in build.rs, which also gives it to clang).
include!(concat!(env!("OUT_DIR"), "/max_tasks.rs"));

/// A failed per-task map insert; a full map says what the limit is.
pub(crate) fn insert_failed(map: &'static str, error: &aya::maps::MapError) -> FenceError {
    let full = matches!(error, aya::maps::MapError::SyscallError(e)
        if e.io_error.raw_os_error() == Some(libc::E2BIG));
    if full {
        return map_full(map);
    }
    FenceError::Map {
        map,
        step: "insert",
        detail: Chain(error).to_string(),
    }
}

/// A per-task map that holds MAX_TASKS entries already.
pub(crate) fn map_full(map: &'static str) -> FenceError {
    FenceError::Map {
        map,
        step: "insert",
        detail: format!(
            "it is full: this agent tracks at most {MAX_TASKS} tasks at once \
             (MAX_TASKS in agent-ebpf/build.rs); wait for tasks to end"
        ),
    }
}

/// Takes a `u64`-keyed hash map (keyed by cgroup id) out of a loaded object.
pub(crate) fn take_cgroup_map<V: aya::Pod>(
    bpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<aya::maps::HashMap<aya::maps::MapData, u64, V>, FenceError> {
    let open = |detail: String| FenceError::Map {
        map: name,
        step: "open",
        detail,
    };
    let map = bpf
        .take_map(name)
        .ok_or_else(|| open("missing from the object".into()))?;
    aya::maps::HashMap::try_from(map).map_err(|e| open(Chain(&e).to_string()))
}

/// Opens the cgroup directory programs attach to.
/// Loads an object. With pins, the maps named are pinned (or, pinned by an
/// earlier agent, reused) in the object's maps directory, returned too.
pub(crate) fn load(
    object: &'static str,
    bytes: &[u8],
    pins: Option<&pins::Pins>,
    maps: &[&'static str],
) -> Result<(aya::Ebpf, Option<std::path::PathBuf>), FenceError> {
    let mut loader = aya::EbpfLoader::new();
    let dir = match pins {
        Some(pins) => Some(pins.maps_dir(object, bytes)?),
        None => None,
    };
    if let Some(dir) = &dir {
        for &map in maps {
            loader.map_pin_path(map, dir.join(map));
        }
    }
    let bpf = loader.load(bytes).map_err(|e| failed(object, "load", &e))?;
    Ok((bpf, dir))
}

/// A loaded program's fd, owned (to switch a pinned link to it).
pub(crate) fn program_fd(
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<aya::programs::ProgramFd, FenceError> {
    fd.map_err(|e| failed(name, "get its fd", &e))?
        .try_clone()
        .map_err(|e| failed(name, "get its fd", &e))
}

pub(crate) fn open_cgroup(path: &std::path::Path) -> Result<std::fs::File, FenceError> {
    std::fs::File::open(path).map_err(|e| FenceError::Cgroup {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A program's failed step, with the causes.
pub(crate) fn failed(
    program: &'static str,
    step: &'static str,
    error: &dyn std::error::Error,
) -> FenceError {
    FenceError::Program {
        program,
        step,
        detail: Chain(error).to_string(),
    }
}

/// A program of the object, as its type.
pub(crate) fn program_mut<'a, P>(
    bpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut P, FenceError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = bpf.program_mut(name).ok_or_else(|| FenceError::Program {
        program: name,
        step: "find",
        detail: "it is not in the object".into(),
    })?;
    program
        .try_into()
        .map_err(|e: aya::programs::ProgramError| failed(name, "type-check", &e))
}

/// Kernel time the object's programs ran (`kernel.bpf_stats_enabled` on).
pub(crate) fn run_time(bpf: &aya::Ebpf, skip: &[&str]) -> std::time::Duration {
    bpf.programs()
        .filter(|(name, _)| !skip.contains(name))
        .filter_map(|(_, program)| program.info().ok())
        .map(|info| info.run_time())
        .sum()
}

/// Times the object's programs ran (`kernel.bpf_stats_enabled` on).
pub(crate) fn run_count(bpf: &aya::Ebpf, skip: &[&str]) -> u64 {
    bpf.programs()
        .filter(|(name, _)| !skip.contains(name))
        .filter_map(|(_, program)| program.info().ok())
        .map(|info| info.run_count())
        .sum()
}

/// Turns on the kernel's per-program run-time counters while the returned
/// fd is open (what `kernel.bpf_stats_enabled=1` does, scoped to us).
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, FenceError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| failed("stats", "enable run-time counters", &e))
}

/// The kernel's `bpf_attr.batch` (linux/bpf.h), for BPF_MAP_LOOKUP_BATCH.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall.
const BATCH: usize = 1024;

/// Every entry of a `u64`-keyed hash map in a few syscalls
/// (BPF_MAP_LOOKUP_BATCH), instead of one lookup syscall per key: what
/// makes sampling hundreds of tasks cheap. aya 0.14 has no batch call.
pub(crate) fn lookup_all<V: aya::Pod + Default>(
    map: &aya::maps::MapData,
    name: &'static str,
) -> Result<std::collections::HashMap<u64, V>, FenceError> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    let mut entries = std::collections::HashMap::new();
    let mut keys = vec![0u64; BATCH];
    let mut values = vec![V::default(); BATCH];
    // The hash map's batch token is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attr points at buffers of BATCH keys and BATCH values
        // of the map's key and value types (u64 and V, whose layout the C
        // side shares), and at two u32 batch tokens; all outlive the call.
        #[allow(unsafe_code)]
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (result < 0).then(std::io::Error::last_os_error);
        let filled = (attr.count as usize).min(BATCH);
        for (key, value) in keys.iter().zip(&values).take(filled) {
            entries.insert(*key, *value);
        }
        match error {
            None => {}
            // ENOENT: the walk reached the end (the last entries came with it).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Some(e) => {
                return Err(FenceError::Map {
                    map: name,
                    step: "read in a batch",
                    detail: e.to_string(),
                });
            }
        }
        token_in = token_out;
        first = false;
    }
}
