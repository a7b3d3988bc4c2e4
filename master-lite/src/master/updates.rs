//! Status updates: applying an agent's (or the master's own) update to its
//! task, delivering it to the framework at least once and in order,
//! ACKNOWLEDGE, and RECONCILE.

use std::time::Instant;

use butte_api::agent_link::v1 as link;
use butte_api::mesos::v1::scheduler::{Event, call, event};
use butte_api::mesos::v1::{
    AgentId, Task, TaskId, TaskState, TaskStatus, framework_info::capability, task_status,
};
use butte_api::task_state::{is_terminal, may_transition};
use butte_api::update_queue::{new_uuid, push_bounded, unix_now};

use super::frameworks::Connection;
use super::{ACKNOWLEDGED_KEPT, COMPLETED_KEPT, Master, Refusal, TaskEntry};

/// Statuses a task keeps in its history.
const STATUSES_KEPT: usize = 8;

impl TaskEntry {
    /// Makes `status` the task's latest and queues it for the framework;
    /// true when the task just ended and its resources are to go back.
    fn record(&mut self, mut status: TaskStatus) -> bool {
        let state = status.state();
        if state != TaskState::TaskStaging {
            self.launch = None;
        }
        status.agent_id = Some(self.task.agent_id.clone());
        if status.timestamp.is_none() {
            status.timestamp = Some(unix_now());
        }
        self.task.state = state as i32;
        self.task.status_update_state = Some(state as i32);
        self.task.status_update_uuid = status.uuid.clone();
        self.task.statuses.push(status.clone());
        if self.task.statuses.len() > STATUSES_KEPT {
            self.task.statuses.remove(0);
        }
        self.updates.push(status);
        is_terminal(state) && self.take_booked()
    }
}

impl Master {
    /// An update the agent sent for one of its tasks.
    pub fn agent_status_update(&mut self, agent_id: &str, update: link::StatusUpdate) {
        self.agent_heartbeat(agent_id);
        let framework_id = update.framework_id.value.clone();
        let mut status = update.status;
        let known = self
            .frameworks
            .get(&framework_id)
            .and_then(|f| f.tasks.get(&status.task_id.value))
            .is_some_and(|e| e.task.agent_id.value == agent_id);
        if status.uuid.as_ref().is_none_or(|u| u.is_empty()) {
            status.uuid = Some(new_uuid());
        }
        if !known {
            // Nobody will acknowledge it: acknowledge it ourselves so the agent stops resending.
            self.ack_agent(
                agent_id,
                &update.framework_id.value,
                &status.task_id,
                status.uuid.clone().unwrap_or_default(),
            );
            return;
        }
        self.apply_update(&framework_id, status, true);
    }

    /// Applies a status update to the task and queues it for the framework.
    /// `from_agent`: the agent waits for our acknowledgement of this uuid.
    pub(super) fn apply_update(
        &mut self,
        framework_id: &str,
        status: TaskStatus,
        from_agent: bool,
    ) {
        let task_id = status.task_id.value.clone();
        let now = Instant::now();
        let Some(entry) = self
            .frameworks
            .get_mut(framework_id)
            .and_then(|f| f.tasks.get_mut(&task_id))
        else {
            return;
        };
        let uuid = status.uuid.clone().unwrap_or_default();
        if entry.updates.holds(&uuid) {
            return; // a resend of what we already hold
        }
        let (current, state) = (entry.state(), status.state());
        let duplicate = entry.acknowledged.contains(&uuid);
        let out_of_order = !duplicate && !may_transition(current, state) && current != state;
        if out_of_order {
            tracing::warn!(
                framework_id,
                task_id,
                ?current,
                ?state,
                "ignoring a status update that does not follow the task's state"
            );
        }
        if duplicate || out_of_order {
            // Acknowledge it again, or the agent would resend it forever.
            if from_agent {
                let agent_id = entry.task.agent_id.value.clone();
                self.ack_agent(&agent_id, framework_id, &status.task_id, uuid);
            }
            return;
        }
        let staged = entry.launch.is_some();
        let release = entry.record(status);
        let launched = staged && entry.launch.is_none();
        let (role, resources) = (entry.role.clone(), entry.resources.clone());
        let task = entry.task.clone();
        self.counters.status_updates += 1;
        let result = self.registry.put_task(&task);
        self.persist(result);
        if launched {
            let result = self.registry.remove_launch(framework_id, &task_id);
            self.persist(result);
        }
        if release {
            let agent_id = &task.agent_id.value;
            self.allocator
                .recover(framework_id, agent_id, &role, &resources, None, now);
            self.want_allocation();
        }
        self.send_due_update(framework_id, &task_id, now);
    }

    /// Sends each task's oldest unacknowledged update when it is due (timer
    /// and re-subscription: every task may be due).
    pub(super) fn resend_pending_updates(&mut self, now: Instant) {
        for framework in self.frameworks.values_mut() {
            let Connection::Connected(stream) = &framework.connection else {
                continue;
            };
            for entry in framework.tasks.values_mut() {
                if let Some(status) = entry.updates.due(now) {
                    stream.send(update_event(status));
                }
            }
        }
    }

    /// The same for one task, after its own update or acknowledgement: no
    /// other task can have become due, so none is scanned.
    fn send_due_update(&mut self, framework_id: &str, task_id: &str, now: Instant) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        let Connection::Connected(stream) = &framework.connection else {
            return;
        };
        if let Some(status) = framework
            .tasks
            .get_mut(task_id)
            .and_then(|entry| entry.updates.due(now))
        {
            stream.send(update_event(status));
        }
    }

    /// An update the framework need not acknowledge (reconciliation, refused launches).
    pub(super) fn send_update_without_ack(&self, framework_id: &str, status: TaskStatus) {
        self.send_event(framework_id, update_event(status));
    }

    /// ACKNOWLEDGE: the framework has the update with `uuid`; tell the agent
    /// and send the task's next pending update.
    pub fn acknowledge(
        &mut self,
        framework_id: &str,
        ack: &call::Acknowledge,
    ) -> Result<(), Refusal> {
        if uuid::Uuid::from_slice(&ack.uuid).is_err() {
            return Err(Refusal::bad_request(
                "'uuid' in ACKNOWLEDGE is not a valid UUID; send back the update's uuid unchanged",
            ));
        }
        let task_id = ack.task_id.value.clone();
        let Some(entry) = self
            .frameworks
            .get_mut(framework_id)
            .and_then(|f| f.tasks.get_mut(&task_id))
        else {
            return Ok(());
        };
        if entry.updates.acknowledge(&ack.uuid).is_none() {
            return Ok(());
        }
        push_bounded(&mut entry.acknowledged, ack.uuid.clone(), ACKNOWLEDGED_KEPT);
        let agent_id = entry.task.agent_id.value.clone();
        let finished = entry.updates.is_empty() && is_terminal(entry.state());
        self.ack_agent(&agent_id, framework_id, &ack.task_id, ack.uuid.clone());
        if finished {
            self.complete_task(framework_id, &task_id);
        } else {
            self.send_due_update(framework_id, &task_id, Instant::now());
        }
        Ok(())
    }

    fn complete_task(&mut self, framework_id: &str, task_id: &str) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        let Some(entry) = framework.tasks.remove(task_id) else {
            return;
        };
        let result = self.registry.remove_task(&entry.task);
        push_bounded(&mut framework.completed_tasks, entry.task, COMPLETED_KEPT);
        self.persist(result);
    }

    /// RECONCILE: the latest state of the named tasks, or of all tasks when none are named.
    pub fn reconcile(&mut self, framework_id: &str, reconcile: &call::Reconcile) {
        let statuses: Vec<TaskStatus> = if reconcile.tasks.is_empty() {
            self.frameworks
                .get(framework_id)
                .map(|f| f.tasks.values().map(|e| latest_status(&e.task)).collect())
                .unwrap_or_default()
        } else {
            reconcile
                .tasks
                .iter()
                .map(|t| self.reconciled_status(framework_id, &t.task_id, t.agent_id.as_ref()))
                .collect()
        };
        for status in statuses {
            self.send_update_without_ack(framework_id, status);
        }
    }

    pub(super) fn reconciled_status(
        &self,
        framework_id: &str,
        task_id: &TaskId,
        agent_id: Option<&AgentId>,
    ) -> TaskStatus {
        let framework = self.frameworks.get(framework_id);
        if let Some(entry) = framework.and_then(|f| f.tasks.get(&task_id.value)) {
            return latest_status(&entry.task);
        }
        let partition_aware =
            framework.is_some_and(|f| f.has_capability(capability::Type::PartitionAware));
        let agent_known = agent_id
            .and_then(|a| self.agents.get(&a.value))
            .is_some_and(|a| a.connected());
        let state = match (partition_aware, agent_known) {
            (false, _) => TaskState::TaskLost,
            (true, true) => TaskState::TaskGone,
            (true, false) => TaskState::TaskUnknown,
        };
        master_status(
            task_id,
            agent_id,
            state,
            task_status::Reason::Reconciliation,
            "reconciliation: the master does not know this task",
        )
    }
}

fn update_event(status: TaskStatus) -> Event {
    Event {
        r#type: Some(event::Type::Update as i32),
        update: Some(event::Update { status }),
        ..Default::default()
    }
}

/// A status the master itself writes (no uuid unless the caller adds one).
pub(super) fn master_status(
    task_id: &TaskId,
    agent_id: Option<&AgentId>,
    state: TaskState,
    reason: task_status::Reason,
    message: &str,
) -> TaskStatus {
    TaskStatus {
        task_id: task_id.clone(),
        state: state as i32,
        message: Some(message.to_owned()),
        source: Some(task_status::Source::Master as i32),
        reason: Some(reason as i32),
        agent_id: agent_id.cloned(),
        timestamp: Some(unix_now()),
        ..Default::default()
    }
}

/// The task's latest state as a reconciliation answer (no uuid: nothing to acknowledge).
fn latest_status(task: &Task) -> TaskStatus {
    let mut status = task.statuses.last().cloned().unwrap_or_else(|| TaskStatus {
        task_id: task.task_id.clone(),
        state: task.state,
        agent_id: Some(task.agent_id.clone()),
        ..Default::default()
    });
    status.state = task.state;
    status.uuid = None;
    status.source = Some(task_status::Source::Master as i32);
    status.reason = Some(task_status::Reason::Reconciliation as i32);
    status.timestamp = Some(unix_now());
    status
}
