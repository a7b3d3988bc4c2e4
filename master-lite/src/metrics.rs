//! The master's Prometheus text at `GET /metrics`, named by the Prometheus
//! conventions (base units, `_total` counters, states and resources as
//! labels). Mesos's own names stay in `/metrics/snapshot` and GET_METRICS,
//! which frameworks and tools read. README.md lists every series.

use std::collections::BTreeMap;

use butte_api::mesos::v1::TaskState;
use butte_api::resources::Resources;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::master::{Counters, Master};
use crate::operator_api::used_on;

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why the Prometheus text could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A series could not be encoded.
    #[error("failed to encode the master's Prometheus text: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// The Prometheus text (format 0.0.4) of the master's state now.
pub fn prometheus(master: &Master) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register(
        "butte_master_allocation_run_duration_seconds",
        "How long allocation cycles took",
        master.counters.allocation_durations.0.clone(),
    );
    registry.register_collector(Box::new(Figures::read(master)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// How long allocation cycles took (a shared handle: clones observe into
/// the same histogram).
#[derive(Debug, Clone)]
pub struct AllocationDurations(Histogram);

impl Default for AllocationDurations {
    fn default() -> Self {
        // 20 µs to ~0.3 s: a cycle over a few agents takes well under 1 ms.
        Self(Histogram::new(exponential_buckets(20e-6, 2.0, 14)))
    }
}

impl AllocationDurations {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

/// The scalar resources shown: Mesos's name, the unit shown, and the factor
/// from Mesos's unit to it (mem and disk in MiB, bandwidth in Mbit/s).
const RESOURCES: &[(&str, &str, f64)] = &[
    ("cpus", "cores", 1.0),
    ("mem", "bytes", MIB),
    ("disk", "bytes", MIB),
    ("gpus", "devices", 1.0),
    ("network_bandwidth", "bytes_per_second", 1e6 / 8.0),
];

const MIB: f64 = 1024.0 * 1024.0;

/// How many of `TASK_STATES` come before a task ends.
pub(crate) const IN_FLIGHT: usize = 5;
/// Task states always shown, zero when no task is in them: the first
/// `IN_FLIGHT` before a task ends, then the terminal ones.
pub(crate) const TASK_STATES: [TaskState; 11] = [
    TaskState::TaskStaging,
    TaskState::TaskStarting,
    TaskState::TaskRunning,
    TaskState::TaskKilling,
    TaskState::TaskUnreachable,
    TaskState::TaskFinished,
    TaskState::TaskFailed,
    TaskState::TaskKilled,
    TaskState::TaskLost,
    TaskState::TaskError,
    TaskState::TaskDropped,
];

/// The master's figures at one instant, copied out of its state so that the
/// collector owns them.
#[derive(Debug)]
struct Figures {
    start_time: f64,
    /// Agents by link state: connected, disconnected, unreachable.
    agents: BTreeMap<&'static str, u64>,
    /// Frameworks by whether a scheduler is subscribed.
    frameworks: BTreeMap<&'static str, u64>,
    offers_outstanding: u64,
    /// Every task the master holds (active and the completed ones it keeps), by state.
    tasks: BTreeMap<String, u64>,
    /// (resource, unit, registered, used), in the unit shown.
    resources: Vec<(&'static str, &'static str, f64, f64)>,
    counters: Counters,
}

impl Figures {
    fn read(master: &Master) -> Self {
        let mut agents =
            BTreeMap::from([("connected", 0), ("disconnected", 0), ("unreachable", 0)]);
        for agent in master.agents.values() {
            let state = if agent.connected() {
                "connected"
            } else if agent.unreachable() {
                "unreachable"
            } else {
                "disconnected"
            };
            *agents.entry(state).or_default() += 1;
        }
        let mut frameworks = BTreeMap::from([("connected", 0), ("disconnected", 0)]);
        for framework in master.frameworks.values() {
            let state = if framework.connected() {
                "connected"
            } else {
                "disconnected"
            };
            *frameworks.entry(state).or_default() += 1;
        }
        let mut tasks: BTreeMap<String, u64> =
            TASK_STATES.iter().map(|&s| (state_label(s), 0)).collect();
        let held = master.frameworks.values().flat_map(|f| {
            f.tasks
                .values()
                .map(|entry| &entry.task)
                .chain(f.completed_tasks.iter())
        });
        for task in held {
            *tasks.entry(state_label(task.state())).or_default() += 1;
        }
        let total = master.allocator.total();
        let mut used = Resources::new();
        for agent in master.agents.values().filter(|a| !a.unreachable()) {
            used.add(&used_on(master, agent));
        }
        let resources = RESOURCES
            .iter()
            .map(|&(name, unit, factor)| {
                (
                    name,
                    unit,
                    total.scalar(name) * factor,
                    used.scalar(name) * factor,
                )
            })
            .collect();
        Figures {
            start_time: master.start_time,
            agents,
            frameworks,
            offers_outstanding: master.offers.len() as u64,
            tasks,
            resources,
            counters: master.counters.clone(),
        }
    }
}

/// `TASK_RUNNING` → `running`.
fn state_label(state: TaskState) -> String {
    let name = state.as_str_name().to_ascii_lowercase();
    match name.strip_prefix("task_") {
        Some(short) => short.to_owned(),
        None => name,
    }
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_state(&mut encoder)?;
        self.encode_counters(&mut encoder)
    }
}

impl Figures {
    /// The gauges: what the cluster holds now.
    fn encode_state(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(e, "butte_master_elected", "1 when this master leads", 1u64)?;
        gauge(
            e,
            "butte_master_start_time_seconds",
            "When the master started, Unix time",
            self.start_time,
        )?;
        gauges(
            e,
            "butte_master_agents",
            "Agents registered, by link state",
            self.agents
                .iter()
                .map(|(&state, &n)| ([("state", state)], n)),
        )?;
        gauges(
            e,
            "butte_master_frameworks",
            "Frameworks registered, by whether a scheduler is subscribed",
            self.frameworks
                .iter()
                .map(|(&state, &n)| ([("state", state)], n)),
        )?;
        gauges(
            e,
            "butte_master_tasks",
            "Tasks the master holds (active, and the completed ones it keeps), by state",
            self.tasks
                .iter()
                .map(|(state, &n)| ([("state", state.as_str())], n)),
        )?;
        gauge(
            e,
            "butte_master_offers_outstanding",
            "Offers sent and not yet accepted, declined or rescinded",
            self.offers_outstanding,
        )?;
        gauges(
            e,
            "butte_master_resources",
            "Resources the agents registered, in the unit the unit label names",
            self.resources.iter().map(|&(resource, unit, total, _)| {
                ([("resource", resource), ("unit", unit)], total)
            }),
        )?;
        gauges(
            e,
            "butte_master_resources_used",
            "Resources neither free nor offered on reachable agents, in the unit the unit label names",
            self.resources
                .iter()
                .map(|&(resource, unit, _, used)| ([("resource", resource), ("unit", unit)], used)),
        )?;
        gauges(
            e,
            "butte_master_resources_used_ratio",
            "Used over registered, 0 to 1 (0 when none is registered)",
            self.resources.iter().map(|&(resource, _, total, used)| {
                let ratio = if total > 0.0 { used / total } else { 0.0 };
                ([("resource", resource)], ratio)
            }),
        )
    }

    /// The counters: what happened since the master started.
    fn encode_counters(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        for (name, help, value) in [
            (
                "butte_master_offers_sent",
                "Offers sent to frameworks",
                c.offers_sent,
            ),
            (
                "butte_master_offers_declined",
                "Offers declined",
                c.offers_declined,
            ),
            (
                "butte_master_offers_rescinded",
                "Offers rescinded",
                c.offers_rescinded,
            ),
            (
                "butte_master_offers_accepted",
                "Offers accepted",
                c.offers_accepted,
            ),
            (
                "butte_master_tasks_launched",
                "Tasks launched",
                c.tasks_launched,
            ),
            (
                "butte_master_tasks_invalid",
                "Task launches refused as invalid",
                c.tasks_invalid,
            ),
            (
                "butte_master_status_updates",
                "Valid task status updates received",
                c.status_updates,
            ),
            (
                "butte_master_allocation_runs",
                "Allocation cycles run",
                c.allocation_runs,
            ),
            (
                "butte_master_registry_write_errors",
                "Registry writes that failed",
                c.registry_errors,
            ),
        ] {
            // The encoder adds `_total` to a counter's name.
            let metric = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}

/// A series of one sample.
fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// A series of one sample per label set.
fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (L, N)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}
