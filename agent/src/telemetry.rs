//! The telemetry collector. Every interval: what the eBPF programs counted
//! per container (CPU, run queue, network, denials, events) and its memory
//! from cgroupfs (all containers' files in one io_uring submission), as
//! Mesos's ResourceStatistics plus our additions; kept as each task's newest
//! sample (GET_CONTAINERS, /metrics) and streamed to the master.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::time::{Duration, Instant};

use butte_agent_ebpf::accounting::{RUNQ_SLOTS, TaskStats};
use butte_agent_ebpf::network::NetStats;
use butte_api::mesos::v1::{ContainerId, ExecutorId, FrameworkId, ResourceStatistics, TaskId};
use butte_api::telemetry::v1::{ExtraStatistics, TaskSample, TelemetryBatch};
use butte_isolators::cgroups::{Isolator, MemoryFiles, counter};

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

    /// The memory of each container (those whose files cannot be read are
    /// left out): every usage file in one go, then the stat files that are
    /// due in a second.
    pub fn read<'a>(
        &mut self,
        isolator: &dyn Isolator,
        containers: &[&'a str],
    ) -> HashMap<&'a str, Memory> {
        let wanted: HashSet<&str> = containers.iter().copied().collect();
        self.open.retain(|id, _| wanted.contains(id.as_str()));
        for &id in containers {
            if !self.open.contains_key(id) {
                let files = isolator.memory_files(id);
                if let (Ok(usage), Ok(stat)) = (File::open(&files.usage), File::open(&files.stat)) {
                    let open = OpenMemory {
                        files,
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
        let files: Vec<&File> = ids.iter().map(|id| &self.open[*id].usage).collect();
        let usages: Vec<Option<u64>> = self
            .reader
            .read_all(&files, NUMBER_READ_SIZE)
            .into_iter()
            .map(|r| {
                r.ok()
                    .and_then(|b| std::str::from_utf8(b).ok()?.trim().parse().ok())
            })
            .collect();
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
    net: Option<NetStats>,
    denied_binds: u64,
    denied_opens: u64,
}

/// One sampling round over every running task.
pub fn sample(agent: &Agent, memory_sampler: &mut MemorySampler) -> TelemetryBatch {
    let views = agent.task_views();
    let containers: BTreeSet<&str> = views.iter().map(|v| v.container_id.as_str()).collect();
    let containers: Vec<&str> = containers.into_iter().collect();
    let memory = memory_sampler.read(agent.isolator(), &containers);
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
    {
        let mut fences = agent.fences();
        if let Some(accounting) = fences.accounting.as_mut()
            && let Err(error) = accounting.flush()
        {
            tracing::warn!(%error, "cannot flush CPU time; every task's CPU figure holds still until a flush succeeds");
        }
        // Each map read whole in a few syscalls, not one lookup per task.
        let cpu = fences.accounting.as_mut().map(|a| a.all_stats());
        let net = fences.network.as_ref().map(|n| n.all_stats());
        let binds = fences.ports.as_ref().map(|p| p.all_denied());
        let opens = fences.devices.as_ref().map(|d| d.all_denied());
        let (mut cpu, mut net) = (whole(cpu), whole(net));
        let (binds, opens) = (whole(binds), whole(opens));
        for view in &views {
            let key = view.cgroup_key;
            counted.entry(key).or_insert_with(|| Counted {
                cpu: cpu.remove(&key),
                net: net.remove(&key),
                denied_binds: binds.get(&key).copied().unwrap_or(0),
                denied_opens: opens.get(&key).copied().unwrap_or(0),
            });
        }
    }
    let timestamp = crate::unix_now();
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

/// A map read whole, or empty when its program is not loaded or the read failed.
fn whole<V>(
    read: Option<Result<HashMap<u64, V>, butte_agent_ebpf::FenceError>>,
) -> HashMap<u64, V> {
    match read {
        Some(Ok(entries)) => entries,
        Some(Err(error)) => {
            tracing::debug!(%error, "cannot read per-task counts this round");
            HashMap::new()
        }
        None => HashMap::new(),
    }
}

fn task_sample(
    view: &TaskView,
    timestamp: f64,
    counted: &Counted,
    memory: Option<Memory>,
    events: EventCounts,
) -> TaskSample {
    let bandwidth = view.resources.scalar("network_bandwidth");
    let mut statistics = ResourceStatistics {
        timestamp,
        cpus_limit: Some(view.resources.scalar("cpus")),
        mem_limit_bytes: Some((view.resources.scalar("mem") * MIB) as u64),
        net_tx_rate_limit: (bandwidth > 0.0).then_some((bandwidth * 1e6 / 8.0) as u64),
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
        extra.runq_waits = Some(cpu.runq_count);
        extra.runq_total_secs = Some(cpu.runq_total_ns as f64 / 1e9);
        extra.runq_latency_p50_micros = cpu.runq_quantile_micros(0.5);
        extra.runq_latency_p90_micros = cpu.runq_quantile_micros(0.9);
        extra.runq_latency_p99_micros = cpu.runq_quantile_micros(0.99);
        extra.runq_histogram = cpu.runq_slots.to_vec();
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
            value: view.key.0.clone(),
        },
        task_id: TaskId {
            value: view.key.1.clone(),
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

/// Prometheus text for the newest samples: one series per task, labelled
/// with its framework, executor and task ids.
pub fn prometheus(samples: &[TaskSample]) -> String {
    let mut out = String::new();
    type Read = fn(&TaskSample) -> Option<f64>;
    let series: &[(&str, &str, &str, Read)] = &[
        (
            "butte_task_cpu_seconds_total",
            "counter",
            "CPU time (scheduler runtime, eBPF)",
            |s| extra(s).cpus_total_time_secs,
        ),
        (
            "butte_task_cpu_user_seconds_total",
            "counter",
            "CPU time in user mode",
            |s| s.statistics.cpus_user_time_secs,
        ),
        (
            "butte_task_cpu_system_seconds_total",
            "counter",
            "CPU time in the kernel",
            |s| s.statistics.cpus_system_time_secs,
        ),
        (
            "butte_task_cpu_limit",
            "gauge",
            "CPUs the task was given",
            |s| s.statistics.cpus_limit,
        ),
        (
            "butte_task_memory_usage_bytes",
            "gauge",
            "Memory charged to the task's cgroup",
            |s| s.statistics.mem_total_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_memory_rss_bytes",
            "gauge",
            "Resident anonymous memory",
            |s| s.statistics.mem_rss_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_memory_cache_bytes",
            "gauge",
            "Page cache",
            |s| s.statistics.mem_cache_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_memory_limit_bytes",
            "gauge",
            "Memory limit",
            |s| s.statistics.mem_limit_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_network_transmit_bytes_total",
            "counter",
            "Bytes sent (IP packets, eBPF)",
            |s| s.statistics.net_tx_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_network_receive_bytes_total",
            "counter",
            "Bytes received",
            |s| s.statistics.net_rx_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_network_transmit_packets_total",
            "counter",
            "Packets sent",
            |s| s.statistics.net_tx_packets.map(|v| v as f64),
        ),
        (
            "butte_task_network_receive_packets_total",
            "counter",
            "Packets received",
            |s| s.statistics.net_rx_packets.map(|v| v as f64),
        ),
        (
            "butte_task_network_transmit_dropped_total",
            "counter",
            "Packets dropped by the bandwidth limit",
            |s| s.statistics.net_tx_dropped.map(|v| v as f64),
        ),
        (
            "butte_task_network_receive_dropped_total",
            "counter",
            "Packets dropped by ingress policing",
            |s| s.statistics.net_rx_dropped.map(|v| v as f64),
        ),
        (
            "butte_task_network_bandwidth_limit_mbits",
            "gauge",
            "Egress limit, Mbit/s",
            |s| extra(s).network_bandwidth_limit,
        ),
        (
            "butte_task_denied_binds_total",
            "counter",
            "Binds refused by the port fence",
            |s| extra(s).denied_binds.map(|v| v as f64),
        ),
        (
            "butte_task_denied_device_opens_total",
            "counter",
            "Device opens refused by the device fence",
            |s| extra(s).denied_device_opens.map(|v| v as f64),
        ),
        (
            "butte_task_gpu_memory_used_bytes",
            "gauge",
            "GPU memory its processes use (NVML per-process figures)",
            |s| extra(s).gpu_memory_used_bytes.map(|v| v as f64),
        ),
        (
            "butte_task_gpu_utilization_percent",
            "gauge",
            "GPU utilisation of its processes, summed over its GPUs",
            |s| extra(s).gpu_utilization_percent,
        ),
        (
            "butte_task_execs_total",
            "counter",
            "Programs executed",
            |s| extra(s).execs.map(|v| v as f64),
        ),
        (
            "butte_task_oom_kills_total",
            "counter",
            "Processes ended by the OOM killer",
            |s| extra(s).oom_kills.map(|v| v as f64),
        ),
    ];
    for (name, kind, help, read) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for sample in samples {
            if let Some(value) = read(sample) {
                let _ = writeln!(out, "{name}{{{}}} {value}", labels(sample));
            }
        }
    }
    let name = "butte_task_runqueue_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Run-queue wait, wakeup or preemption to switch-in (eBPF)\n# TYPE {name} histogram"
    );
    for sample in samples {
        let extra = extra(sample);
        if extra.runq_histogram.len() != RUNQ_SLOTS {
            continue;
        }
        let labels = labels(sample);
        let mut cumulative = 0;
        for (slot, count) in extra.runq_histogram.iter().enumerate() {
            cumulative += count;
            let le = (1u64 << (slot + 1)) as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            extra.runq_total_secs.unwrap_or(0.0)
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
    out
}

fn extra(sample: &TaskSample) -> &ExtraStatistics {
    static EMPTY: std::sync::LazyLock<ExtraStatistics> = std::sync::LazyLock::new(Default::default);
    sample.extra.as_ref().unwrap_or(&EMPTY)
}

fn labels(sample: &TaskSample) -> String {
    format!(
        "framework_id=\"{}\",executor_id=\"{}\",task_id=\"{}\"",
        escape(&sample.framework_id.value),
        escape(sample.executor_id.as_ref().map_or("", |e| e.value.as_str())),
        escape(&sample.task_id.value)
    )
}

/// Label values escaped as the Prometheus text format asks.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

    #[test]
    fn prometheus_text_labels_each_task_and_builds_a_cumulative_histogram() {
        let mut histogram = vec![0; RUNQ_SLOTS];
        histogram[0] = 3;
        histogram[2] = 1;
        let sample = TaskSample {
            framework_id: FrameworkId { value: "fw".into() },
            task_id: TaskId {
                value: "t\"1".into(),
            },
            executor_id: Some(ExecutorId {
                value: "t\"1".into(),
            }),
            container_id: None,
            statistics: ResourceStatistics {
                net_tx_bytes: Some(1234),
                ..Default::default()
            },
            extra: Some(ExtraStatistics {
                cpus_total_time_secs: Some(1.5),
                runq_histogram: histogram,
                runq_total_secs: Some(0.25),
                ..Default::default()
            }),
        };
        let text = prometheus(&[sample]);
        let labels = r#"framework_id="fw",executor_id="t\"1",task_id="t\"1""#;
        assert!(
            text.contains(&format!("butte_task_cpu_seconds_total{{{labels}}} 1.5")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "butte_task_network_transmit_bytes_total{{{labels}}} 1234"
        )));
        assert!(text.contains(&format!(
            "butte_task_runqueue_latency_seconds_bucket{{{labels},le=\"0.000002\"}} 3"
        )));
        assert!(text.contains(&format!(
            "butte_task_runqueue_latency_seconds_bucket{{{labels},le=\"0.000008\"}} 4"
        )));
        assert!(text.contains(&format!(
            "butte_task_runqueue_latency_seconds_count{{{labels}}} 4"
        )));
        assert!(
            !text.contains("butte_task_memory_rss_bytes{"),
            "absent figures are left out"
        );
    }
}
