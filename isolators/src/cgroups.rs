//! Cgroups for tasks, behind one `Isolator` trait so the launch path never
//! branches on the cgroup version.
//!
//! - `Hybrid`: a v1 host (this machine): limits through the v1 cpu, memory
//!   and pids controllers, plus a node in the v2 mount that holds no limits
//!   but keys the eBPF programs (its inode is the cgroup id).
//! - `Unified`: a pure v2 host: the same limits through `cpu.max`,
//!   `cpu.weight`, `memory.max`, `pids.max`.
//!
//! Every task cgroup lives under our own `butte/` subtree of each hierarchy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The subtree we own in every hierarchy; each agent works in its own child of it.
pub const SUBTREE: &str = "butte";
/// CFS period for the cpu quota, in microseconds (the kernel's default).
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// a cgroup file or directory operation failed
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// processes stayed in a cgroup after SIGKILL
    #[error("cgroup {path} still holds processes after {waited:?}; they are not ours to reap")]
    Busy { path: PathBuf, waited: Duration },
    /// the host has neither layout we know
    #[error(
        "no usable cgroup hierarchy under {root}: expected cgroup v2 or v1 cpu/memory/pids controllers"
    )]
    NoHierarchy { root: PathBuf },
    /// a task id that cannot name a directory
    #[error("container id {0:?} cannot name a cgroup: use letters, digits, '-', '_' or '.'")]
    BadId(String),
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Where a container's memory figures are: the usage file (one number) and
/// the stat file (`key value` lines), with the keys of resident anonymous
/// memory and page cache in it (they differ between v1 and v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFiles {
    pub usage: PathBuf,
    pub stat: PathBuf,
    pub rss_key: &'static str,
    pub file_key: &'static str,
}

/// Processes and threads in a cgroup at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCounts {
    pub processes: u64,
    pub threads: u64,
}

/// What a cgroup's CPU quota did so far: CFS periods in which it had work,
/// those in which it ran out of quota, and how long it waited for more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    pub periods: u64,
    pub throttled: u64,
    pub throttled_ns: u64,
}

/// What a task may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// CPU shares and CFS quota, in cores (0 = no quota).
    pub cpus: f64,
    /// Memory limit in MiB (0 = no limit).
    pub mem_mb: f64,
    /// Most processes and threads at once.
    pub pids_max: u64,
}

/// Where a new task must be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The v2 directory: the spawn clones straight into it (CLONE_INTO_CGROUP).
    pub unified: PathBuf,
    /// v1 `cgroup.procs` files the task joins before it execs (empty on pure v2).
    pub v1_procs: Vec<PathBuf>,
}

/// The cgroup side of isolation.
pub trait Isolator: Send + Sync {
    /// Creates the cgroups of `id` with `limits`; on failure nothing is left behind.
    fn create(&self, id: &str, limits: &Limits) -> Result<Placement, CgroupError>;
    /// Whether the kernel's OOM killer killed a process of `id`.
    fn oom_killed(&self, id: &str) -> Result<bool, CgroupError>;
    /// Pids in `id` (host pid namespace).
    fn pids(&self, id: &str) -> Result<Vec<i32>, CgroupError>;
    /// The files a sampler reads for `id`'s memory (it keeps them open).
    fn memory_files(&self, id: &str) -> MemoryFiles;
    /// Processes and threads in `id` now: its `pids` and the lines of its
    /// v2 `cgroup.threads`, which holds every thread on both layouts.
    fn process_counts(&self, id: &str) -> Result<ProcessCounts, CgroupError> {
        let threads = read_pids(&self.v2_dir(id).join("cgroup.threads"))?;
        Ok(ProcessCounts {
            processes: self.pids(id)?.len() as u64,
            threads: threads.len() as u64,
        })
    }
    /// What the CPU quota of `id` throttled so far (its `cpu.stat`).
    fn cpu_throttling(&self, id: &str) -> Result<Throttling, CgroupError>;
    /// Kills what is left in `id` and removes its cgroups.
    fn destroy(&self, id: &str) -> Result<(), CgroupError>;
    /// The ids that have cgroups now (to find leftovers after a crash).
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    /// The v2 directory of the whole subtree (where eBPF programs attach).
    fn v2_subtree(&self) -> PathBuf;
    /// The v2 directory of `id` (its inode is the id eBPF sees).
    fn v2_dir(&self, id: &str) -> PathBuf;
    /// Removes the (empty) subtree itself; best effort, on the way out.
    fn remove_subtree(&self);
    /// Lets `id` use only the devices in `rules` (v1 `devices.allow` lines such
    /// as `c 1:3 rwm`) through the v1 devices controller, so that it enforces
    /// even without the eBPF device filter. A no-op on pure v2, where only
    /// eBPF can. Call before the task starts.
    fn restrict_devices(&self, id: &str, rules: &[String]) -> Result<(), CgroupError>;
}

fn check_id(id: &str) -> Result<(), CgroupError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadId(id.to_owned()))
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_error("write", path))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_error("read", path))
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io {
            action: "create",
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn read_pids(procs: &Path) -> Result<Vec<i32>, CgroupError> {
    match fs::read_to_string(procs) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CgroupError::Io {
            action: "read",
            path: procs.to_owned(),
            source: e,
        }),
    }
}

/// Reclaims what an emptied memory cgroup still holds (its page cache):
/// an rmdir'ed memcg that holds pages stays behind, dying, and every dying
/// one slows the memcg code for everyone. v1 has `memory.force_empty`, v2
/// `memory.reclaim` (5.19 on). Best effort: what cannot be reclaimed now
/// goes as the kernel reclaims it.
fn reclaim_memory(dir: &Path) {
    let force_empty = dir.join("memory.force_empty");
    if force_empty.exists() {
        let _ = fs::write(&force_empty, "0");
        return;
    }
    let reclaim = dir.join("memory.reclaim");
    let current = fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|c| c.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if current > 0 && reclaim.exists() {
        let _ = fs::write(&reclaim, current.to_string());
    }
}

/// SIGKILLs everything in `dir` until `cgroup.procs` is empty, then removes it.
/// A v2 cgroup on 5.14+ is killed whole by `cgroup.kill` (no fork can slip
/// past it); the kill loop below is then only the wait, and the fallback.
fn kill_and_remove(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    // Only v2 directories have it (a v1 controller's would be refused with
    // EACCES on every destroy).
    let kill = dir.join("cgroup.kill");
    if kill.exists()
        && let Err(e) = fs::write(&kill, "1")
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cgroup.kill failed; killing process by process");
    }
    let procs = dir.join("cgroup.procs");
    let started = Instant::now();
    let limit = Duration::from_secs(5);
    loop {
        let pids = read_pids(&procs)?;
        if pids.is_empty() {
            break;
        }
        if started.elapsed() > limit {
            return Err(CgroupError::Busy {
                path: dir.to_owned(),
                waited: limit,
            });
        }
        for pid in pids {
            // SAFETY: kill(2) has no memory effects; a pid that already exited gives ESRCH.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    reclaim_memory(dir);
    // rmdir can see EBUSY for a moment while the last exit is being accounted.
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if started.elapsed() < limit && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(CgroupError::Io {
                    action: "remove",
                    path: dir.to_owned(),
                    source: e,
                });
            }
        }
    }
}

/// Whether this kernel's v2 cgroups have `cgroup.kill` (5.14+); said once.
pub fn has_cgroup_kill() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let root = Path::new("/sys/fs/cgroup");
        let unified = if root.join("cgroup.controllers").exists() {
            root.to_owned()
        } else {
            root.join("unified")
        };
        // The root has no cgroup.kill; any child does (our own subtree's parent, say).
        let has = fs::read_dir(&unified)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .is_some_and(|child| child.path().join("cgroup.kill").exists());
        if !has {
            tracing::info!(
                "this kernel has no cgroup.kill (before 5.14): tasks are killed process by process"
            );
        }
        has
    })
}

fn list_children(dir: &Path) -> Result<Vec<String>, CgroupError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CgroupError::Io {
            action: "list",
            path: dir.to_owned(),
            source: e,
        }),
    }
}

/// Picks the layout of the host under `root` (normally `/sys/fs/cgroup`).
/// `subtree` is relative to each hierarchy's root, e.g. `butte/agent-5051`.
pub fn detect(root: &Path, subtree: &Path) -> Result<Box<dyn Isolator>, CgroupError> {
    if subtree.is_absolute()
        || subtree
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CgroupError::BadId(subtree.display().to_string()));
    }
    if root.join("cgroup.controllers").exists() {
        return Ok(Box::new(Unified::new(root.to_owned(), subtree.to_owned())?));
    }
    let unified = root.join("unified");
    let has_v1 = ["cpu", "memory", "pids"]
        .iter()
        .all(|c| root.join(c).join("cgroup.procs").exists());
    if has_v1 && unified.join("cgroup.procs").exists() {
        return Ok(Box::new(Hybrid::new(root.to_owned(), subtree.to_owned())?));
    }
    Err(CgroupError::NoHierarchy {
        root: root.to_owned(),
    })
}

/// v1 controllers for limits, plus a v2 node per task.
pub struct Hybrid {
    root: PathBuf,
    subtree: PathBuf,
}

/// The v1 controllers a task joins, in join order.
const V1_CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "memory", "pids", "freezer", "devices"];

impl Hybrid {
    pub fn new(root: PathBuf, subtree: PathBuf) -> Result<Self, CgroupError> {
        let hybrid = Self { root, subtree };
        for dir in hybrid.subtrees() {
            fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        }
        Ok(hybrid)
    }

    fn controllers(&self) -> impl Iterator<Item = &'static str> + '_ {
        V1_CONTROLLERS
            .into_iter()
            .filter(|c| self.root.join(c).join("cgroup.procs").exists())
    }

    fn subtrees(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .controllers()
            .map(|c| self.root.join(c).join(&self.subtree))
            .collect();
        dirs.push(self.root.join("unified").join(&self.subtree));
        dirs
    }

    fn dir(&self, controller: &str, id: &str) -> PathBuf {
        self.root.join(controller).join(&self.subtree).join(id)
    }

    fn unified(&self, id: &str) -> PathBuf {
        self.root.join("unified").join(&self.subtree).join(id)
    }

    fn apply(&self, id: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        let mut v1_procs = Vec::new();
        for controller in self.controllers() {
            let dir = self.dir(controller, id);
            make_dir(&dir)?;
            match controller {
                "cpu" => {
                    let shares = ((limits.cpus * 1024.0).round() as u64).max(2);
                    write(&dir.join("cpu.shares"), &shares.to_string())?;
                    if limits.cpus > 0.0 {
                        let quota = ((limits.cpus * CFS_PERIOD_US as f64).round() as u64).max(1000);
                        write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                "memory" if limits.mem_mb > 0.0 => {
                    let bytes = (limits.mem_mb * 1024.0 * 1024.0).round() as u64;
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                }
                "pids" if limits.pids_max > 0 => {
                    write(&dir.join("pids.max"), &limits.pids_max.to_string())?
                }
                _ => {}
            }
            v1_procs.push(dir.join("cgroup.procs"));
        }
        let unified = self.unified(id);
        make_dir(&unified)?;
        Ok(Placement { unified, v1_procs })
    }
}

impl Isolator for Hybrid {
    fn create(&self, id: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        check_id(id)?;
        self.apply(id, limits).inspect_err(|_| {
            let _ = self.destroy(id);
        })
    }

    fn oom_killed(&self, id: &str) -> Result<bool, CgroupError> {
        let text = read(&self.dir("memory", id).join("memory.oom_control"))?;
        Ok(counter(&text, "oom_kill") > 0)
    }

    fn pids(&self, id: &str) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.unified(id).join("cgroup.procs"))
    }

    fn memory_files(&self, id: &str) -> MemoryFiles {
        let dir = self.dir("memory", id);
        MemoryFiles {
            usage: dir.join("memory.usage_in_bytes"),
            stat: dir.join("memory.stat"),
            rss_key: "total_rss",
            file_key: "total_cache",
        }
    }

    fn cpu_throttling(&self, id: &str) -> Result<Throttling, CgroupError> {
        let stat = read(&self.dir("cpu", id).join("cpu.stat"))?;
        Ok(Throttling {
            periods: counter(&stat, "nr_periods"),
            throttled: counter(&stat, "nr_throttled"),
            throttled_ns: counter(&stat, "throttled_time"),
        })
    }

    fn destroy(&self, id: &str) -> Result<(), CgroupError> {
        check_id(id)?;
        // The v2 node sees every process of the task; empty it first.
        kill_and_remove(&self.unified(id))?;
        let mut first_error = None;
        for controller in self.controllers() {
            if let Err(e) = kill_and_remove(&self.dir(controller, id)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut ids = std::collections::BTreeSet::new();
        for dir in self.subtrees() {
            ids.extend(list_children(&dir)?);
        }
        Ok(ids.into_iter().collect())
    }

    fn v2_subtree(&self) -> PathBuf {
        self.root.join("unified").join(&self.subtree)
    }

    fn v2_dir(&self, id: &str) -> PathBuf {
        self.unified(id)
    }

    fn restrict_devices(&self, id: &str, rules: &[String]) -> Result<(), CgroupError> {
        check_id(id)?;
        let dir = self.dir("devices", id);
        if !dir.exists() {
            return Ok(());
        }
        write(&dir.join("devices.deny"), "a")?;
        for rule in rules {
            write(&dir.join("devices.allow"), rule)?;
        }
        Ok(())
    }

    fn remove_subtree(&self) {
        for dir in self.subtrees() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A pure cgroup v2 host.
pub struct Unified {
    root: PathBuf,
    subtree: PathBuf,
}

impl Unified {
    pub fn new(root: PathBuf, subtree: PathBuf) -> Result<Self, CgroupError> {
        let dir = root.join(&subtree);
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        // Hand cpu, memory and pids down every level to the task cgroups.
        let wanted = ["cpu", "memory", "pids"];
        let available = read(&root.join("cgroup.controllers")).unwrap_or_default();
        let mut levels = vec![root.clone()];
        let mut level = root.clone();
        for part in subtree.components() {
            level = level.join(part);
            levels.push(level.clone());
        }
        for controller in wanted
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
        {
            for (i, level) in levels.iter().enumerate() {
                let written = write(
                    &level.join("cgroup.subtree_control"),
                    &format!("+{controller}"),
                );
                // The host's root may refuse (it is not ours); our own levels may not.
                if i > 0 {
                    written?;
                }
            }
        }
        Ok(Self { root, subtree })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(&self.subtree).join(id)
    }
}

/// The v2 file contents for `limits`: (file, value) pairs.
pub fn unified_limit_files(limits: &Limits) -> Vec<(&'static str, String)> {
    let mut files = Vec::new();
    // cpu.weight is 1..10000 with 100 for one share of 1024 (the kernel's mapping).
    let shares = (limits.cpus * 1024.0).max(2.0);
    let weight = (1.0 + ((shares - 2.0) * 9999.0) / 262_142.0)
        .round()
        .clamp(1.0, 10_000.0) as u64;
    files.push(("cpu.weight", weight.to_string()));
    if limits.cpus > 0.0 {
        let quota = ((limits.cpus * CFS_PERIOD_US as f64).round() as u64).max(1000);
        files.push(("cpu.max", format!("{quota} {CFS_PERIOD_US}")));
    }
    if limits.mem_mb > 0.0 {
        files.push((
            "memory.max",
            ((limits.mem_mb * 1024.0 * 1024.0).round() as u64).to_string(),
        ));
        files.push(("memory.swap.max", "0".to_owned()));
    }
    if limits.pids_max > 0 {
        files.push(("pids.max", limits.pids_max.to_string()));
    }
    files
}

impl Isolator for Unified {
    fn create(&self, id: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        check_id(id)?;
        let dir = self.dir(id);
        make_dir(&dir)?;
        for (file, value) in unified_limit_files(limits) {
            let path = dir.join(file);
            // memory.swap.max is absent without swap accounting: not a limit we need.
            if file == "memory.swap.max" && !path.exists() {
                continue;
            }
            if let Err(e) = write(&path, &value) {
                let _ = self.destroy(id);
                return Err(e);
            }
        }
        Ok(Placement {
            unified: dir,
            v1_procs: Vec::new(),
        })
    }

    fn oom_killed(&self, id: &str) -> Result<bool, CgroupError> {
        Ok(counter(&read(&self.dir(id).join("memory.events"))?, "oom_kill") > 0)
    }

    fn pids(&self, id: &str) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.dir(id).join("cgroup.procs"))
    }

    fn memory_files(&self, id: &str) -> MemoryFiles {
        let dir = self.dir(id);
        MemoryFiles {
            usage: dir.join("memory.current"),
            stat: dir.join("memory.stat"),
            rss_key: "anon",
            file_key: "file",
        }
    }

    fn cpu_throttling(&self, id: &str) -> Result<Throttling, CgroupError> {
        let stat = read(&self.dir(id).join("cpu.stat"))?;
        Ok(Throttling {
            periods: counter(&stat, "nr_periods"),
            throttled: counter(&stat, "nr_throttled"),
            throttled_ns: counter(&stat, "throttled_usec").saturating_mul(1000),
        })
    }

    fn destroy(&self, id: &str) -> Result<(), CgroupError> {
        check_id(id)?;
        kill_and_remove(&self.dir(id))
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        list_children(&self.root.join(&self.subtree))
    }

    fn v2_subtree(&self) -> PathBuf {
        self.root.join(&self.subtree)
    }

    fn v2_dir(&self, id: &str) -> PathBuf {
        self.dir(id)
    }

    fn restrict_devices(&self, _id: &str, _rules: &[String]) -> Result<(), CgroupError> {
        Ok(())
    }

    fn remove_subtree(&self) {
        let _ = fs::remove_dir(self.root.join(&self.subtree));
    }
}

/// The value of `name` in `key value` lines (memory.stat, memory.events), 0 when absent.
pub fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_files_follow_the_kernel_formats() {
        let files = unified_limit_files(&Limits {
            cpus: 0.5,
            mem_mb: 64.0,
            pids_max: 100,
        });
        let get = |name: &str| {
            files
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("cpu.max"), "50000 100000");
        assert_eq!(get("memory.max"), (64 * 1024 * 1024).to_string());
        assert_eq!(get("pids.max"), "100");
        // One core (1024 shares) maps to weight 39, 0.5 core to 20 (the kernel's shares->weight formula).
        assert_eq!(get("cpu.weight"), "20");
        let unlimited = unified_limit_files(&Limits {
            cpus: 0.0,
            mem_mb: 0.0,
            pids_max: 0,
        });
        assert_eq!(
            unlimited.len(),
            1,
            "only a weight without limits: {unlimited:?}"
        );
    }

    #[test]
    fn unified_isolator_writes_its_files_into_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("butte-cgv2-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir_all(root.join(SUBTREE)).unwrap();
        fs::write(root.join(SUBTREE).join("cgroup.subtree_control"), "").unwrap();
        let isolator = detect(&root, Path::new(SUBTREE)).unwrap();
        let placement = isolator
            .create(
                "task-1",
                &Limits {
                    cpus: 2.0,
                    mem_mb: 128.0,
                    pids_max: 64,
                },
            )
            .unwrap();
        assert_eq!(placement.unified, root.join(SUBTREE).join("task-1"));
        assert!(placement.v1_procs.is_empty());
        assert_eq!(
            fs::read_to_string(placement.unified.join("cpu.max")).unwrap(),
            "200000 100000"
        );
        assert_eq!(
            fs::read_to_string(placement.unified.join("memory.max")).unwrap(),
            "134217728"
        );
        assert_eq!(isolator.list().unwrap(), vec!["task-1".to_owned()]);
        fs::write(
            placement.unified.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(isolator.oom_killed("task-1").unwrap());
        // v2 books throttled time in microseconds; we report nanoseconds.
        fs::write(
            placement.unified.join("cpu.stat"),
            "usage_usec 900\nnr_periods 12\nnr_throttled 5\nthrottled_usec 250\n",
        )
        .unwrap();
        assert_eq!(
            isolator.cpu_throttling("task-1").unwrap(),
            Throttling {
                periods: 12,
                throttled: 5,
                throttled_ns: 250_000
            }
        );
        fs::write(placement.unified.join("cgroup.procs"), "10\n11\n").unwrap();
        fs::write(placement.unified.join("cgroup.threads"), "10\n11\n12\n").unwrap();
        assert_eq!(
            isolator.process_counts("task-1").unwrap(),
            ProcessCounts {
                processes: 2,
                threads: 3
            }
        );
        assert!(matches!(
            isolator.create(
                "../escape",
                &Limits {
                    cpus: 1.0,
                    mem_mb: 0.0,
                    pids_max: 0
                }
            ),
            Err(CgroupError::BadId(_))
        ));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn counters_parse_kernel_key_value_files() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(counter(oom_control, "oom_kill"), 2);
        assert_eq!(counter(oom_control, "missing"), 0);
    }
}
