//! Butte's eBPF programs and typed handles over them. Programs are attached
//! once, at the agent's cgroup subtree, and act on every task below it; a
//! launch only writes the task's map entries, keyed by its v2 cgroup id (the
//! inode number of its v2 directory).

pub mod accounting;
pub mod devices;
pub mod network;
pub mod ports;

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
pub(crate) fn run_time(bpf: &aya::Ebpf) -> std::time::Duration {
    bpf.programs()
        .filter_map(|(_, program)| program.info().ok())
        .map(|info| info.run_time())
        .sum()
}

/// Turns on the kernel's per-program run-time counters while the returned
/// fd is open (what `kernel.bpf_stats_enabled=1` does, scoped to us).
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, FenceError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| failed("stats", "enable run-time counters", &e))
}
