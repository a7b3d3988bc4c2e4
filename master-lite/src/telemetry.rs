//! Per-task telemetry from the agents: a short history per task (what the
//! web UI and `butte top` draw), the newest figures for GET_METRICS, and a
//! live stream of every batch as it arrives.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use butte_api::telemetry::v1::{TaskSample, TelemetryBatch};
use tokio::sync::broadcast;

/// Samples kept per task: five minutes at the default 1 s interval.
pub const HISTORY: usize = 300;
/// A task whose agent has sent nothing for it this long is forgotten.
const RETENTION_SECS: f64 = 600.0;

pub struct TelemetryStore {
    history: HashMap<(String, String), VecDeque<TaskSample>>,
    /// Each batch as one JSON line, for the stream's subscribers.
    stream: broadcast::Sender<Arc<str>>,
}

impl Default for TelemetryStore {
    fn default() -> Self {
        Self {
            history: HashMap::new(),
            stream: broadcast::channel(64).0,
        }
    }
}

impl TelemetryStore {
    /// Keeps an agent's batch and hands it to the stream.
    pub fn record(&mut self, agent_id: &str, batch: TelemetryBatch) {
        for sample in &batch.samples {
            let key = (
                sample.framework_id.value.clone(),
                sample.task_id.value.clone(),
            );
            let history = self.history.entry(key).or_default();
            if history.len() >= HISTORY {
                history.pop_front();
            }
            history.push_back(sample.clone());
        }
        let cutoff = batch.timestamp - RETENTION_SECS;
        self.history
            .retain(|_, h| h.back().is_some_and(|s| s.statistics.timestamp >= cutoff));
        if self.stream.receiver_count() > 0
            && let Ok(batch) = butte_api::json::to_value(&batch)
        {
            let line = serde_json::json!({"agent_id": agent_id, "batch": batch}).to_string();
            let _ = self.stream.send(Arc::from(line));
        }
    }

    /// A task's samples, oldest first.
    pub fn history(&self, framework_id: &str, task_id: &str) -> Option<&VecDeque<TaskSample>> {
        self.history
            .get(&(framework_id.to_owned(), task_id.to_owned()))
    }

    /// Every task's newest sample, by (framework id, task id).
    pub fn latest(&self) -> BTreeMap<(&str, &str), &TaskSample> {
        self.history
            .iter()
            .filter_map(|((f, t), h)| Some(((f.as_str(), t.as_str()), h.back()?)))
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.stream.subscribe()
    }

    /// The newest figures of each task as `butte/tasks/<framework>/<task>/<figure>` metrics.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut metrics = BTreeMap::new();
        for ((framework_id, task_id), sample) in self.latest() {
            let prefix = format!("butte/tasks/{framework_id}/{task_id}");
            let s = &sample.statistics;
            let extra = sample.extra.clone().unwrap_or_default();
            let figures = [
                ("cpus_user_time_secs", s.cpus_user_time_secs),
                ("cpus_system_time_secs", s.cpus_system_time_secs),
                ("cpus_total_time_secs", extra.cpus_total_time_secs),
                ("cpus_limit", s.cpus_limit),
                ("mem_total_bytes", s.mem_total_bytes.map(|v| v as f64)),
                ("mem_rss_bytes", s.mem_rss_bytes.map(|v| v as f64)),
                ("mem_limit_bytes", s.mem_limit_bytes.map(|v| v as f64)),
                ("net_tx_bytes", s.net_tx_bytes.map(|v| v as f64)),
                ("net_rx_bytes", s.net_rx_bytes.map(|v| v as f64)),
                ("net_tx_packets", s.net_tx_packets.map(|v| v as f64)),
                ("net_rx_packets", s.net_rx_packets.map(|v| v as f64)),
                ("net_tx_dropped", s.net_tx_dropped.map(|v| v as f64)),
                (
                    "runq_latency_p50_micros",
                    extra.runq_latency_p50_micros.map(|v| v as f64),
                ),
                (
                    "runq_latency_p99_micros",
                    extra.runq_latency_p99_micros.map(|v| v as f64),
                ),
                ("denied_binds", extra.denied_binds.map(|v| v as f64)),
                (
                    "denied_device_opens",
                    extra.denied_device_opens.map(|v| v as f64),
                ),
                ("oom_kills", extra.oom_kills.map(|v| v as f64)),
                ("cpu_pressure_some_secs", extra.cpu_pressure_some_secs),
                ("cpu_pressure_full_secs", extra.cpu_pressure_full_secs),
                ("memory_pressure_some_secs", extra.memory_pressure_some_secs),
                ("memory_pressure_full_secs", extra.memory_pressure_full_secs),
                ("io_pressure_some_secs", extra.io_pressure_some_secs),
                ("io_pressure_full_secs", extra.io_pressure_full_secs),
            ];
            for (name, value) in figures {
                if let Some(value) = value {
                    metrics.insert(format!("{prefix}/{name}"), value);
                }
            }
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use butte_api::mesos::v1::{FrameworkId, ResourceStatistics, TaskId};

    fn sample(task: &str, timestamp: f64, tx: u64) -> TaskSample {
        TaskSample {
            framework_id: FrameworkId { value: "fw".into() },
            task_id: TaskId { value: task.into() },
            statistics: ResourceStatistics {
                timestamp,
                net_tx_bytes: Some(tx),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn history_is_bounded_newest_wins_and_silent_tasks_age_out() {
        let mut store = TelemetryStore::default();
        let mut subscribed = None;
        for i in 0..(HISTORY as u64 + 5) {
            if i == HISTORY as u64 + 4 {
                subscribed = Some(store.subscribe());
            }
            store.record(
                "agent",
                TelemetryBatch {
                    timestamp: i as f64,
                    samples: vec![sample("a", i as f64, i)],
                },
            );
        }
        let history = store.history("fw", "a").unwrap();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.front().unwrap().statistics.net_tx_bytes, Some(5));
        assert_eq!(
            store.metrics()["butte/tasks/fw/a/net_tx_bytes"],
            (HISTORY + 4) as f64
        );
        let line = subscribed.unwrap().try_recv().unwrap();
        assert!(line.contains("\"agent_id\":\"agent\""), "{line}");
        // Task b reports much later; a has been silent past the retention.
        store.record(
            "agent",
            TelemetryBatch {
                timestamp: 10_000.0,
                samples: vec![sample("b", 10_000.0, 1)],
            },
        );
        assert!(store.history("fw", "a").is_none());
        assert!(store.history("fw", "b").is_some());
    }
}
