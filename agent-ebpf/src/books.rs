//! The kernel's own per-cgroup books (CPU from rstat, memory from the memcg
//! page counter, PSI totals), read for every cgroup under the agent's
//! subtree in one pass of a cgroup iterator (books.bpf.c) into an array
//! this process has mapped: a sample is the walk's few syscalls and a read
//! of memory, its cost no longer grows with how often tasks wake, and a
//! figure the kernel keeps per cgroup carries on across agent restarts.
//!
//! aya does not resolve kfunc calls; the one call the program makes (the
//! rstat flush) is patched here with the running kernel's BTF id of
//! `css_rstat_flush` (6.16 on) or `cgroup_rstat_flush` (6.1 to 6.15).

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::MapData;
use aya::programs::Iter;
use aya::{Btf, Ebpf};
use aya_obj::btf::BtfKind;

use crate::network::NetStats;
use crate::runq::Histogram;
use crate::{FenceError, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/books.bpf.o"));
/// The same walk that also reads the run-queue histograms in cgroup
/// storage (a map type from 6.2 on: this object loads only there).
static OBJECT_RUNQ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/books_runq.bpf.o"));

/// The placeholder kfunc call in the object: BPF_JMP|BPF_CALL, src_reg
/// BPF_PSEUDO_KFUNC_CALL, imm 0x7ff0b001.
const FLUSH_CALL: [u8; 8] = [0x85, 0x20, 0x00, 0x00, 0x01, 0xb0, 0xf0, 0x7f];
/// What replaces it where the kernel has no flush kfunc: `r0 = 0`.
const NO_CALL: [u8; 8] = [0xb7, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
/// The rstat flush kfuncs, newest first.
const FLUSH_KFUNCS: &[&str] = &["css_rstat_flush", "cgroup_rstat_flush"];

/// `struct record` of the C side: one cgroup's books.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    /// The walk that wrote it (in slot 0, the last walk's number).
    walk: u64,
    cgroup: u64,
    cpu_ns: u64,
    user_ns: u64,
    system_ns: u64,
    memory_bytes: u64,
    cpu_some_ns: u64,
    cpu_full_ns: u64,
    memory_some_ns: u64,
    memory_full_ns: u64,
    io_some_ns: u64,
    io_full_ns: u64,
    net: NetStats,
    denied_binds: u64,
    denied_opens: u64,
    flags: u32,
    level: u32,
}

const HAS_MEMORY: u32 = 1;
const HAS_PSI: u32 = 2;
const HAS_RUNQ: u32 = 4;

/// One value per slot of the walk (its records, or the histograms beside
/// them), the kernel's array mapped read-only here.
struct Slots<T> {
    /// Keeps the array alive.
    _map: MapData,
    base: std::ptr::NonNull<T>,
    len: usize,
}

// SAFETY: the mapping is only read, through `&self`, and lives as long as
// the value; the kernel writes it only while a walk runs, inside read().
#[allow(unsafe_code)]
unsafe impl<T> Send for Slots<T> {}

impl<T: Copy> Slots<T> {
    fn map(bpf: &mut Ebpf, name: &'static str) -> Result<Self, FenceError> {
        let failure = |detail: String| FenceError::Map {
            map: name,
            step: "map into memory",
            detail,
        };
        let map = match bpf.take_map(name) {
            Some(aya::maps::Map::Array(data)) => data,
            _ => return Err(failure("not an array in the object".into())),
        };
        // The header, then a slot per cgroup.
        let len = crate::MAX_TASKS + 1;
        let size = len * std::mem::size_of::<T>();
        // SAFETY: a shared read-only mapping of the array map's fd (an
        // mmapable array of MAX_TASKS + 1 values of T, the C side's layout);
        // checked for failure below.
        #[allow(unsafe_code)]
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(failure(std::io::Error::last_os_error().to_string()));
        }
        let base = std::ptr::NonNull::new(base.cast::<T>())
            .ok_or_else(|| failure("mmap gave a null pointer".into()))?;
        Ok(Self {
            _map: map,
            base,
            len,
        })
    }

    fn slot(&self, slot: usize) -> T {
        debug_assert!(slot < self.len);
        // SAFETY: slot < len, inside the mapping; values are plain old
        // data, read whole with a volatile read (the kernel wrote them).
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::read_volatile(self.base.as_ptr().add(slot.min(self.len - 1)))
        }
    }
}

impl Slots<Record> {
    /// The records the last walk wrote: the slots after its header (slot
    /// 0, with its number), while they carry the same number; with the
    /// histograms of those that keep one.
    fn fresh(&self, histograms: Option<&Slots<Histogram>>) -> HashMap<u64, CgroupBooks> {
        let walk = self.slot(0).walk;
        let mut books = HashMap::new();
        if walk == 0 {
            return books;
        }
        for slot in 1..self.len {
            let record = self.slot(slot);
            if record.walk != walk {
                break;
            }
            let mut book = CgroupBooks::from(&record);
            if record.flags & HAS_RUNQ != 0 {
                book.runq = histograms.map(|h| h.slot(slot));
            }
            books.insert(record.cgroup, book);
        }
        books
    }
}

impl<T> Drop for Slots<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this size, unmapped once.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.len * std::mem::size_of::<T>(),
            );
        }
    }
}

/// Pressure stall totals (PSI), nanoseconds: time some (or all, `full`)
/// of the cgroup's runnable tasks waited for CPU, memory or I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub cpu_some_ns: u64,
    pub cpu_full_ns: u64,
    pub memory_some_ns: u64,
    pub memory_full_ns: u64,
    pub io_some_ns: u64,
    pub io_full_ns: u64,
}

/// One cgroup's books.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupBooks {
    /// CPU time (rstat base stats), nanoseconds: zero unless the books are
    /// flushed (`Books::flushes`).
    pub cpu_ns: u64,
    /// The tick-sampled user/system split, nanoseconds.
    pub user_ns: u64,
    pub system_ns: u64,
    /// The memcg page counter in bytes: the cgroup's own memcg where the
    /// memory controller is on for it, else (hybrid host) the v1 memcg its
    /// tasks are charged to; none for a cgroup with neither.
    pub memory_bytes: Option<u64>,
    /// Where PSI is on.
    pub pressure: Option<Pressure>,
    /// Our programs' counters for the cgroup (zero where it has none):
    /// read in the same pass where their maps were shared at load
    /// (`Books::shares_counters`).
    pub net: NetStats,
    pub denied_binds: u64,
    pub denied_opens: u64,
    /// The run-queue histogram, where the cgroup keeps one in cgroup
    /// storage and the walk shares that map (`Books::shares_runq`).
    pub runq: Option<Histogram>,
}

impl From<&Record> for CgroupBooks {
    fn from(record: &Record) -> Self {
        Self {
            cpu_ns: record.cpu_ns,
            user_ns: record.user_ns,
            system_ns: record.system_ns,
            memory_bytes: (record.flags & HAS_MEMORY != 0).then_some(record.memory_bytes),
            pressure: (record.flags & HAS_PSI != 0).then_some(Pressure {
                cpu_some_ns: record.cpu_some_ns,
                cpu_full_ns: record.cpu_full_ns,
                memory_some_ns: record.memory_some_ns,
                memory_full_ns: record.memory_full_ns,
                io_some_ns: record.io_some_ns,
                io_full_ns: record.io_full_ns,
            }),
            net: record.net,
            denied_binds: record.denied_binds,
            denied_opens: record.denied_opens,
            runq: None,
        }
    }
}

/// The loaded iterator, its walk of the v2 subtree and the map it fills.
pub struct Books {
    /// Keeps the program loaded.
    _bpf: Ebpf,
    walk: OwnedFd,
    books: Slots<Record>,
    /// Beside the records, where the walk reads the run-queue histograms.
    histograms: Option<Slots<Histogram>>,
    /// Which flush kfunc was patched in; None: CPU figures are not current.
    flush: Option<&'static str>,
    /// Why the flush could not be used, when it could not.
    flush_missing: Option<String>,
    /// Whether the network and denial counters were shared at load.
    shares_counters: bool,
}

/// Our own programs' per-task counter maps, read in the books' pass.
pub struct Counters<'a> {
    pub net: &'a MapData,
    pub denied_binds: &'a MapData,
    pub denied_opens: &'a MapData,
}

impl Books {
    /// Loads the iterator and attaches a walk of `v2_subtree`; with
    /// `counters` (and `runq`, the run-queue histograms' cgroup storage),
    /// over those maps, so that a walk reads them too.
    pub fn load(
        v2_subtree: &Path,
        counters: Option<Counters<'_>>,
        runq: Option<&MapData>,
    ) -> Result<Self, FenceError> {
        let btf = Btf::from_sys_fs().map_err(|e| failed("read_books", "read kernel BTF", &e))?;
        let kfunc = FLUSH_KFUNCS
            .iter()
            .find_map(|&name| Some((name, btf.id_by_type_name_kind(name, BtfKind::Func).ok()?)));
        // The maps are handed over through bpffs: aya reuses a map pinned
        // at the path given for it. The pins go once the object is loaded.
        let counters_given = counters.is_some();
        let mut maps = Vec::new();
        if let Some(counters) = counters {
            maps.extend([
                ("task_net", counters.net),
                ("denied_binds", counters.denied_binds),
                ("denied_opens", counters.denied_opens),
            ]);
        }
        if let Some(runq) = runq {
            maps.push(("runq", runq));
        }
        let shared = (!maps.is_empty())
            .then(|| {
                SharedPins::make(&maps)
                    .map_err(|error| tracing::warn!(%error, "the books cannot share the fences' counter maps or the run-queue histograms; those are read on their own"))
                    .ok()
            })
            .flatten();
        let pins = shared.as_ref().map(SharedPins::paths).unwrap_or_default();
        let shares_runq = shared.is_some() && runq.is_some();
        let object = if shares_runq { OBJECT_RUNQ } else { OBJECT };
        let (mut bpf, flush, flush_missing) = match kfunc {
            Some((name, id)) => match load_patched(object, &btf, Some(id), &pins) {
                Ok(bpf) => (bpf, Some(name), None),
                // Its call refused (an older verifier's rule on its
                // argument): the books without the CPU figure.
                Err(error) => (
                    load_patched(object, &btf, None, &pins)?,
                    None,
                    Some(format!("{name} could not be called: {error}")),
                ),
            },
            None => (
                load_patched(object, &btf, None, &pins)?,
                None,
                Some(format!(
                    "the kernel has neither {} (BTF)",
                    FLUSH_KFUNCS.join(" nor ")
                )),
            ),
        };
        let shares_counters = shared.is_some() && counters_given;
        drop(shared);
        let program: &Iter = bpf
            .program("read_books")
            .ok_or_else(|| FenceError::Program {
                program: "read_books",
                step: "find",
                detail: "it is not in the object".into(),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| failed("read_books", "type-check", &e))?;
        let fd = program
            .fd()
            .map_err(|e| failed("read_books", "get its fd", &e))?;
        let cgroup = crate::open_cgroup(v2_subtree)?;
        let walk = attach_walk(fd.as_fd(), cgroup.as_fd())
            .map_err(|e| failed("read_books", "attach to the subtree", &e))?;
        let books = Slots::map(&mut bpf, "books")?;
        let histograms = if shares_runq {
            Some(Slots::map(&mut bpf, "histograms")?)
        } else {
            None
        };
        Ok(Self {
            _bpf: bpf,
            walk,
            books,
            histograms,
            flush,
            flush_missing,
            shares_counters,
        })
    }

    /// Whether the records carry the run-queue histograms kept in cgroup
    /// storage.
    pub fn shares_runq(&self) -> bool {
        self.histograms.is_some()
    }

    /// Whether the records carry the network and denial counters.
    pub fn shares_counters(&self) -> bool {
        self.shares_counters
    }

    /// The flush kfunc in use: CPU figures are current.
    pub fn flushes(&self) -> Option<&'static str> {
        self.flush
    }

    /// Why CPU figures are not taken from here, if they are not.
    pub fn flush_missing(&self) -> Option<&str> {
        self.flush_missing.as_deref()
    }

    /// Every cgroup below the v2 subtree, by its v2 id.
    pub fn read(&mut self) -> Result<HashMap<u64, CgroupBooks>, FenceError> {
        run_walk(self.walk.as_fd())?;
        Ok(self.books.fresh(self.histograms.as_ref()))
    }
}

/// The other programs' maps pinned for the books' load, in a directory of
/// their own; removed when dropped (the loaded program holds the maps).
struct SharedPins {
    dir: std::path::PathBuf,
    names: Vec<&'static str>,
}

impl SharedPins {
    fn make(maps: &[(&'static str, &MapData)]) -> Result<Self, FenceError> {
        crate::pins::mount_bpffs()?;
        remove_dead_pins();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Path::new("/sys/fs/bpf").join(format!("butte-books-{}-{n}", std::process::id()));
        let shown = dir.display().to_string();
        let pin_error = |detail: String| FenceError::Pin {
            path: shown.clone(),
            detail,
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| pin_error(e.to_string()))?;
        let pins = Self {
            dir,
            names: maps.iter().map(|(name, _)| *name).collect(),
        };
        for (name, map) in maps {
            map.pin(pins.dir.join(name))
                .map_err(|e| pin_error(format!("{name}: {e}")))?;
        }
        Ok(pins)
    }

    fn paths(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        self.names
            .iter()
            .map(|&name| (name, self.dir.join(name)))
            .collect()
    }
}

/// Removes what a process killed while loading the books left pinned.
fn remove_dead_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("butte-books-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the pid exists.
        #[allow(unsafe_code)]
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for SharedPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The object with its flush call patched to the kfunc `id` (or to nothing),
/// loaded, its iterator loaded into the kernel.
fn load_patched(
    object: &[u8],
    btf: &Btf,
    id: Option<u32>,
    pins: &[(&'static str, std::path::PathBuf)],
) -> Result<Ebpf, FenceError> {
    let mut bytes = object.to_vec();
    let at = bytes
        .windows(FLUSH_CALL.len())
        .position(|w| w == FLUSH_CALL)
        .ok_or_else(|| FenceError::Program {
            program: "read_books",
            step: "patch its flush call",
            detail: "the placeholder call is not in the object".into(),
        })?;
    let call = match id {
        Some(id) => {
            let mut call = FLUSH_CALL;
            call[4..].copy_from_slice(&id.to_le_bytes());
            call
        }
        None => NO_CALL,
    };
    bytes[at..at + call.len()].copy_from_slice(&call);
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page_size = u64::try_from(page_size).unwrap_or(4096);
    let mut loader = aya::EbpfLoader::new();
    loader.override_global("page_size", &page_size, true);
    let on_v1 = u8::from(memory_on_v1());
    loader.override_global("memory_on_v1", &on_v1, true);
    for (name, path) in pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load(&bytes)
        .map_err(|e| failed("books", "load", &e))?;
    let iterator: &mut Iter = crate::program_mut(&mut bpf, "read_books")?;
    iterator
        .load("cgroup", btf)
        .map_err(|e| failed("read_books", "load into the kernel", &e))?;
    Ok(bpf)
}

/// Whether the memory controller is on a v1 hierarchy (a hybrid host):
/// its line in /proc/cgroups names a hierarchy other than 0.
fn memory_on_v1() -> bool {
    std::fs::read_to_string("/proc/cgroups").is_ok_and(|table| {
        table.lines().any(|line| {
            let mut fields = line.split_whitespace();
            fields.next() == Some("memory") && fields.next().is_some_and(|h| h != "0")
        })
    })
}

/// A bpf(2) command that returns a new fd.
fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> std::io::Result<OwnedFd> {
    let fd = crate::pins::bpf(cmd, attr, size)?;
    // SAFETY: these commands return a new fd, ours.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_CREATE of the iterator over `cgroup` and its descendants, in
/// pre-order (the root first: it is where the program flushes). aya's own
/// attach passes no walk order, which the kernel refuses.
fn attach_walk(program: BorrowedFd<'_>, cgroup: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TRACE_ITER: u32 = 28;
    const BPF_CGROUP_ITER_DESCENDANTS_PRE: u32 = 2;
    /// `union bpf_iter_link_info`, its cgroup member.
    #[repr(C)]
    struct CgroupIterInfo {
        order: u32,
        cgroup_fd: u32,
        cgroup_id: u64,
    }
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        _pad: u32,
    }
    let mut info = CgroupIterInfo {
        order: BPF_CGROUP_ITER_DESCENDANTS_PRE,
        cgroup_fd: cgroup.as_raw_fd() as u32,
        cgroup_id: 0,
    };
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: (&raw mut info) as u64,
        iter_info_len: std::mem::size_of::<CgroupIterInfo>() as u32,
        _pad: 0,
    };
    bpf(
        BPF_LINK_CREATE,
        (&raw mut attr).cast(),
        std::mem::size_of::<LinkCreateAttr>(),
    )
}

/// One walk: BPF_ITER_CREATE on its link, read to the end (the program
/// writes to its maps; it prints nothing).
fn run_walk(link: BorrowedFd<'_>) -> Result<(), FenceError> {
    const BPF_ITER_CREATE: libc::c_long = 33;
    #[repr(C)]
    struct IterCreateAttr {
        link_fd: u32,
        flags: u32,
    }
    let mut attr = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    let fd = bpf(
        BPF_ITER_CREATE,
        (&raw mut attr).cast(),
        std::mem::size_of::<IterCreateAttr>(),
    )
    .map_err(|e| failed("read_books", "create an iterator", &e))?;
    let mut nothing = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut nothing)
        .map_err(|e| failed("read_books", "run", &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_c_layout_and_their_flags() {
        assert_eq!(
            std::mem::size_of::<Record>(),
            168,
            "the C side's struct record"
        );
        let with = Record {
            cpu_ns: 100,
            memory_bytes: 4096,
            cpu_some_ns: 5,
            flags: HAS_MEMORY | HAS_PSI,
            ..Record::default()
        };
        let books = CgroupBooks::from(&with);
        assert_eq!(books.cpu_ns, 100);
        assert_eq!(books.memory_bytes, Some(4096));
        assert_eq!(books.pressure.map(|p| p.cpu_some_ns), Some(5));
        let without = CgroupBooks::from(&Record {
            memory_bytes: 99,
            ..Record::default()
        });
        assert_eq!(without.memory_bytes, None, "no memory controller there");
        assert_eq!(without.pressure, None);
    }
}
