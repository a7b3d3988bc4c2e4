//! Per-task accounting from the scheduler's own books (CPU time, run-queue
//! latency) and process events (exec, exit, OOM kill) through a ring
//! buffer. The tracing programs see the whole machine; a task is accounted
//! once `track` put its cgroup id in the map.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{HashMap, MapData, RingBuf};
use aya::programs::{BtfTracePoint, Iter};
use aya::{Btf, Ebpf, Pod};

use crate::{Chain, FenceError, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/accounting.bpf.o"));

/// Histogram slots (the C side's RUNQ_SLOTS): slot i counts waits of
/// [2^i, 2^(i+1)) microseconds (slot 0 also those under 1 µs).
pub const RUNQ_SLOTS: usize = 32;

/// What the kernel counted for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStats {
    /// CPU time, nanoseconds: the scheduler's runtime of the task's threads,
    /// live and exited.
    pub cpu_ns: u64,
    /// The tick-sampled user/system split (task utime/stime), nanoseconds.
    pub user_ns: u64,
    pub system_ns: u64,
    /// Waits in the run queue (enqueue to switch-in).
    pub runq_count: u64,
    pub runq_total_ns: u64,
    pub runq_slots: [u64; RUNQ_SLOTS],
    /// Whether the task keeps a run-queue histogram (else the run-queue
    /// figures are not counted).
    pub runq_wanted: bool,
}

/// `struct task_stats` of the C side: the counts of exited threads, and the
/// live threads' snapshot of the last flush.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawTaskStats {
    cpu_ns: u64,
    user_ns: u64,
    system_ns: u64,
    runq_count: u64,
    runq_total_ns: u64,
    runq_slots: [u64; RUNQ_SLOTS],
    live_cpu_ns: u64,
    live_user_ns: u64,
    live_system_ns: u64,
    /// Exited since the last flush, which moves it into `cpu_ns`; until then
    /// the thread may still be in the snapshot, so it is not counted.
    exited_cpu_ns: u64,
    runq_wanted: u64,
}

/// The times last reported for a task, below which its totals never go.
#[derive(Debug, Clone, Copy)]
struct Reported {
    cpu_ns: u64,
    user_ns: u64,
    system_ns: u64,
}

impl From<&TaskStats> for Reported {
    fn from(stats: &TaskStats) -> Self {
        Self {
            cpu_ns: stats.cpu_ns,
            user_ns: stats.user_ns,
            system_ns: stats.system_ns,
        }
    }
}

impl RawTaskStats {
    /// The totals, never below what was reported before: a thread that dies
    /// while the flush runs is in neither the snapshot nor `cpu_ns` until
    /// the next flush. (Sums wrap as the kernel's counters do: an exit can
    /// take a thread out of a snapshot `split` has just emptied.)
    fn totals(&self, before: Option<&Reported>) -> TaskStats {
        let floor = |now: u64, then: fn(&Reported) -> u64| before.map_or(now, |b| now.max(then(b)));
        TaskStats {
            cpu_ns: floor(self.cpu_ns.wrapping_add(self.live_cpu_ns), |b| b.cpu_ns),
            user_ns: floor(self.user_ns.wrapping_add(self.live_user_ns), |b| b.user_ns),
            system_ns: floor(self.system_ns.wrapping_add(self.live_system_ns), |b| {
                b.system_ns
            }),
            runq_count: self.runq_count,
            runq_total_ns: self.runq_total_ns,
            runq_slots: self.runq_slots,
            runq_wanted: self.runq_wanted != 0,
        }
    }
}

impl Default for TaskStats {
    fn default() -> Self {
        Self {
            cpu_ns: 0,
            user_ns: 0,
            system_ns: 0,
            runq_count: 0,
            runq_total_ns: 0,
            runq_slots: [0; RUNQ_SLOTS],
            runq_wanted: false,
        }
    }
}

// SAFETY: plain old data with the C layout of `struct task_stats` (all u64:
// no padding, every bit pattern valid).
#[allow(unsafe_code)]
unsafe impl Pod for RawTaskStats {}

impl TaskStats {
    /// CPU time split into user and system like the kernel's cputime_adjust:
    /// the precise total, divided in the ratio of the sampled user/system ticks.
    pub fn user_system_ns(&self) -> (u64, u64) {
        let sampled = self.user_ns + self.system_ns;
        if sampled == 0 {
            return (self.cpu_ns, 0);
        }
        let user =
            (u128::from(self.cpu_ns) * u128::from(self.user_ns) / u128::from(sampled)) as u64;
        (user, self.cpu_ns - user)
    }

    /// The run-queue wait under which a `quantile` (0..=1) of waits fell, in
    /// microseconds: the upper bound of the histogram slot it lands in.
    pub fn runq_quantile_micros(&self, quantile: f64) -> Option<u64> {
        let total: u64 = self.runq_slots.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * quantile.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (slot, count) in self.runq_slots.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(1u64 << (slot + 1));
            }
        }
        Some(1u64 << RUNQ_SLOTS)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Exec,
    Exit,
    OomKill,
}

/// A process event in one of our tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub cgroup: u64,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns), nanoseconds.
    pub time_ns: u64,
    /// The process (thread group) id, in the host's pid namespace.
    pub pid: u32,
    /// The wait status the process exits with (exit events).
    pub exit_code: i32,
    pub comm: String,
}

/// `struct event` of the C side.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawEvent {
    cgroup: u64,
    time_ns: u64,
    kind: u32,
    pid: u32,
    exit_code: i32,
    comm: [u8; 16],
}

fn parse_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<RawEvent>() {
        return None;
    }
    // SAFETY: the buffer holds at least one RawEvent (checked above); it is
    // plain old data, read unaligned because ring-buffer records are 8-byte
    // aligned only.
    #[allow(unsafe_code)]
    let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = match raw.kind {
        1 => EventKind::Exec,
        2 => EventKind::Exit,
        3 => EventKind::OomKill,
        _ => return None,
    };
    let end = raw
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(raw.comm.len());
    Some(Event {
        kind,
        cgroup: raw.cgroup,
        time_ns: raw.time_ns,
        pid: raw.pid,
        exit_code: raw.exit_code,
        comm: String::from_utf8_lossy(&raw.comm[..end]).into_owned(),
    })
}

/// The event ring buffer; poll its fd for readability, then `drain`.
pub struct Events {
    ring: RingBuf<MapData>,
}

impl Events {
    /// Every event waiting in the buffer.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(event) = parse_event(&item) {
                events.push(event);
            }
        }
        events
    }
}

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for Events {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// The loaded and attached accounting programs, with their maps.
pub struct Accounting {
    bpf: Ebpf,
    /// sched_switch's link, while attached.
    switch: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
    /// Attach sched_switch whatever the tasks ask: CPU time is counted there.
    switch_always: bool,
    /// Tasks (cgroup ids) that keep a run-queue histogram.
    runq_wanted: std::collections::HashSet<u64>,
    stats: HashMap<MapData, u64, RawTaskStats>,
    /// What was last reported per task, so totals never go back.
    reported: std::collections::HashMap<u64, Reported>,
    /// Flushes so far: every SPLIT_EVERY-th also renews the user/system split.
    flushes: u64,
    events: Option<Events>,
}

/// The iterator programs, which run only when `flush` reads them.
const ITERATORS: &[&str] = &["flush", "split"];

/// Flushes between renewals of the live threads' user/system split: it
/// visits every thread of every task, and the ratio moves slowly.
const SPLIT_EVERY: u64 = 10;

/// The context-switch program: CPU time (where the kernel's books do not
/// give it) and the run-queue histogram.
const SWITCH: (&str, &str) = ("switch_task", "sched_switch");

/// The tracepoints (program name, tracepoint) the object attaches to.
const TRACEPOINTS: &[(&str, &str)] = &[
    ("exec", "sched_process_exec"),
    ("exit_process", "sched_process_exit"),
    ("oom_victim", "mark_victim"),
];

impl Accounting {
    /// Loads the programs and attaches them to the scheduler's tracepoints;
    /// they account the tasks whose v2 cgroups are `track`ed. sched_switch
    /// is attached for good with `switch_always` (CPU time is counted
    /// there), else only while a tracked task keeps a run-queue histogram.
    pub fn attach(switch_always: bool) -> Result<Self, FenceError> {
        // Task storage (split_seen) is a map type aya 0.14 does not know; the kernel does.
        let mut bpf = aya::EbpfLoader::new()
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(|e| failed("accounting", "load", &e))?;
        let btf = Btf::from_sys_fs().map_err(|e| failed("accounting", "read kernel BTF", &e))?;
        for &(name, tracepoint) in TRACEPOINTS {
            let program: &mut BtfTracePoint = crate::program_mut(&mut bpf, name)?;
            program
                .load(tracepoint, &btf)
                .map_err(|e| failed(name, "load into the kernel", &e))?;
            program.attach().map_err(|e| failed(name, "attach", &e))?;
        }
        let (name, tracepoint) = SWITCH;
        let program: &mut BtfTracePoint = crate::program_mut(&mut bpf, name)?;
        program
            .load(tracepoint, &btf)
            .map_err(|e| failed(name, "load into the kernel", &e))?;
        for &name in ITERATORS {
            let iterator: &mut Iter = crate::program_mut(&mut bpf, name)?;
            iterator
                .load("task", &btf)
                .map_err(|e| failed(name, "load into the kernel", &e))?;
        }
        let stats = crate::take_cgroup_map(&mut bpf, "task_stats")?;
        let ring = bpf.take_map("events").ok_or_else(|| FenceError::Map {
            map: "events",
            step: "open",
            detail: "missing from the object".into(),
        })?;
        let ring = RingBuf::try_from(ring).map_err(|e| FenceError::Map {
            map: "events",
            step: "open",
            detail: Chain(&e).to_string(),
        })?;
        let mut accounting = Self {
            bpf,
            switch: None,
            switch_always,
            runq_wanted: std::collections::HashSet::new(),
            stats,
            reported: std::collections::HashMap::new(),
            flushes: 0,
            events: Some(Events { ring }),
        };
        accounting.attach_switch_as_needed()?;
        Ok(accounting)
    }

    /// Attaches sched_switch when something needs it, detaches it when
    /// nothing does (a node where no task keeps a histogram pays nothing
    /// per context switch).
    fn attach_switch_as_needed(&mut self) -> Result<(), FenceError> {
        let needed = self.switch_always || !self.runq_wanted.is_empty();
        let (name, _) = SWITCH;
        let program: &mut BtfTracePoint = crate::program_mut(&mut self.bpf, name)?;
        match (needed, self.switch.take()) {
            (true, None) => {
                let link = program.attach().map_err(|e| failed(name, "attach", &e))?;
                self.switch = Some(link);
            }
            (false, Some(link)) => {
                program
                    .detach(link)
                    .map_err(|e| failed(name, "detach", &e))?;
            }
            (_, kept) => self.switch = kept,
        }
        Ok(())
    }

    /// Whether sched_switch runs now.
    pub fn switch_attached(&self) -> bool {
        self.switch.is_some()
    }

    /// The event buffer (once: whoever takes it reads it).
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    /// Starts accounting the task in `cgroup_id` (from zero), with its
    /// run-queue histogram where `runq` asks for it.
    pub fn track(&mut self, cgroup_id: u64, runq: bool) -> Result<(), FenceError> {
        self.reported.remove(&cgroup_id);
        let entry = RawTaskStats {
            runq_wanted: u64::from(runq),
            ..RawTaskStats::default()
        };
        self.stats
            .insert(cgroup_id, entry, 0)
            .map_err(|e| crate::insert_failed("task_stats", &e))?;
        if runq {
            self.runq_wanted.insert(cgroup_id);
        } else {
            self.runq_wanted.remove(&cgroup_id);
        }
        self.attach_switch_as_needed()
    }

    /// Takes a snapshot of the live threads' CPU time, so the next reads are
    /// current (runs the `flush` iterator once; the first and every
    /// SPLIT_EVERY-th time, `split` too).
    pub fn flush(&mut self) -> Result<(), FenceError> {
        if self.flushes.is_multiple_of(SPLIT_EVERY) {
            self.run_iterator("split")?;
        }
        self.flushes += 1;
        self.run_iterator("flush")
    }

    /// Runs an iterator program once over every thread on the machine.
    fn run_iterator(&mut self, name: &'static str) -> Result<(), FenceError> {
        let iterator: &mut Iter = crate::program_mut(&mut self.bpf, name)?;
        let link = iterator.attach().map_err(|e| failed(name, "attach", &e))?;
        let link = iterator
            .take_link(link)
            .map_err(|e| failed(name, "take its link", &e))?;
        let mut file = link
            .into_file()
            .map_err(|e| failed(name, "create an iterator", &e))?;
        // The program prints nothing; reading runs it over every thread.
        let mut sink = Vec::new();
        file.read_to_end(&mut sink)
            .map_err(|e| failed(name, "run", &e))?;
        Ok(())
    }

    /// What was counted for the task (as of the last flush), if it is tracked.
    pub fn stats(&mut self, cgroup_id: u64) -> Option<TaskStats> {
        let raw = self.stats.get(&cgroup_id, 0).ok()?;
        let totals = raw.totals(self.reported.get(&cgroup_id));
        self.reported.insert(cgroup_id, Reported::from(&totals));
        Some(totals)
    }

    /// Every tracked task's counts (as of the last flush), by cgroup id, in
    /// a few syscalls; none where CPU is counted elsewhere (the kernel's
    /// books) and no task keeps a run-queue histogram: nothing to read.
    pub fn all_stats(&mut self) -> Result<std::collections::HashMap<u64, TaskStats>, FenceError> {
        if !self.switch_always && self.runq_wanted.is_empty() {
            return Ok(std::collections::HashMap::new());
        }
        let raw: std::collections::HashMap<u64, RawTaskStats> =
            crate::lookup_all(aya::maps::IterableMap::map(&self.stats), "task_stats")?;
        let totals: std::collections::HashMap<u64, TaskStats> = raw
            .iter()
            .map(|(key, raw)| (*key, raw.totals(self.reported.get(key))))
            .collect();
        self.reported = totals
            .iter()
            .map(|(key, stats)| (*key, Reported::from(stats)))
            .collect();
        Ok(totals)
    }

    /// Stops accounting the task (it ended).
    pub fn forget(&mut self, cgroup_id: u64) {
        self.reported.remove(&cgroup_id);
        let _ = self.stats.remove(&cgroup_id);
        if self.runq_wanted.remove(&cgroup_id)
            && let Err(error) = self.attach_switch_as_needed()
        {
            tracing::warn!(%error, "cannot detach sched_switch; it runs on");
        }
    }

    /// Kernel time spent in the tracing programs so far (needs
    /// `kernel.bpf_stats_enabled`; zero otherwise). The iterators are left
    /// out: they run inside `flush`'s read, in the caller's own CPU time.
    pub fn run_time(&self) -> std::time::Duration {
        crate::run_time(&self.bpf, ITERATORS)
    }

    /// Times these programs ran (same condition).
    pub fn run_count(&self) -> u64 {
        crate::run_count(&self.bpf, ITERATORS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_slot_upper_bounds() {
        let mut stats = TaskStats::default();
        assert_eq!(stats.runq_quantile_micros(0.5), None);
        stats.runq_slots[0] = 90; // < 2 µs
        stats.runq_slots[4] = 9; // 16..32 µs
        stats.runq_slots[10] = 1; // 1024..2048 µs
        assert_eq!(stats.runq_quantile_micros(0.5), Some(2));
        assert_eq!(stats.runq_quantile_micros(0.9), Some(2));
        assert_eq!(stats.runq_quantile_micros(0.95), Some(32));
        assert_eq!(stats.runq_quantile_micros(0.99), Some(32));
        assert_eq!(stats.runq_quantile_micros(1.0), Some(2048));
    }

    #[test]
    fn user_system_split_follows_the_sampled_ratio() {
        let stats = TaskStats {
            cpu_ns: 1_000,
            user_ns: 300,
            system_ns: 100,
            ..TaskStats::default()
        };
        assert_eq!(stats.user_system_ns(), (750, 250));
        let unsampled = TaskStats {
            cpu_ns: 500,
            ..TaskStats::default()
        };
        assert_eq!(unsampled.user_system_ns(), (500, 0));
    }

    #[test]
    fn events_parse_and_unknown_kinds_are_skipped() {
        let raw = RawEvent {
            cgroup: 42,
            time_ns: 7,
            kind: 3,
            pid: 1234,
            exit_code: 9,
            comm: *b"memhog\0\0\0\0\0\0\0\0\0\0",
        };
        let size = std::mem::size_of::<RawEvent>();
        // SAFETY: RawEvent is plain old data; viewing it as bytes is sound.
        #[allow(unsafe_code)]
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw as *const RawEvent).cast::<u8>(), size) };
        let event = parse_event(bytes).expect("an OOM event");
        assert_eq!(event.kind, EventKind::OomKill);
        assert_eq!((event.cgroup, event.pid, event.exit_code), (42, 1234, 9));
        assert_eq!(event.comm, "memhog");
        assert_eq!(parse_event(&bytes[..size - 1]), None);
        let unknown = RawEvent { kind: 99, ..raw };
        #[allow(unsafe_code)]
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts((&unknown as *const RawEvent).cast::<u8>(), size) };
        assert_eq!(parse_event(bytes), None);
    }
}
