//! Status updates to the master: each task's updates are checkpointed, then
//! delivered at least once and in order over the link (the shared
//! `UpdateQueue`), until the master acknowledges them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{
    AgentId, FrameworkId, Label, Labels, Task, TaskId, TaskState, TaskStatus, task_status,
};
use butte_api::task_state::is_terminal;
use butte_api::update_queue::{Retry, UpdateQueue, new_uuid, unix_now};
use tokio::sync::mpsc;

use super::Agent;
use super::tasks::TaskKey;
use crate::checkpoint::Checkpoint;

/// The agent's side of the link for status updates (and the channel every
/// other message to the master goes out on).
pub struct StatusStream {
    inner: Mutex<Streams>,
    retry: Retry,
    checkpoint: Arc<Checkpoint>,
}

#[derive(Default)]
struct Streams {
    queues: BTreeMap<TaskKey, UpdateQueue<link::StatusUpdate>>,
    outbound: Option<mpsc::UnboundedSender<link::AgentMessage>>,
}

impl StatusStream {
    /// Resends wait `retry` each time (the agent's `--status-update-retry`).
    pub fn new(retry: Duration, checkpoint: Arc<Checkpoint>) -> Self {
        Self {
            inner: Mutex::new(Streams::default()),
            retry: Retry::fixed(retry),
            checkpoint,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new link to the master; nothing goes out until it registers.
    pub fn connect(&self, outbound: mpsc::UnboundedSender<link::AgentMessage>) {
        self.lock().outbound = Some(outbound);
    }

    pub fn disconnect(&self) {
        self.lock().outbound = None;
    }

    /// The master registered the new link, which has seen none of our
    /// pending updates: every task's oldest goes out now.
    pub fn registered(&self) {
        for queue in self.lock().queues.values_mut() {
            queue.resend_now();
        }
        self.flush();
    }

    /// Sends a message that needs no acknowledgement; false without a link.
    pub fn send(&self, kind: agent_message::Kind) -> bool {
        let streams = self.lock();
        let Some(outbound) = streams.outbound.as_ref() else {
            return false;
        };
        outbound
            .send(link::AgentMessage { kind: Some(kind) })
            .is_ok()
    }

    /// Queues an update; `task` (the task as it is now) is checkpointed
    /// before the update can leave.
    pub fn push(&self, key: &TaskKey, update: link::StatusUpdate, task: Option<&Task>) {
        self.lock()
            .queues
            .entry(key.clone())
            .or_insert_with(|| UpdateQueue::new(self.retry))
            .push(update);
        if let Some(task) = task
            && let Err(error) = self.checkpoint.task(task)
        {
            tracing::error!(%error, task_id = key.task_id, "cannot checkpoint the task");
        }
        self.flush();
    }

    /// Sends each task's oldest unacknowledged update when due.
    pub fn flush(&self) {
        let mut streams = self.lock();
        let Some(outbound) = streams.outbound.clone() else {
            return;
        };
        let now = Instant::now();
        for queue in streams.queues.values_mut() {
            if let Some(update) = queue.due(now) {
                let _ = outbound.send(link::AgentMessage {
                    kind: Some(agent_message::Kind::StatusUpdate(update)),
                });
            }
        }
    }

    /// The master has the update `uuid` of a task. Once a task's terminal
    /// update is acknowledged and nothing is left, its checkpoint goes.
    pub fn acknowledge(&self, key: &TaskKey, uuid: &[u8]) {
        let ended = {
            let mut streams = self.lock();
            let Some(queue) = streams.queues.get_mut(key) else {
                return;
            };
            let Some(acked) = queue.acknowledge(uuid) else {
                return;
            };
            let drained = queue.is_empty();
            if drained {
                streams.queues.remove(key);
            }
            drained && is_terminal(acked.status.state())
        };
        if ended && let Err(error) = self.checkpoint.remove_task(&key.framework_id, &key.task_id) {
            tracing::error!(%error, task_id = key.task_id, "cannot remove the task's checkpoint");
        }
        self.flush();
    }
}

impl Agent {
    pub(super) fn update(
        &self,
        key: &TaskKey,
        state: TaskState,
        message: Option<String>,
        reason: Option<task_status::Reason>,
    ) {
        self.update_with(key, state, message, reason, Vec::new());
    }

    /// A status update; a running task's carries the labels of its GPUs
    /// (which it was given and how they are linked) and `extra_labels`.
    /// One that the task state machine does not allow is dropped.
    pub(super) fn update_with(
        &self,
        key: &TaskKey,
        state: TaskState,
        message: Option<String>,
        reason: Option<task_status::Reason>,
        extra_labels: Vec<Label>,
    ) {
        let mut guard = self.lock();
        let agent_id = guard.agent_id.clone();
        let mut labels = Vec::new();
        let mut task = None;
        if let Some(record) = guard.tasks.get_mut(key) {
            let from = record.state();
            if !record.advance(state) {
                tracing::warn!(%key, ?from, to = ?state, "a status update the task state machine does not allow; dropped");
                return;
            }
            if state == TaskState::TaskRunning
                && let Some(gpus) = &record.gpus
            {
                labels = gpus.labels();
            }
            task = Some(record.to_proto(agent_id.as_deref()));
        }
        drop(guard);
        labels.extend(extra_labels);
        let status = TaskStatus {
            task_id: TaskId {
                value: key.task_id.clone(),
            },
            state: state as i32,
            message,
            source: Some(task_status::Source::Executor as i32),
            reason: reason.map(|r| r as i32),
            agent_id: agent_id.map(|value| AgentId { value }),
            timestamp: Some(unix_now()),
            uuid: Some(new_uuid()),
            labels: (!labels.is_empty()).then_some(Labels { labels }),
            ..Default::default()
        };
        let update = link::StatusUpdate {
            framework_id: FrameworkId {
                value: key.framework_id.clone(),
            },
            status,
        };
        self.status.push(key, update, task.as_ref());
    }
}
