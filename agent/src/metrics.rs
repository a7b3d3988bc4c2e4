//! The agent's Prometheus text at `GET /metrics`: each task's newest sample
//! and each GPU's newest reading. The figures are absolute readings (eBPF
//! maps, cgroupfs, NVML), so they are encoded as they were read through
//! prometheus-client's collector API, never replayed as increments.
//! README.md lists every series.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use butte_agent_ebpf::accounting::RUNQ_SLOTS;
use butte_api::telemetry::v1::{ExtraStatistics, TaskSample};
use butte_gpu::GpuSample;

use crate::gpus::GpuBooks;

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why the Prometheus text could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A series could not be encoded.
    #[error("failed to encode the agent's Prometheus text: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// What one scrape shows, copied out of the agent's state so that the
/// encoding runs without its lock.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Each task's newest sample.
    pub tasks: Vec<TaskSample>,
    /// Every GPU, when the agent has a GPU backend.
    pub gpus: Option<Vec<GpuReading>>,
    /// How long containers took from clone to exec.
    pub container_starts: ContainerStarts,
}

/// Clone-to-exec times of the containers this agent started (a shared
/// handle: clones observe into the same histogram).
#[derive(Debug, Clone)]
pub struct ContainerStarts(Histogram);

impl Default for ContainerStarts {
    fn default() -> Self {
        // 50 µs to ~0.4 s: a launch on this kind of host takes about 1 ms.
        Self(Histogram::new(exponential_buckets(50e-6, 2.0, 14)))
    }
}

impl ContainerStarts {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

/// One GPU: who it is, its newest reading, and whether it was withdrawn.
#[derive(Debug, Clone)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    /// None until the backend has been read once.
    pub sample: Option<GpuSample>,
    pub faulty: bool,
}

impl GpuReading {
    /// Every GPU in the inventory with its newest reading.
    pub fn all(books: &GpuBooks) -> Vec<GpuReading> {
        books
            .inventory()
            .gpus
            .iter()
            .map(|gpu| GpuReading {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                model: gpu.model.clone(),
                sample: books.samples.iter().find(|s| s.index == gpu.index).cloned(),
                faulty: books.faulty().contains_key(&gpu.index),
            })
            .collect()
    }
}

/// The Prometheus text (format 0.0.4) of one scrape.
pub fn encode(scrape: Scrape) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register(
        "butte_agent_container_start_duration_seconds",
        "Time from clone to exec of the containers this agent started",
        scrape.container_starts.0,
    );
    registry.register_collector(Box::new(TaskSeries(scrape.tasks)));
    if let Some(gpus) = scrape.gpus {
        registry.register_collector(Box::new(GpuSeries(gpus)));
    }
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// How a series reads its value out of a task's sample.
type Read = fn(&TaskSample) -> Option<Value>;

/// Per-task series, one per task labelled with its framework, executor and
/// task ids. Names are without `_total`: the encoder adds it to counters.
const TASK_SERIES: &[(&str, MetricType, &str, Read)] = &[
    (
        "butte_task_cpu_seconds",
        MetricType::Counter,
        "CPU time, from the kernel's rstat books (else the scheduler's runtime counter, eBPF)",
        |s| extra(s).cpus_total_time_secs.map(Value::Real),
    ),
    (
        "butte_task_cpu_user_seconds",
        MetricType::Counter,
        "CPU time in user mode",
        |s| s.statistics.cpus_user_time_secs.map(Value::Real),
    ),
    (
        "butte_task_cpu_system_seconds",
        MetricType::Counter,
        "CPU time in the kernel",
        |s| s.statistics.cpus_system_time_secs.map(Value::Real),
    ),
    (
        "butte_task_cpu_limit_cores",
        MetricType::Gauge,
        "CPUs the task was given (Mesos cpus)",
        |s| s.statistics.cpus_limit.map(Value::Real),
    ),
    (
        "butte_task_memory_usage_bytes",
        MetricType::Gauge,
        "Memory charged to the task's cgroup",
        |s| s.statistics.mem_total_bytes.map(Value::Whole),
    ),
    (
        "butte_task_memory_rss_bytes",
        MetricType::Gauge,
        "Resident anonymous memory",
        |s| s.statistics.mem_rss_bytes.map(Value::Whole),
    ),
    (
        "butte_task_memory_cache_bytes",
        MetricType::Gauge,
        "Page cache",
        |s| s.statistics.mem_cache_bytes.map(Value::Whole),
    ),
    (
        "butte_task_memory_limit_bytes",
        MetricType::Gauge,
        "Memory limit",
        |s| s.statistics.mem_limit_bytes.map(Value::Whole),
    ),
    (
        "butte_task_disk_used_bytes",
        MetricType::Gauge,
        "Bytes its sandbox holds (the project quota's count, else measured as du does, every --disk-watch-interval)",
        |s| s.statistics.disk_used_bytes.map(Value::Whole),
    ),
    (
        "butte_task_disk_limit_bytes",
        MetricType::Gauge,
        "Its sandbox's limit (Mesos disk)",
        |s| s.statistics.disk_limit_bytes.map(Value::Whole),
    ),
    (
        "butte_task_network_transmit_bytes",
        MetricType::Counter,
        "Bytes sent (IP packets, eBPF)",
        |s| s.statistics.net_tx_bytes.map(Value::Whole),
    ),
    (
        "butte_task_network_receive_bytes",
        MetricType::Counter,
        "Bytes received (IP packets, eBPF)",
        |s| s.statistics.net_rx_bytes.map(Value::Whole),
    ),
    (
        "butte_task_network_transmit_packets",
        MetricType::Counter,
        "Packets sent",
        |s| s.statistics.net_tx_packets.map(Value::Whole),
    ),
    (
        "butte_task_network_receive_packets",
        MetricType::Counter,
        "Packets received",
        |s| s.statistics.net_rx_packets.map(Value::Whole),
    ),
    (
        "butte_task_network_transmit_dropped",
        MetricType::Counter,
        "Packets dropped by the bandwidth limit",
        |s| s.statistics.net_tx_dropped.map(Value::Whole),
    ),
    (
        "butte_task_network_receive_dropped",
        MetricType::Counter,
        "Packets dropped by ingress policing",
        |s| s.statistics.net_rx_dropped.map(Value::Whole),
    ),
    (
        "butte_task_network_bandwidth_limit_bytes_per_second",
        MetricType::Gauge,
        "Egress bandwidth limit (network_bandwidth, given in Mbit/s)",
        |s| {
            extra(s)
                .network_bandwidth_limit
                .map(|mbits| Value::Real(mbits * 1e6 / 8.0))
        },
    ),
    (
        "butte_task_denied_binds",
        MetricType::Counter,
        "Binds refused by the port fence",
        |s| extra(s).denied_binds.map(Value::Whole),
    ),
    (
        "butte_task_denied_device_opens",
        MetricType::Counter,
        "Device opens refused by the device fence",
        |s| extra(s).denied_device_opens.map(Value::Whole),
    ),
    (
        "butte_task_gpu_memory_used_bytes",
        MetricType::Gauge,
        "GPU memory its processes use (NVML per-process figures)",
        |s| extra(s).gpu_memory_used_bytes.map(Value::Whole),
    ),
    (
        "butte_task_gpu_utilization_ratio",
        MetricType::Gauge,
        "GPU utilisation of its processes summed over its GPUs (1 is one GPU fully busy)",
        |s| {
            extra(s)
                .gpu_utilization_percent
                .map(|p| Value::Real(p / 100.0))
        },
    ),
    (
        "butte_task_cpu_pressure_some_seconds",
        MetricType::Counter,
        "Time some of its runnable tasks waited for CPU (PSI cpu.pressure some total)",
        |s| extra(s).cpu_pressure_some_secs.map(Value::Real),
    ),
    (
        "butte_task_cpu_pressure_full_seconds",
        MetricType::Counter,
        "Time all of its runnable tasks waited for CPU (PSI, where the kernel keeps it)",
        |s| extra(s).cpu_pressure_full_secs.map(Value::Real),
    ),
    (
        "butte_task_memory_pressure_some_seconds",
        MetricType::Counter,
        "Time some of its tasks stalled on memory (PSI memory.pressure some total)",
        |s| extra(s).memory_pressure_some_secs.map(Value::Real),
    ),
    (
        "butte_task_memory_pressure_full_seconds",
        MetricType::Counter,
        "Time all of its tasks stalled on memory (PSI)",
        |s| extra(s).memory_pressure_full_secs.map(Value::Real),
    ),
    (
        "butte_task_io_pressure_some_seconds",
        MetricType::Counter,
        "Time some of its tasks stalled on I/O (PSI io.pressure some total)",
        |s| extra(s).io_pressure_some_secs.map(Value::Real),
    ),
    (
        "butte_task_io_pressure_full_seconds",
        MetricType::Counter,
        "Time all of its tasks stalled on I/O (PSI)",
        |s| extra(s).io_pressure_full_secs.map(Value::Real),
    ),
    (
        "butte_task_execs",
        MetricType::Counter,
        "Programs executed",
        |s| extra(s).execs.map(Value::Whole),
    ),
    (
        "butte_task_oom_kills",
        MetricType::Counter,
        "Processes ended by the OOM killer",
        |s| extra(s).oom_kills.map(Value::Whole),
    ),
];

const RUNQ_LATENCY: &str = "butte_task_runqueue_latency_seconds";

#[derive(Debug)]
struct TaskSeries(Vec<TaskSample>);

impl Collector for TaskSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for &(name, kind, help, read) in TASK_SERIES {
            let rows = self
                .0
                .iter()
                .filter_map(|sample| Some((task_labels(sample), read(sample)?)));
            family(&mut encoder, name, help, kind, rows)?;
        }
        let mut metric = encoder.encode_descriptor(
            RUNQ_LATENCY,
            "Run-queue wait, wakeup or preemption to switch-in (eBPF)",
            None,
            MetricType::Histogram,
        )?;
        for sample in &self.0 {
            let extra = extra(sample);
            if extra.runq_histogram.len() != RUNQ_SLOTS {
                continue;
            }
            // Slot i counts waits of [2^i, 2^(i+1)) µs.
            let buckets: Vec<(f64, u64)> = extra
                .runq_histogram
                .iter()
                .enumerate()
                .map(|(slot, &count)| ((1u64 << (slot + 1)) as f64 / 1e6, count))
                .collect();
            let count = extra.runq_histogram.iter().sum();
            let labels = task_labels(sample);
            metric
                .encode_family(&labels)?
                .encode_histogram::<[(&str, &str); 0]>(
                    extra.runq_total_secs.unwrap_or(0.0),
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

fn task_labels(sample: &TaskSample) -> [(&'static str, &str); 3] {
    [
        ("framework_id", sample.framework_id.value.as_str()),
        (
            "executor_id",
            sample.executor_id.as_ref().map_or("", |e| e.value.as_str()),
        ),
        ("task_id", sample.task_id.value.as_str()),
    ]
}

fn extra(sample: &TaskSample) -> &ExtraStatistics {
    static EMPTY: std::sync::LazyLock<ExtraStatistics> = std::sync::LazyLock::new(Default::default);
    sample.extra.as_ref().unwrap_or(&EMPTY)
}

/// How a series reads its value out of a GPU's reading.
type ReadGpu = fn(&GpuSample) -> Value;

const GPU_SERIES: &[(&str, MetricType, &str, ReadGpu)] = &[
    (
        "butte_gpu_utilization_ratio",
        MetricType::Gauge,
        "GPU utilisation (NVML), 0 to 1",
        |s| Value::Real(s.utilization_percent / 100.0),
    ),
    (
        "butte_gpu_memory_used_bytes",
        MetricType::Gauge,
        "GPU memory in use",
        |s| Value::Whole(s.memory_used_mib << 20),
    ),
    (
        "butte_gpu_power_watts",
        MetricType::Gauge,
        "Power draw",
        |s| Value::Real(s.power_watts),
    ),
    (
        "butte_gpu_temperature_celsius",
        MetricType::Gauge,
        "Temperature",
        |s| Value::Real(s.temperature_c),
    ),
    (
        "butte_gpu_ecc_uncorrectable_errors",
        MetricType::Counter,
        "Uncorrectable ECC errors since the driver loaded",
        |s| Value::Whole(s.ecc_uncorrectable),
    ),
];

#[derive(Debug)]
struct GpuSeries(Vec<GpuReading>);

impl Collector for GpuSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for &(name, kind, help, read) in GPU_SERIES {
            let rows = self
                .0
                .iter()
                .filter_map(|gpu| Some((gpu_labels(gpu), read(gpu.sample.as_ref()?))));
            family(&mut encoder, name, help, kind, rows)?;
        }
        let rows = self
            .0
            .iter()
            .map(|gpu| (gpu_labels(gpu), Value::Whole(u64::from(gpu.faulty))));
        family(
            &mut encoder,
            "butte_gpu_faulty",
            "1 when the GPU reported uncorrectable ECC or critical XID errors and was withdrawn",
            MetricType::Gauge,
            rows,
        )
    }
}

fn gpu_labels(gpu: &GpuReading) -> [(&'static str, String); 3] {
    [
        ("gpu", gpu.index.to_string()),
        ("uuid", gpu.uuid.clone()),
        ("model", gpu.model.clone()),
    ]
}

/// One series: its HELP and TYPE, then a sample per label set.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl Iterator<Item = (L, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let encoder = metric.encode_family(&labels)?;
        match (kind, value) {
            (MetricType::Counter, Value::Whole(v)) => ConstCounter::new(v).encode(encoder)?,
            (MetricType::Counter, Value::Real(v)) => ConstCounter::new(v).encode(encoder)?,
            (_, Value::Whole(v)) => ConstGauge::new(v).encode(encoder)?,
            (_, Value::Real(v)) => ConstGauge::new(v).encode(encoder)?,
        }
    }
    Ok(())
}

/// A reading as it was taken: a count stays whole in the text.
#[derive(Debug, Clone, Copy)]
enum Value {
    Whole(u64),
    Real(f64),
}

#[cfg(test)]
mod tests {
    use butte_api::mesos::v1::{ExecutorId, FrameworkId, ResourceStatistics, TaskId};

    use super::*;

    fn encoded(scrape: Scrape) -> String {
        match encode(scrape) {
            Ok(text) => text,
            Err(error) => panic!("{error}"),
        }
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
                network_bandwidth_limit: Some(8.0),
                gpu_utilization_percent: Some(150.0),
                runq_histogram: histogram,
                runq_total_secs: Some(0.25),
                ..Default::default()
            }),
        };
        let container_starts = ContainerStarts::default();
        container_starts.observe(0.000_9);
        container_starts.clone().observe(0.003);
        let text = encoded(Scrape {
            tasks: vec![sample],
            gpus: None,
            container_starts,
        });
        let labels = r#"framework_id="fw",executor_id="t\"1",task_id="t\"1""#;
        for line in [
            "# HELP butte_task_cpu_seconds_total CPU time, from the kernel's rstat books (else the scheduler's runtime counter, eBPF)"
                .to_owned(),
            "# TYPE butte_task_cpu_seconds_total counter".to_owned(),
            format!("butte_task_cpu_seconds_total{{{labels}}} 1.5"),
            format!("butte_task_network_transmit_bytes_total{{{labels}}} 1234"),
            format!("butte_task_network_bandwidth_limit_bytes_per_second{{{labels}}} 1000000.0"),
            format!("butte_task_gpu_utilization_ratio{{{labels}}} 1.5"),
            "# TYPE butte_task_runqueue_latency_seconds histogram".to_owned(),
            format!("butte_task_runqueue_latency_seconds_bucket{{{labels},le=\"2e-06\"}} 3"),
            format!("butte_task_runqueue_latency_seconds_bucket{{{labels},le=\"8e-06\"}} 4"),
            format!("butte_task_runqueue_latency_seconds_bucket{{{labels},le=\"+Inf\"}} 4"),
            format!("butte_task_runqueue_latency_seconds_sum{{{labels}}} 0.25"),
            format!("butte_task_runqueue_latency_seconds_count{{{labels}}} 4"),
            "# TYPE butte_agent_container_start_duration_seconds histogram".to_owned(),
            "butte_agent_container_start_duration_seconds_bucket{le=\"0.0016\"} 1".to_owned(),
            "butte_agent_container_start_duration_seconds_count 2".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE butte_task_memory_rss_bytes gauge")
                && !text.contains("butte_task_memory_rss_bytes{"),
            "absent figures are left out, their HELP and TYPE stay:\n{text}"
        );
        assert!(
            !text.contains("butte_gpu_"),
            "no GPU backend, no GPU series"
        );
    }

    #[test]
    fn every_gpu_says_whether_it_is_faulty_and_read_ones_report_their_figures() {
        let reading = |index: u32, faulty: bool, sample: Option<GpuSample>| GpuReading {
            index,
            uuid: format!("GPU-{index}"),
            model: "NVIDIA \"H200\"".into(),
            sample,
            faulty,
        };
        let text = encoded(Scrape {
            tasks: Vec::new(),
            container_starts: ContainerStarts::default(),
            gpus: Some(vec![
                reading(
                    0,
                    false,
                    Some(GpuSample {
                        index: 0,
                        utilization_percent: 40.0,
                        memory_used_mib: 512,
                        ecc_uncorrectable: 0,
                        ..Default::default()
                    }),
                ),
                reading(3, true, None),
            ]),
        });
        let labels =
            |index: u32| format!(r#"gpu="{index}",uuid="GPU-{index}",model="NVIDIA \"H200\"""#);
        for line in [
            format!("butte_gpu_utilization_ratio{{{}}} 0.4", labels(0)),
            format!("butte_gpu_memory_used_bytes{{{}}} 536870912", labels(0)),
            format!(
                "butte_gpu_ecc_uncorrectable_errors_total{{{}}} 0",
                labels(0)
            ),
            "# TYPE butte_gpu_ecc_uncorrectable_errors_total counter".to_owned(),
            format!("butte_gpu_faulty{{{}}} 0", labels(0)),
            format!("butte_gpu_faulty{{{}}} 1", labels(3)),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(
            !text.contains(&format!("butte_gpu_utilization_ratio{{{}}}", labels(3))),
            "a GPU not yet read has no figures:\n{text}"
        );
    }
}
