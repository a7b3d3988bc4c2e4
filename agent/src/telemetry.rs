//! The telemetry collector. Every interval: the kernel's own per-cgroup
//! books read in one iterator pass (CPU from rstat, memory from the memcg
//! page counter, pressure totals from PSI), what the eBPF programs counted
//! per container (run queue, network, denials, events), and the rss/cache
//! split from memory.stat when it may have moved (all due files in one
//! io_uring submission); as Mesos's ResourceStatistics plus our additions,
//! kept as each task's newest sample (GET_CONTAINERS, /metrics) and
//! streamed to the master. Where the books cannot be read, CPU comes from
//! the scheduler's tracepoint and memory from each task's usage file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use butte_agent_ebpf::accounting::TaskStats;
use butte_agent_ebpf::books::Pressure;
use butte_agent_ebpf::network::NetStats;
use butte_api::mesos::v1::{ContainerId, ExecutorId, FrameworkId, ResourceStatistics, TaskId};
use butte_api::telemetry::v1::{ExtraStatistics, TaskSample, TelemetryBatch};
use butte_isolators::cgroups::{Isolator, MemoryFiles, counter};
use butte_isolators::fences::Counts;

use crate::agent::{Agent, EventCounts, TaskView};
use crate::cgroup_reader::{CgroupReader, NUMBER_READ_SIZE, STAT_READ_SIZE};

const MIB: f64 = 1024.0 * 1024.0;

/// A container's memory, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub usage: u64,
    pub rss: u64,
    pub cache: u64,
}

struct OpenMemory {
    files: MemoryFiles,
    /// Its v2 cgroup's id (the directory's inode), by which the kernel's
    /// books name it.
    cgroup: u64,
    usage: File,
    stat: File,
    /// The last stat read: its breakdown and when it was taken.
    breakdown: Option<Breakdown>,
}

/// The rss/cache split of memory.stat, and the usage and round it was read at.
#[derive(Clone, Copy)]
struct Breakdown {
    rss: u64,
    cache: u64,
    usage: u64,
    round: u64,
}

impl Breakdown {
    /// Whether memory.stat is due again: the usage moved by more than a
    /// sixteenth (at least 1 MiB) since it was read, or it is STAT_MAX_AGE
    /// rounds old. A stat read costs ten usage reads on v1, and a task
    /// whose usage holds still has not changed its split either.
    fn stale(&self, usage: u64, round: u64) -> bool {
        let moved = usage.abs_diff(self.usage);
        moved > (self.usage / 16).max(1 << 20) || round >= self.round + STAT_MAX_AGE
    }
}

/// Rounds after which memory.stat (the rss/cache breakdown) is read again
/// even if the usage held still. The usage is read every round.
pub const STAT_MAX_AGE: u64 = 30;

/// Reads containers' memory files, kept open between rounds.
pub struct MemorySampler {
    reader: CgroupReader,
    open: HashMap<String, OpenMemory>,
    round: u64,
}

impl MemorySampler {
    pub fn new(reader: CgroupReader) -> Self {
        Self {
            reader,
            open: HashMap::new(),
            round: 0,
        }
    }

    /// The memory of each container (those whose figures cannot be had are
    /// left out): its usage from the kernel's books (`books`: bytes by v2
    /// cgroup id), else every usage
    /// file in one go; then the stat files that are due in a second.
    pub fn read<'a>(
        &mut self,
        isolator: &dyn Isolator,
        containers: &[&'a str],
        books: &HashMap<u64, u64>,
    ) -> HashMap<&'a str, Memory> {
        let wanted: HashSet<&str> = containers.iter().copied().collect();
        self.open.retain(|id, _| wanted.contains(id.as_str()));
        for &id in containers {
            if !self.open.contains_key(id) {
                let files = isolator.memory_files(id);
                if let (Ok(usage), Ok(stat)) = (File::open(&files.usage), File::open(&files.stat)) {
                    let cgroup =
                        std::fs::metadata(isolator.v2_dir(id)).map_or(0, |meta| meta.ino());
                    let open = OpenMemory {
                        files,
                        cgroup,
                        usage,
                        stat,
                        breakdown: None,
                    };
                    self.open.insert(id.to_owned(), open);
                }
            }
        }
        let round = self.round;
        self.round += 1;
        let ids: Vec<&'a str> = containers
            .iter()
            .copied()
            .filter(|id| self.open.contains_key(*id))
            .collect();
        // Usage files are read only for what the books do not hold.
        let mut usages: Vec<Option<u64>> = ids
            .iter()
            .map(|id| books.get(&self.open[*id].cgroup).copied())
            .collect();
        let unknown: Vec<usize> = (0..ids.len()).filter(|&i| usages[i].is_none()).collect();
        if !unknown.is_empty() {
            let files: Vec<&File> = unknown.iter().map(|&i| &self.open[ids[i]].usage).collect();
            let read = self.reader.read_all(&files, NUMBER_READ_SIZE);
            for (&i, result) in unknown.iter().zip(read) {
                usages[i] = result
                    .ok()
                    .and_then(|b| std::str::from_utf8(b).ok()?.trim().parse().ok());
            }
        }
        let due: Vec<(&'a str, u64)> = ids
            .iter()
            .zip(&usages)
            .filter_map(|(id, usage)| {
                let usage = (*usage)?;
                self.open[*id]
                    .breakdown
                    .is_none_or(|b| b.stale(usage, round))
                    .then_some((*id, usage))
            })
            .collect();
        if !due.is_empty() {
            let files: Vec<&File> = due.iter().map(|(id, _)| &self.open[*id].stat).collect();
            let stats = self.reader.read_all(&files, STAT_READ_SIZE);
            for ((id, usage), stat) in due.iter().zip(stats) {
                if let (Some(open), Ok(stat)) = (self.open.get_mut(*id), stat) {
                    let stat = String::from_utf8_lossy(stat);
                    open.breakdown = Some(Breakdown {
                        rss: counter(&stat, open.files.rss_key),
                        cache: counter(&stat, open.files.file_key),
                        usage: *usage,
                        round,
                    });
                }
            }
        }
        let mut memory = HashMap::with_capacity(ids.len());
        for (id, usage) in ids.into_iter().zip(usages) {
            let Some(usage) = usage else {
                continue;
            };
            let breakdown = self.open.get(id).and_then(|open| open.breakdown);
            let (rss, cache) = breakdown.map_or((0, 0), |b| (b.rss, b.cache));
            memory.insert(id, Memory { usage, rss, cache });
        }
        memory
    }
}

/// What the kernel counted for one container, as read this round.
#[derive(Default)]
struct Counted {
    cpu: Option<TaskStats>,
    pressure: Option<Pressure>,
    net: Option<NetStats>,
    denied_binds: u64,
    denied_opens: u64,
}

/// One sampling round over every running task.
pub fn sample(agent: &Agent, memory_sampler: &mut MemorySampler) -> TelemetryBatch {
    let views = agent.task_views();
    let containers: BTreeSet<&str> = views.iter().map(|v| v.container_id.as_str()).collect();
    let containers: Vec<&str> = containers.into_iter().collect();
    let gpu_use = crate::gpu_telemetry::sample(agent);
    let held: HashMap<&str, Vec<u32>> = match agent.lock().gpus.as_ref() {
        Some(books) => containers
            .iter()
            .map(|&c| (c, books.held_by(c)))
            .filter(|(_, gpus)| !gpus.is_empty())
            .collect(),
        None => HashMap::new(),
    };
    let events = agent.lock().event_counts.clone();
    let mut counted: HashMap<u64, Counted> = HashMap::new();
    let memory_books: HashMap<u64, u64>;
    {
        let mut fences = agent.fences();
        fences.flush();
        let cpu_from_books = fences.cpu_from_books();
        let Counts {
            books,
            mut cpu,
            mut net,
            denied_binds: binds,
            denied_opens: opens,
        } = fences.counts();
        memory_books = books
            .iter()
            .filter_map(|(id, b)| Some((*id, b.memory_bytes?)))
            .collect();
        for view in &views {
            let key = view.cgroup_key;
            let book = books.get(&key);
            let mut task_cpu = cpu.remove(&key);
            if cpu_from_books {
                match book {
                    // CPU from rstat; the run queue still from the tracepoint.
                    Some(book) => {
                        let stats = task_cpu.get_or_insert_with(TaskStats::default);
                        stats.cpu_ns = book.cpu_ns;
                        stats.user_ns = book.user_ns;
                        stats.system_ns = book.system_ns;
                    }
                    // The books could not be read this round: no CPU figure,
                    // rather than the tracepoint's, not kept current here.
                    None => task_cpu = None,
                }
            }
            counted.entry(key).or_insert_with(|| Counted {
                cpu: task_cpu,
                pressure: book.and_then(|b| b.pressure),
                net: net.remove(&key),
                denied_binds: binds.get(&key).copied().unwrap_or(0),
                denied_opens: opens.get(&key).copied().unwrap_or(0),
            });
        }
    }
    let memory = memory_sampler.read(agent.isolator(), &containers, &memory_books);
    let timestamp = butte_api::update_queue::unix_now();
    let samples = views
        .iter()
        .map(|view| {
            let empty = Counted::default();
            let counted = counted.get(&view.cgroup_key).unwrap_or(&empty);
            let mut sample = task_sample(
                view,
                timestamp,
                counted,
                memory.get(view.container_id.as_str()).copied(),
                events.get(&view.cgroup_key).copied().unwrap_or_default(),
            );
            if let (Some(gpus), Some(extra)) =
                (held.get(view.container_id.as_str()), sample.extra.as_mut())
            {
                let used = gpu_use.get(&view.container_id).copied().unwrap_or_default();
                extra.gpus.clone_from(gpus);
                extra.gpu_memory_used_bytes = Some(used.memory_bytes);
                extra.gpu_utilization_percent = Some(used.utilization_percent);
            }
            sample
        })
        .collect();
    TelemetryBatch { timestamp, samples }
}

fn task_sample(
    view: &TaskView,
    timestamp: f64,
    counted: &Counted,
    memory: Option<Memory>,
    events: EventCounts,
) -> TaskSample {
    let bandwidth = view.resources.scalar("network_bandwidth");
    let disk = view.resources.scalar("disk");
    let mut statistics = ResourceStatistics {
        timestamp,
        cpus_limit: Some(view.resources.scalar("cpus")),
        mem_limit_bytes: Some((view.resources.scalar("mem") * MIB) as u64),
        net_tx_rate_limit: (bandwidth > 0.0).then_some((bandwidth * 1e6 / 8.0) as u64),
        disk_limit_bytes: (disk > 0.0).then_some((disk * MIB) as u64),
        disk_used_bytes: view.disk_used_bytes,
        ..Default::default()
    };
    let mut extra = ExtraStatistics {
        denied_binds: Some(counted.denied_binds),
        denied_device_opens: Some(counted.denied_opens),
        execs: Some(events.execs),
        oom_kills: Some(events.oom_kills),
        network_bandwidth_limit: (bandwidth > 0.0).then_some(bandwidth),
        ..Default::default()
    };
    if let Some(cpu) = counted.cpu {
        let (user, system) = cpu.user_system_ns();
        statistics.cpus_user_time_secs = Some(user as f64 / 1e9);
        statistics.cpus_system_time_secs = Some(system as f64 / 1e9);
        extra.cpus_total_time_secs = Some(cpu.cpu_ns as f64 / 1e9);
    }
    if let Some(cpu) = counted.cpu.filter(|cpu| cpu.runq_wanted) {
        extra.runq_waits = Some(cpu.runq_count);
        extra.runq_total_secs = Some(cpu.runq_total_ns as f64 / 1e9);
        extra.runq_latency_p50_micros = cpu.runq_quantile_micros(0.5);
        extra.runq_latency_p90_micros = cpu.runq_quantile_micros(0.9);
        extra.runq_latency_p99_micros = cpu.runq_quantile_micros(0.99);
        extra.runq_histogram = cpu.runq_slots.to_vec();
    }
    if let Some(pressure) = counted.pressure {
        let secs = |ns: u64| Some(ns as f64 / 1e9);
        extra.cpu_pressure_some_secs = secs(pressure.cpu_some_ns);
        extra.cpu_pressure_full_secs = secs(pressure.cpu_full_ns);
        extra.memory_pressure_some_secs = secs(pressure.memory_some_ns);
        extra.memory_pressure_full_secs = secs(pressure.memory_full_ns);
        extra.io_pressure_some_secs = secs(pressure.io_some_ns);
        extra.io_pressure_full_secs = secs(pressure.io_full_ns);
    }
    if let Some(net) = counted.net {
        statistics.net_tx_bytes = Some(net.tx_bytes);
        statistics.net_tx_packets = Some(net.tx_packets);
        statistics.net_tx_dropped = Some(net.tx_dropped);
        statistics.net_rx_bytes = Some(net.rx_bytes);
        statistics.net_rx_packets = Some(net.rx_packets);
        statistics.net_rx_dropped = Some(net.rx_dropped);
    }
    if let Some(memory) = memory {
        statistics.mem_total_bytes = Some(memory.usage);
        statistics.mem_rss_bytes = Some(memory.rss);
        statistics.mem_anon_bytes = Some(memory.rss);
        statistics.mem_cache_bytes = Some(memory.cache);
        statistics.mem_file_bytes = Some(memory.cache);
    }
    TaskSample {
        framework_id: FrameworkId {
            value: view.key.framework_id.clone(),
        },
        task_id: TaskId {
            value: view.key.task_id.clone(),
        },
        executor_id: Some(ExecutorId {
            value: view.executor_id.clone(),
        }),
        container_id: Some(ContainerId {
            value: view.container_id.clone(),
            parent: None,
        }),
        statistics,
        extra: Some(extra),
    }
}

/// Samples every `interval` on a thread of its own (the reads block), for
/// as long as the agent runs.
pub fn spawn(agent: Agent, interval: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("telemetry".into())
        .spawn(move || {
            let mut memory = MemorySampler::new(CgroupReader::new());
            loop {
                let started = Instant::now();
                let batch = sample(&agent, &mut memory);
                agent.publish(batch);
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stat_is_read_again_when_usage_moves_or_the_split_grows_old() {
        let mib = 1u64 << 20;
        let read = Breakdown {
            rss: 0,
            cache: 0,
            usage: 64 * mib,
            round: 10,
        };
        assert!(!read.stale(64 * mib + mib, 11), "a 1 MiB step of 64 MiB");
        assert!(read.stale(64 * mib + 5 * mib, 11), "more than a sixteenth");
        assert!(read.stale(60 * mib - 1, 11), "down as well as up");
        assert!(!read.stale(64 * mib, 10 + STAT_MAX_AGE - 1));
        assert!(read.stale(64 * mib, 10 + STAT_MAX_AGE), "old enough");
        let small = Breakdown { usage: mib, ..read };
        assert!(!small.stale(mib + mib / 2, 11), "at least 1 MiB");
    }
}
