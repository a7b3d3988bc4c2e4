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

use super::tasks::TaskKey;
use super::{Agent, AgentState};
use crate::checkpoint::{Checkpoint, TaskCheckpoint};
use crate::link::Outbound;

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
    /// Per task with a checkpoint: what it holds (see `Slot`).
    checkpoints: HashMap<TaskKey, Arc<Mutex<Slot>>>,
    /// Numbers the checkpoints queued, so that a slow write never lands
    /// over a newer one.
    sequence: u64,
    /// Each task with updates pending, as of its newest update.
    tasks: HashMap<TaskKey, Task>,
    outbound: Option<Outbound>,
}

/// A task's checkpoint file, as last written. Writes and the final removal
/// take its lock; a write after the removal, or older than the last one
/// written, is skipped, so a slow write never brings back the checkpoint of
/// a task that has ended, nor an older state.
#[derive(Default)]
struct Slot {
    removed: bool,
    written: u64,
    /// The task as last written (without its pending updates, read fresh
    /// at each write).
    latest: Option<TaskCheckpoint>,
}

/// A queued update's checkpoint, written once the agent's lock is released.
#[must_use = "write() checkpoints the task and sends the update"]
pub struct Queued<'a> {
    stream: &'a StatusStream,
    key: TaskKey,
    task: Option<(TaskCheckpoint, Arc<Mutex<Slot>>, u64)>,
}

impl Queued<'_> {
    /// Checkpoints the task as it was when its update was queued, with
    /// every update not yet acknowledged, then sends what is due. False
    /// when the checkpoint could not be written.
    pub fn write(self) -> bool {
        let mut written = true;
        if let Some((task, slot, sequence)) = self.task {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if !slot.removed && sequence > slot.written {
                slot.written = sequence;
                slot.latest = Some(task);
                written = self.stream.write_checkpoint(&self.key, &slot);
            }
        }
        self.stream.flush();
        written
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

    /// Writes the slot's task with the updates pending now. Called with
    /// the slot locked (never the streams: they are taken here).
    fn write_checkpoint(&self, key: &TaskKey, slot: &Slot) -> bool {
        let Some(latest) = &slot.latest else {
            return true;
        };
        let mut checkpoint = latest.clone();
        checkpoint.pending = self
            .lock()
            .queues
            .get(key)
            .map(|queue| queue.pending().cloned().collect())
            .unwrap_or_default();
        tracing::debug!(%key, state = ?checkpoint.task.state(), pending = checkpoint.pending.len(), "checkpointing the task");
        match self.checkpoint.task(&checkpoint) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, task_id = key.task_id, "cannot checkpoint the task");
                false
            }
        }
    }

    /// Tasks that ended here but whose end the master has not acknowledged,
    /// with their last state (registration carries them, so that the
    /// master does not take them for lost before their updates arrive).
    pub fn unacknowledged_ends(&self) -> Vec<Task> {
        let streams = self.lock();
        streams
            .tasks
            .values()
            .filter(|task| is_terminal(task.state()))
            .cloned()
            .collect()
    }

    /// A task read back from its checkpoint: its unacknowledged updates
    /// queue again, in order, to go out once the master registers us.
    pub fn restore(&self, key: &TaskKey, mut checkpoint: TaskCheckpoint) {
        let pending = std::mem::take(&mut checkpoint.pending);
        let mut streams = self.lock();
        if !pending.is_empty() {
            let queue = streams
                .queues
                .entry(key.clone())
                .or_insert_with(|| UpdateQueue::new(self.retry));
            for update in pending {
                queue.push(update);
            }
        }
        streams.tasks.insert(key.clone(), checkpoint.task.clone());
        let slot = Slot {
            latest: Some(checkpoint),
            ..Slot::default()
        };
        streams
            .checkpoints
            .insert(key.clone(), Arc::new(Mutex::new(slot)));
    }

    /// A new link to the master: `register` goes out first, before any
    /// update or telemetry can (the master refuses a link that does not
    /// open with Register); false when the link is already gone.
    pub fn connect(&self, outbound: Outbound, register: link::AgentMessage) -> bool {
        let mut streams = self.lock();
        if !outbound.send(register) {
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
        outbound.send(link::AgentMessage { kind: Some(kind) })
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
        task: Option<TaskCheckpoint>,
    ) -> Queued<'_> {
        let mut streams = self.lock();
        streams
            .queues
            .entry(key.clone())
            .or_insert_with(|| UpdateQueue::new(self.retry))
            .push(update);
        streams.sequence += 1;
        let sequence = streams.sequence;
        if let Some(task) = &task {
            streams.tasks.insert(key.clone(), task.task.clone());
        }
        let task = task.map(|task| {
            let slot = streams.checkpoints.entry(key.clone()).or_default();
            (task, slot.clone(), sequence)
        });
        Queued {
            stream: self,
            key: key.clone(),
            task,
        }
    }

    /// A checkpoint of a task without an update (a kill asked for), in
    /// sequence with its updates' checkpoints; `write()` it once the
    /// agent's lock is released.
    pub fn rewrite(&self, _held: &AgentState, key: &TaskKey, task: TaskCheckpoint) -> Queued<'_> {
        let mut streams = self.lock();
        streams.sequence += 1;
        let sequence = streams.sequence;
        let slot = streams.checkpoints.entry(key.clone()).or_default().clone();
        Queued {
            stream: self,
            key: key.clone(),
            task: Some((task, slot, sequence)),
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
                outbound.send(link::AgentMessage {
                    kind: Some(agent_message::Kind::StatusUpdate(update)),
                });
            }
        }
    }

    /// The master has the update `uuid` of a task. Once a task's terminal
    /// update is acknowledged and nothing is left, its checkpoint goes.
    pub fn acknowledge(&self, key: &TaskKey, uuid: &[u8]) {
        let (ended, slot) = {
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
                streams.tasks.remove(key);
            }
            if drained && is_terminal(acked.status.state()) {
                (true, streams.checkpoints.remove(key))
            } else {
                (false, streams.checkpoints.get(key).cloned())
            }
        };
        if let Some(slot) = slot {
            // Held across the write or removal: a write still in flight
            // waits, then skips.
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if ended {
                tracing::debug!(%key, "the task's end is acknowledged; its checkpoint goes");
                slot.removed = true;
                if let Err(error) = self.checkpoint.remove_task(&key.framework_id, &key.task_id) {
                    tracing::error!(%error, task_id = key.task_id, "cannot remove the task's checkpoint");
                }
            } else if !slot.removed {
                // The acknowledged update must not come back after a restart.
                let _ = self.write_checkpoint(key, &slot);
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
        let _ = self.queue_update(key, change, false);
    }

    /// As `update`; false when the task's checkpoint could not be written
    /// (the update is queued all the same).
    pub(super) fn update_checkpointed(&self, key: &TaskKey, change: Change) -> bool {
        self.queue_update(key, change, false)
    }

    /// Checkpoints a task as it is now, with no update (a kill was asked
    /// for: a restarted agent must still kill it).
    pub(super) fn checkpoint_now(&self, key: &TaskKey) {
        let guard = self.lock();
        let agent_id = guard.agent_id.clone();
        let Some(record) = guard.tasks.get(key) else {
            return;
        };
        let task = record.to_checkpoint(agent_id.as_deref());
        let queued = self.status.rewrite(&guard, key, task);
        drop(guard);
        let _ = queued.write();
    }

    /// TASK_RUNNING, once: from the launch that reached exec or from the
    /// task's exit, whichever the agent sees first (a short task can exit
    /// before its launch is answered; without this its framework would see
    /// STARTING, then FINISHED, and never RUNNING).
    pub(super) fn report_running(&self, key: &TaskKey) {
        let _ = self.queue_update(key, Change::to(TaskState::TaskRunning), true);
    }

    /// Moves the task to the change's state and queues its update; `once`:
    /// not when the task is in that state already. An update for a task no
    /// longer here, or one the task state machine does not allow, is
    /// dropped. It is queued under the agent's lock, where the task's state
    /// changes, so a task's updates leave in the order of its states.
    fn queue_update(&self, key: &TaskKey, change: Change, once: bool) -> bool {
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
            return true;
        };
        let from = record.state();
        if once && from == state {
            return true;
        }
        if !record.advance(state) {
            tracing::warn!(%key, ?from, to = ?state, "a status update the task state machine does not allow; dropped");
            return true;
        }
        let mut labels = match &record.gpus {
            Some(gpus) if state == TaskState::TaskRunning => gpus.labels(),
            _ => Vec::new(),
        };
        let task = Some(record.to_checkpoint(agent_id.as_deref()));
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
        queued.write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

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

    fn checkpointed(task: Task) -> TaskCheckpoint {
        TaskCheckpoint {
            task,
            ..Default::default()
        }
    }

    fn held() -> AgentState {
        AgentState::new(None, butte_api::resources::Resources::new(), None)
    }

    fn sent(outbound: &mut mpsc::Receiver<link::AgentMessage>) -> Vec<TaskStatus> {
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
        let (sender, mut outbound) = Outbound::new(64);
        assert!(stream.connect(sender, link::AgentMessage { kind: None }));
        let _register = outbound.try_recv();
        let key = TaskKey::new("f", "t");
        let task_dir = work_dir.join("meta/frameworks/f/tasks/t");

        // RUNNING is queued first but its checkpoint write is slow.
        let (running, running_task) = update(&key, TaskState::TaskRunning);
        let held = held();
        let late = stream.queue(&held, &key, running, Some(checkpointed(running_task)));
        let (finished, finished_task) = update(&key, TaskState::TaskFinished);
        stream
            .queue(&held, &key, finished, Some(checkpointed(finished_task)))
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

    #[test]
    fn unacknowledged_updates_come_back_in_order_after_a_restart() {
        let work_dir =
            std::env::temp_dir().join(format!("butte-status-restart-{}", std::process::id()));
        let checkpoint = Arc::new(Checkpoint::new(&work_dir));
        checkpoint
            .framework(&butte_api::mesos::v1::FrameworkInfo {
                id: Some(FrameworkId { value: "f".into() }),
                ..Default::default()
            })
            .expect("framework");
        let key = TaskKey::new("f", "t");
        let held = held();
        let before = StatusStream::new(Duration::from_secs(10), checkpoint.clone());
        let (running, running_task) = update(&key, TaskState::TaskRunning);
        let (finished, finished_task) = update(&key, TaskState::TaskFinished);
        for (update, task) in [(&running, running_task), (&finished, finished_task)] {
            before
                .queue(&held, &key, update.clone(), Some(checkpointed(task)))
                .write();
        }
        // No link ever: the agent dies with both updates unacknowledged.
        drop(before);

        let recovered = checkpoint.recover();
        assert_eq!(recovered.len(), 1);
        let after = StatusStream::new(Duration::from_secs(10), checkpoint.clone());
        after.restore(&key, recovered[0].task.clone());
        let ends = after.unacknowledged_ends();
        assert_eq!(ends.len(), 1, "registration carries the task that ended");
        assert_eq!(ends[0].state(), TaskState::TaskFinished);
        let (sender, mut outbound) = Outbound::new(64);
        assert!(after.connect(sender, link::AgentMessage { kind: None }));
        after.registered();
        let first = sent(&mut outbound);
        assert_eq!(first, vec![running.status.clone()], "the oldest, as it was");
        after.acknowledge(&key, running.status.uuid());
        assert_eq!(sent(&mut outbound), vec![finished.status.clone()]);
        after.acknowledge(&key, finished.status.uuid());
        assert!(
            checkpoint.recover().is_empty(),
            "the acknowledged end is forgotten"
        );
        let _ = std::fs::remove_dir_all(&work_dir);
    }
}
