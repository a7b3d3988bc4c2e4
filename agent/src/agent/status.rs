//! Status updates to the master: each task's updates are checkpointed, then
//! delivered at least once and in order over the link (the shared
//! `UpdateQueue`), until the master acknowledges them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{
    AgentId, FrameworkId, Label, Labels, Task, TaskId, TaskState, TaskStatus, task_status,
};
use butte_api::task_state::is_terminal;
use butte_api::update_queue::{Retry, UpdateQueue, new_uuid, unix_now};
use tokio::sync::mpsc;

use super::tasks::TaskKey;
use super::{Agent, AgentState};
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
    /// Per task with a checkpoint: writes and the final removal take its
    /// lock, and a write after the removal (true) is skipped, so a slow
    /// write never brings back the checkpoint of a task that has ended.
    checkpoints: HashMap<TaskKey, Arc<Mutex<bool>>>,
    outbound: Option<mpsc::UnboundedSender<link::AgentMessage>>,
}

/// A queued update's checkpoint, written once the agent's lock is released.
#[must_use = "write() checkpoints the task and sends the update"]
pub struct Queued<'a> {
    stream: &'a StatusStream,
    key: TaskKey,
    task: Option<(Task, Arc<Mutex<bool>>)>,
}

impl Queued<'_> {
    /// Checkpoints the task as it was when its update was queued, then
    /// sends what is due.
    pub fn write(self) {
        if let Some((task, slot)) = self.task {
            let removed = slot.lock().unwrap_or_else(|p| p.into_inner());
            if !*removed && let Err(error) = self.stream.checkpoint.task(&task) {
                tracing::error!(%error, task_id = self.key.task_id, "cannot checkpoint the task");
            }
        }
        self.stream.flush();
    }
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

    /// A new link to the master: `register` goes out first, before any
    /// update or telemetry can (the master refuses a link that does not
    /// open with Register); false when the link is already gone.
    pub fn connect(
        &self,
        outbound: mpsc::UnboundedSender<link::AgentMessage>,
        register: link::AgentMessage,
    ) -> bool {
        let mut streams = self.lock();
        if outbound.send(register).is_err() {
            return false;
        }
        streams.outbound = Some(outbound);
        true
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

    /// Queues an update. It takes the agent's locked state (`_held`) to be
    /// called where the task's state changed, so that its updates queue in
    /// the order of its states; `write()` the returned checkpoint (`task`,
    /// the task as it is now) once the lock is released, where slow I/O
    /// stalls nobody.
    pub fn queue(
        &self,
        _held: &AgentState,
        key: &TaskKey,
        update: link::StatusUpdate,
        task: Option<Task>,
    ) -> Queued<'_> {
        let mut streams = self.lock();
        streams
            .queues
            .entry(key.clone())
            .or_insert_with(|| UpdateQueue::new(self.retry))
            .push(update);
        let task = task.map(|task| {
            let slot = streams.checkpoints.entry(key.clone()).or_default();
            (task, slot.clone())
        });
        Queued {
            stream: self,
            key: key.clone(),
            task,
        }
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
            (drained && is_terminal(acked.status.state())).then(|| streams.checkpoints.remove(key))
        };
        if let Some(slot) = ended {
            // Held across the removal: a write still in flight waits, then skips.
            let mut removed = slot
                .as_ref()
                .map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some(removed) = removed.as_mut() {
                **removed = true;
            }
            if let Err(error) = self.checkpoint.remove_task(&key.framework_id, &key.task_id) {
                tracing::error!(%error, task_id = key.task_id, "cannot remove the task's checkpoint");
            }
        }
        self.flush();
    }
}

/// A task's next state and what its status update says.
pub(super) struct Change {
    state: TaskState,
    message: Option<String>,
    reason: Option<task_status::Reason>,
    labels: Vec<Label>,
}

impl Change {
    pub(super) fn to(state: TaskState) -> Self {
        Self {
            state,
            message: None,
            reason: None,
            labels: Vec::new(),
        }
    }

    pub(super) fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub(super) fn reason(mut self, reason: Option<task_status::Reason>) -> Self {
        self.reason = reason;
        self
    }

    pub(super) fn state(&self) -> TaskState {
        self.state
    }

    pub(super) fn label(mut self, label: Label) -> Self {
        self.labels.push(label);
        self
    }
}

impl Agent {
    /// A status update; a running task's carries the labels of its GPUs
    /// (which it was given and how they are linked) and the change's own.
    pub(super) fn update(&self, key: &TaskKey, change: Change) {
        self.queue_update(key, change, false);
    }

    /// TASK_RUNNING, once: from the launch that reached exec or from the
    /// task's exit, whichever the agent sees first (a short task can exit
    /// before its launch is answered; without this its framework would see
    /// STARTING, then FINISHED, and never RUNNING).
    pub(super) fn report_running(&self, key: &TaskKey) {
        self.queue_update(key, Change::to(TaskState::TaskRunning), true);
    }

    /// Moves the task to the change's state and queues its update; `once`:
    /// not when the task is in that state already. An update for a task no
    /// longer here, or one the task state machine does not allow, is
    /// dropped. It is queued under the agent's lock, where the task's state
    /// changes, so a task's updates leave in the order of its states.
    fn queue_update(&self, key: &TaskKey, change: Change, once: bool) {
        let Change {
            state,
            message,
            reason,
            labels: extra_labels,
        } = change;
        let mut guard = self.lock();
        let agent_id = guard.agent_id.clone();
        let Some(record) = guard.tasks.get_mut(key) else {
            tracing::debug!(%key, ?state, "an update for a task no longer here; dropped");
            return;
        };
        let from = record.state();
        if once && from == state {
            return;
        }
        if !record.advance(state) {
            tracing::warn!(%key, ?from, to = ?state, "a status update the task state machine does not allow; dropped");
            return;
        }
        let mut labels = match &record.gpus {
            Some(gpus) if state == TaskState::TaskRunning => gpus.labels(),
            _ => Vec::new(),
        };
        let task = Some(record.to_proto(agent_id.as_deref()));
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
        let queued = self.status.queue(&guard, key, update, task);
        drop(guard);
        queued.write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(key: &TaskKey, state: TaskState) -> (link::StatusUpdate, Task) {
        let status = TaskStatus {
            task_id: TaskId {
                value: key.task_id.clone(),
            },
            state: state as i32,
            uuid: Some(new_uuid()),
            ..Default::default()
        };
        let task = Task {
            task_id: status.task_id.clone(),
            framework_id: FrameworkId {
                value: key.framework_id.clone(),
            },
            state: state as i32,
            ..Default::default()
        };
        let framework_id = task.framework_id.clone();
        (
            link::StatusUpdate {
                framework_id,
                status,
            },
            task,
        )
    }

    fn held() -> AgentState {
        AgentState::new(None, butte_api::resources::Resources::new(), None)
    }

    fn sent(outbound: &mut mpsc::UnboundedReceiver<link::AgentMessage>) -> Vec<TaskStatus> {
        let mut sent = Vec::new();
        while let Ok(message) = outbound.try_recv() {
            if let Some(agent_message::Kind::StatusUpdate(update)) = message.kind {
                sent.push(update.status);
            }
        }
        sent
    }

    #[test]
    fn a_late_checkpoint_write_never_brings_back_an_ended_task() {
        let work_dir =
            std::env::temp_dir().join(format!("butte-status-stream-{}", std::process::id()));
        let checkpoint = Arc::new(Checkpoint::new(&work_dir));
        let stream = StatusStream::new(Duration::from_secs(10), checkpoint);
        let (sender, mut outbound) = mpsc::unbounded_channel();
        assert!(stream.connect(sender, link::AgentMessage { kind: None }));
        let _register = outbound.try_recv();
        let key = TaskKey::new("f", "t");
        let task_dir = work_dir.join("meta/frameworks/f/tasks/t");

        // RUNNING is queued first but its checkpoint write is slow.
        let (running, running_task) = update(&key, TaskState::TaskRunning);
        let held = held();
        let late = stream.queue(&held, &key, running, Some(running_task));
        let (finished, finished_task) = update(&key, TaskState::TaskFinished);
        stream
            .queue(&held, &key, finished, Some(finished_task))
            .write();
        assert!(task_dir.exists(), "the task is checkpointed");

        let first = sent(&mut outbound);
        assert_eq!(first.len(), 1, "only the oldest update is in flight");
        assert_eq!(first[0].state(), TaskState::TaskRunning);
        stream.acknowledge(&key, first[0].uuid.as_deref().unwrap_or_default());
        let second = sent(&mut outbound);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].state(), TaskState::TaskFinished);
        stream.acknowledge(&key, second[0].uuid.as_deref().unwrap_or_default());
        assert!(!task_dir.exists(), "the acknowledged end removes it");

        late.write();
        assert!(
            !task_dir.exists(),
            "the slow write of RUNNING does not bring the checkpoint back"
        );
        let _ = std::fs::remove_dir_all(&work_dir);
    }
}
