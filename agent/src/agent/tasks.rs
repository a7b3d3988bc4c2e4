//! The agent's books of tasks: each task's record, which container holds it,
//! and the task groups still running. Records change state only through
//! `TaskRecord::advance`, which follows the shared task state machine.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use butte_api::mesos::v1::{AgentId, FrameworkId, Task, TaskInfo, TaskState};
use butte_api::resources::Resources;
use butte_api::task_state::may_transition;

use crate::checkpoint::TaskCheckpoint;
use crate::gpus::Assignment;

/// A task on this agent: its framework's id and its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    pub framework_id: String,
    pub task_id: String,
}

impl TaskKey {
    pub fn new(framework_id: &str, task_id: &str) -> Self {
        Self {
            framework_id: framework_id.to_owned(),
            task_id: task_id.to_owned(),
        }
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.framework_id, self.task_id)
    }
}

pub struct TaskRecord {
    pub info: TaskInfo,
    pub framework_id: String,
    state: TaskState,
    /// A kill was asked for: its end is reported as TASK_KILLED.
    killing: bool,
    /// The task's own container (for a group task: its stand-in process).
    pub container_id: String,
    /// The container whose cgroup holds the task (the group's, for a group task).
    pub cgroup_id: String,
    /// The task group's container, when the task is part of one.
    pub group: Option<String>,
    /// The executor it runs under (a command task is its own executor, as in Mesos).
    pub executor_id: String,
    pub resources: Resources,
    pub sandbox: PathBuf,
    /// The GPUs its container was given.
    pub gpus: Option<Assignment>,
    /// Its sandbox's newest measure (tasks with a `disk`).
    pub disk_used_bytes: Option<u64>,
}

impl TaskRecord {
    pub fn state(&self) -> TaskState {
        self.state
    }

    /// Moves to `to` if the task state machine allows it (staying put is
    /// allowed: a running task's update may repeat RUNNING).
    pub fn advance(&mut self, to: TaskState) -> bool {
        if self.state != to && !may_transition(self.state, to) {
            return false;
        }
        self.state = to;
        true
    }

    pub fn is_killing(&self) -> bool {
        self.killing
    }

    pub fn mark_killing(&mut self) {
        self.killing = true;
    }

    /// Its `disk` (MB) in bytes; 0 when it has none.
    pub fn disk_limit_bytes(&self) -> u64 {
        (self.resources.scalar("disk") * 1024.0 * 1024.0) as u64
    }

    /// The task as its checkpoint keeps it (its pending updates are added
    /// by the status stream).
    pub fn to_checkpoint(&self, agent_id: Option<&str>) -> TaskCheckpoint {
        TaskCheckpoint {
            task: self.to_proto(agent_id),
            container_id: self.container_id.clone(),
            cgroup_id: self.cgroup_id.clone(),
            group: self.group.clone(),
            executor_id: self.executor_id.clone(),
            sandbox: self.sandbox.to_string_lossy().into_owned(),
            gpus_json: self
                .gpus
                .as_ref()
                .and_then(|gpus| serde_json::to_string(gpus).ok())
                .unwrap_or_default(),
            killing: self.killing,
            pending: Vec::new(),
        }
    }

    /// A task read back from its checkpoint.
    pub fn from_checkpoint(checkpoint: &TaskCheckpoint) -> (TaskKey, Self) {
        let task = &checkpoint.task;
        let key = TaskKey::new(&task.framework_id.value, &task.task_id.value);
        let info = TaskInfo {
            name: task.name.clone(),
            task_id: task.task_id.clone(),
            agent_id: task.agent_id.clone(),
            resources: task.resources.clone(),
            labels: task.labels.clone(),
            ..Default::default()
        };
        let record = Self {
            framework_id: key.framework_id.clone(),
            state: task.state(),
            killing: checkpoint.killing,
            container_id: checkpoint.container_id.clone(),
            cgroup_id: checkpoint.cgroup_id.clone(),
            group: checkpoint.group.clone(),
            executor_id: checkpoint.executor_id.clone(),
            resources: Resources::from_proto(&task.resources).unwrap_or_default(),
            sandbox: PathBuf::from(&checkpoint.sandbox),
            gpus: serde_json::from_str(&checkpoint.gpus_json).ok(),
            disk_used_bytes: None,
            info,
        };
        (key, record)
    }

    /// The task as the master's registration and the checkpoint see it.
    pub fn to_proto(&self, agent_id: Option<&str>) -> Task {
        Task {
            name: self.info.name.clone(),
            task_id: self.info.task_id.clone(),
            framework_id: FrameworkId {
                value: self.framework_id.clone(),
            },
            agent_id: AgentId {
                value: agent_id.unwrap_or_default().to_owned(),
            },
            state: self.state as i32,
            resources: self.info.resources.clone(),
            labels: self.info.labels.clone(),
            ..Default::default()
        }
    }
}

/// Where a task staged for launch lives: its own container, or a group's.
pub struct Placing<'a> {
    pub container_id: &'a str,
    pub cgroup_id: &'a str,
    pub group: Option<&'a str>,
    pub executor_id: &'a str,
    pub sandbox: PathBuf,
}

/// Every task on the agent, with the indexes its containers need.
#[derive(Default)]
pub struct TaskTable {
    tasks: HashMap<TaskKey, TaskRecord>,
    containers: HashMap<String, TaskKey>,
    /// Running task groups: the group container and its tasks still alive.
    groups: HashMap<String, Vec<TaskKey>>,
}

impl TaskTable {
    /// Records a task as TASK_STAGING in its container (and indexes the container).
    pub fn stage(
        &mut self,
        key: &TaskKey,
        task: &TaskInfo,
        resources: Resources,
        placing: Placing<'_>,
    ) {
        self.tasks.insert(
            key.clone(),
            TaskRecord {
                info: task.clone(),
                framework_id: key.framework_id.clone(),
                state: TaskState::TaskStaging,
                killing: false,
                container_id: placing.container_id.to_owned(),
                cgroup_id: placing.cgroup_id.to_owned(),
                group: placing.group.map(str::to_owned),
                executor_id: placing.executor_id.to_owned(),
                resources,
                sandbox: placing.sandbox,
                gpus: None,
                disk_used_bytes: None,
            },
        );
        self.containers
            .insert(placing.container_id.to_owned(), key.clone());
    }

    /// Books a task recovered after a restart (and its container's index).
    pub fn restore(&mut self, key: TaskKey, record: TaskRecord) {
        self.containers
            .insert(record.container_id.clone(), key.clone());
        self.tasks.insert(key, record);
    }

    /// Drops a task that ended, and its container's index.
    pub fn remove(&mut self, key: &TaskKey) -> Option<TaskRecord> {
        let record = self.tasks.remove(key)?;
        self.containers.remove(&record.container_id);
        Some(record)
    }

    pub fn get(&self, key: &TaskKey) -> Option<&TaskRecord> {
        self.tasks.get(key)
    }

    pub fn get_mut(&mut self, key: &TaskKey) -> Option<&mut TaskRecord> {
        self.tasks.get_mut(key)
    }

    pub fn contains(&self, key: &TaskKey) -> bool {
        self.tasks.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TaskKey, &TaskRecord)> {
        self.tasks.iter()
    }

    pub fn keys(&self) -> Vec<TaskKey> {
        self.tasks.keys().cloned().collect()
    }

    /// The task whose own container is `container_id`.
    pub fn by_container(&self, container_id: &str) -> Option<&TaskKey> {
        self.containers.get(container_id)
    }

    /// What every task on the agent holds, together.
    pub fn used(&self) -> Resources {
        let mut used = Resources::new();
        for record in self.tasks.values() {
            used.add(&record.resources);
        }
        used
    }

    /// Tasks whose cgroup is `cgroup_id` (one, or a whole group).
    pub fn in_cgroup(&self, cgroup_id: &str) -> impl Iterator<Item = (&TaskKey, &TaskRecord)> {
        self.tasks
            .iter()
            .filter(move |(_, r)| r.cgroup_id == cgroup_id)
    }

    pub fn add_group(&mut self, group: &str, members: Vec<TaskKey>) {
        self.groups.insert(group.to_owned(), members);
    }

    /// Forgets a group (its init ended or never started); whether it ran.
    pub fn remove_group(&mut self, group: &str) -> bool {
        self.groups.remove(group).is_some()
    }

    pub fn group_members(&self, group: &str) -> Vec<TaskKey> {
        self.groups.get(group).cloned().unwrap_or_default()
    }

    /// One member of a group ended; how many are left (None: no such group).
    pub fn leave_group(&mut self, group: &str, key: &TaskKey) -> Option<usize> {
        let members = self.groups.get_mut(group)?;
        members.retain(|k| k != key);
        Some(members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(
        table: &mut TaskTable,
        task_id: &str,
        container: &str,
        group: Option<&str>,
    ) -> TaskKey {
        let key = TaskKey::new("f", task_id);
        let placing = Placing {
            container_id: container,
            cgroup_id: group.unwrap_or(container),
            group,
            executor_id: task_id,
            sandbox: PathBuf::from("/var/lib/butte/sandbox"),
        };
        table.stage(&key, &TaskInfo::default(), Resources::new(), placing);
        key
    }

    #[test]
    fn a_record_follows_the_task_state_machine() {
        let mut table = TaskTable::default();
        let key = staged(&mut table, "t", "c1", None);
        let record = table.get_mut(&key).expect("staged");
        assert!(record.advance(TaskState::TaskStarting));
        assert!(record.advance(TaskState::TaskRunning));
        assert!(record.advance(TaskState::TaskRunning), "RUNNING may repeat");
        assert!(!record.advance(TaskState::TaskStarting), "no way back");
        assert!(record.advance(TaskState::TaskFinished));
        assert!(!record.advance(TaskState::TaskRunning), "terminal is final");
        assert_eq!(record.state(), TaskState::TaskFinished);
    }

    #[test]
    fn removing_a_task_drops_its_container_index() {
        let mut table = TaskTable::default();
        let key = staged(&mut table, "t", "c1", None);
        assert_eq!(table.by_container("c1"), Some(&key));
        assert!(table.remove(&key).is_some());
        assert!(table.by_container("c1").is_none() && table.is_empty());
    }

    #[test]
    fn a_group_counts_down_its_members() {
        let mut table = TaskTable::default();
        let a = staged(&mut table, "a", "ca", Some("g"));
        let b = staged(&mut table, "b", "cb", Some("g"));
        table.add_group("g", vec![a.clone(), b.clone()]);
        assert_eq!(table.in_cgroup("g").count(), 2);
        assert_eq!(table.leave_group("g", &a), Some(1));
        assert_eq!(table.leave_group("g", &b), Some(0));
        assert!(table.remove_group("g"));
        assert_eq!(table.leave_group("g", &a), None);
    }
}
