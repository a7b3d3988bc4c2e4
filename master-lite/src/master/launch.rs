//! Launches: what makes a task or task group valid (both what a call must
//! carry to be accepted at all and what the offers it uses must hold), the
//! TASK_ERROR answers, and the launch itself; then the calls that act on
//! launched tasks (KILL, SHUTDOWN, MESSAGE).

use std::collections::HashSet;

use butte_api::agent_link::v1 as link;
use butte_api::ids::check_id;
use butte_api::mesos::v1::scheduler::{Event, call, event};
use butte_api::mesos::v1::{
    AgentId, ExecutorInfo, FrameworkId, FrameworkInfo, Task, TaskGroupInfo, TaskInfo, TaskState,
    TaskStatus, framework_info::capability, offer::Operation, offer::operation, task_status,
};
use butte_api::resources::Resources;
use butte_api::task_state::is_terminal;
use butte_api::update_queue::new_uuid;

use super::frameworks::error_event;
use super::offers::tasks_of;
use super::updates::master_status;
use super::{Master, TaskEntry};

/// Where an ACCEPT's operations launch: the claimed offers' agent and role.
pub(super) struct Placement<'a> {
    pub framework_id: &'a str,
    pub agent_id: &'a str,
    pub role: &'a str,
}

/// What the rest of an ACCEPT's operations may use: the claimed offers less
/// what earlier launches took, and the task ids those launches took.
#[derive(Clone)]
pub(super) struct Budget {
    pub remaining: Resources,
    task_ids: HashSet<String>,
}

impl Budget {
    pub fn new(offered: Resources) -> Self {
        Self {
            remaining: offered,
            task_ids: HashSet::new(),
        }
    }

    fn take(&mut self, task_id: &str, resources: &Resources) {
        self.remaining.subtract_contained(resources);
        self.task_ids.insert(task_id.to_owned());
    }
}

/// Checks every resource an ACCEPT's launches carry, before the call is
/// applied (a malformed call is answered 400, not TASK_ERROR).
pub fn check_launch_resources(operations: &[Operation]) -> Result<(), String> {
    for operation in operations {
        if let Some(group) = &operation.launch_group {
            Resources::from_proto(&group.executor.resources)
                .map_err(|e| format!("the task group's executor: {e}"))?;
        }
        for task in tasks_of(operation) {
            task_resources(task, true)?;
        }
    }
    Ok(())
}

/// The resources a task uses, with its own executor's when `with_executor`.
fn task_resources(task: &TaskInfo, with_executor: bool) -> Result<Resources, String> {
    let id = task.task_id.value.as_str();
    let mut resources =
        Resources::from_proto(&task.resources).map_err(|e| format!("task {id}: {e}"))?;
    if let Some(executor) = task.executor.as_ref().filter(|_| with_executor) {
        resources.add(
            &Resources::from_proto(&executor.resources)
                .map_err(|e| format!("task {id}'s executor: {e}"))?,
        );
    }
    Ok(resources)
}

/// The first field named as present, of (present, field) pairs.
fn first_present<const N: usize>(fields: [(bool, &'static str); N]) -> Option<&'static str> {
    fields
        .into_iter()
        .find_map(|(present, field)| present.then_some(field))
}

/// Fields of a task this cluster cannot honour yet: refused by name, never
/// dropped in silence.
fn refuse_unsupported(task: &TaskInfo, in_group: bool) -> Result<(), String> {
    if let Some(container) = &task.container {
        refuse_unsupported_container(container).map_err(|field| {
            format!(
                "task {}: {field} is not supported by this cluster yet; leave it out",
                task.task_id.value
            )
        })?;
    }
    let command = task.command.as_ref();
    let unsupported = [
        (task.health_check.is_some(), "'health_check'"),
        (task.check.is_some(), "'check'"),
        (task.max_completion_time.is_some(), "'max_completion_time'"),
        (
            command.is_some_and(|c| !c.uris.is_empty()),
            "'command.uris' (the fetcher)",
        ),
        (
            task.executor.is_some() && !in_group,
            "'executor' (custom executors; give a 'command', or use LAUNCH_GROUP)",
        ),
    ];
    match first_present(unsupported) {
        Some(field) => Err(format!(
            "task {}: {field} is not supported by this cluster yet; leave it out",
            task.task_id.value
        )),
        None => Ok(()),
    }
}

/// Of a task's ContainerInfo only what the agent honours may be set: a
/// MESOS container whose `linux_info` asks for capabilities or an
/// unconfined seccomp filter (the agent checks both against its flags).
fn refuse_unsupported_container(
    container: &butte_api::mesos::v1::ContainerInfo,
) -> Result<(), &'static str> {
    use butte_api::mesos::v1::container_info::Type;
    let linux = container.linux_info.as_ref();
    let unsupported = [
        (
            container.r#type() != Type::Mesos,
            "'container.type' other than MESOS (Docker containers)",
        ),
        (container.mesos.is_some(), "'container.mesos' (images)"),
        (container.docker.is_some(), "'container.docker'"),
        (!container.volumes.is_empty(), "'container.volumes'"),
        (
            !container.network_infos.is_empty(),
            "'container.network_infos'",
        ),
        (container.hostname.is_some(), "'container.hostname'"),
        (container.rlimit_info.is_some(), "'container.rlimit_info'"),
        (container.tty_info.is_some(), "'container.tty_info'"),
        (
            linux.is_some_and(|l| l.share_pid_namespace.is_some()),
            "'container.linux_info.share_pid_namespace'",
        ),
        (
            linux.is_some_and(|l| l.ipc_mode.is_some() || l.shm_size.is_some()),
            "'container.linux_info.ipc_mode'/'shm_size'",
        ),
        (
            linux.is_some_and(|l| l.share_cgroups == Some(false)),
            "'container.linux_info.share_cgroups'",
        ),
    ];
    first_present(unsupported).map_or(Ok(()), Err)
}

/// What a task group's executor may be: Mesos's default executor (the
/// agent runs the group itself), without a command or container of its own.
fn refuse_unsupported_executor(executor: &ExecutorInfo) -> Result<(), String> {
    use butte_api::mesos::v1::executor_info::Type;
    let unsupported = [
        (
            executor.r#type.is_some() && executor.r#type() != Type::Default,
            "a CUSTOM 'executor.type' (only DEFAULT)",
        ),
        (executor.command.is_some(), "'executor.command'"),
        (executor.container.is_some(), "'executor.container'"),
    ];
    match first_present(unsupported) {
        Some(field) => Err(format!(
            "the task group's executor: {field} is not supported by this cluster yet"
        )),
        None => Ok(()),
    }
}

/// Checks that a task carries one of command or executor, well formed (its
/// executor's id by the id rule).
fn validate_task_body(task: &TaskInfo, in_group: bool) -> Result<(), String> {
    refuse_unsupported(task, in_group)?;
    if let Some(executor) = &task.executor {
        check_id("executor.executor_id", &executor.executor_id.value)
            .map_err(|e| format!("task {}: {e}", task.task_id.value))?;
    }
    let id = task.task_id.value.as_str();
    match (&task.command, &task.executor, in_group) {
        (None, None, _) => Err(format!("task {id} has neither 'command' nor 'executor'")),
        (Some(_), Some(_), _) => Err(format!(
            "task {id} has both 'command' and 'executor'; give one"
        )),
        (_, Some(_), true) => Err(format!(
            "task {id} in a group must not have its own 'executor'"
        )),
        (Some(command), None, _) if command.value.as_deref().unwrap_or("").trim().is_empty() => {
            Err(format!(
                "task {id} has an empty command: set 'command.value'"
            ))
        }
        (None, Some(executor), false) if executor.executor_id.value.is_empty() => Err(format!(
            "task {id} has an executor with an empty 'executor_id'"
        )),
        _ => Ok(()),
    }
}

impl Master {
    /// Checks a task against its framework, the claimed offers' agent and
    /// what is left of them; answers the resources it uses.
    fn validate_task(
        &self,
        at: &Placement,
        task: &TaskInfo,
        budget: &Budget,
        in_group: bool,
    ) -> Result<Resources, String> {
        let id = task.task_id.value.as_str();
        let agent_id = at.agent_id;
        check_id("task_id", id).map_err(|e| e.to_string())?;
        let known = self
            .frameworks
            .get(at.framework_id)
            .is_some_and(|f| f.tasks.contains_key(id));
        if known || budget.task_ids.contains(id) {
            return Err(format!(
                "task id {id:?} is already in use by this framework"
            ));
        }
        if task.agent_id.value != agent_id {
            return Err(format!(
                "task {id} names agent {} but the offers are from agent {agent_id}",
                task.agent_id.value
            ));
        }
        validate_task_body(task, in_group)?;
        // The user it runs as: its command's, else its framework's.
        let framework = self.frameworks.get(at.framework_id).map(|f| &f.info);
        let user = task
            .command
            .as_ref()
            .and_then(|c| c.user.as_deref())
            .or(framework.map(|f| f.user.as_str()));
        self.acls.check(
            crate::acls::Action::RunTasks,
            framework.and_then(|f| f.principal.as_deref()),
            user,
        )?;
        let resources = task_resources(task, !in_group)?;
        // A task alone always gets a CPU share and a memory limit (a group's
        // tasks are sized together with their executor: see validate_group).
        if !in_group && (resources.scalar("cpus") <= 0.0 || resources.scalar("mem") <= 0.0) {
            return Err(format!(
                "task {id} asks for cpus {} and mem {}; every task needs both above 0 (its CPU share and memory limit)",
                resources.scalar("cpus"),
                resources.scalar("mem")
            ));
        }
        let available = &budget.remaining;
        if !available.contains(&resources) {
            return Err(format!(
                "task {id} uses {resources}, more than the offers hold ({available})"
            ));
        }
        Ok(resources)
    }

    /// Checks a task group whole; answers what would be left after it and
    /// its tasks with their resources (the executor's with the first task).
    fn validate_group(
        &self,
        at: &Placement,
        executor: &ExecutorInfo,
        group: &TaskGroupInfo,
        budget: &Budget,
    ) -> Result<(Budget, Vec<(TaskInfo, Resources)>), String> {
        check_id("executor.executor_id", &executor.executor_id.value)
            .map_err(|e| format!("the task group's executor: {e}"))?;
        refuse_unsupported_executor(executor)?;
        if group.tasks.is_empty() {
            return Err("the task group has no tasks".to_owned());
        }
        let mut budget = budget.clone();
        let executor_resources =
            Resources::from_proto(&executor.resources).map_err(|e| e.to_string())?;
        if !budget.remaining.contains(&executor_resources) {
            return Err(format!(
                "the executor uses {executor_resources}, more than the offers hold ({})",
                budget.remaining
            ));
        }
        budget.remaining.subtract_contained(&executor_resources);
        let mut valid = Vec::new();
        for task in &group.tasks {
            let resources = self
                .validate_task(at, task, &budget, true)
                .map_err(|message| format!("task {}: {message}", task.task_id.value))?;
            budget.take(&task.task_id.value, &resources);
            valid.push((task.clone(), resources));
        }
        // The group's cgroup is sized from all of it: it needs a CPU share
        // and a memory limit.
        let mut whole = executor_resources.clone();
        for (_, resources) in &valid {
            whole.add(resources);
        }
        if whole.scalar("cpus") <= 0.0 || whole.scalar("mem") <= 0.0 {
            return Err(format!(
                "the task group and its executor ask for cpus {} and mem {}; a group needs both above 0 (its CPU share and memory limit)",
                whole.scalar("cpus"),
                whole.scalar("mem")
            ));
        }
        // The executor's own resources stay allocated with the first task.
        if let Some(first) = valid.first_mut() {
            first.1.add(&executor_resources);
        }
        Ok((budget, valid))
    }

    /// Applies one ACCEPT operation to what is left of the claimed offers.
    pub(super) fn apply_operation(&mut self, at: &Placement, op: Operation, budget: &mut Budget) {
        match op.r#type() {
            operation::Type::Launch => {
                if let Some(launch) = op.launch {
                    self.launch_tasks(at, launch.task_infos, budget);
                }
            }
            operation::Type::LaunchGroup => {
                if let Some(launch) = op.launch_group {
                    self.launch_group(at, launch.executor, launch.task_group, budget);
                }
            }
            other => self.refuse_operation(at.framework_id, other, op.id),
        }
    }

    /// An offer operation this master does not implement: an ERROR event
    /// naming it, and OPERATION_ERROR for it when the framework gave it an id.
    fn refuse_operation(
        &self,
        framework_id: &str,
        kind: operation::Type,
        id: Option<butte_api::mesos::v1::OperationId>,
    ) {
        let message = format!(
            "offer operation {} is not supported by this master yet; only LAUNCH and LAUNCH_GROUP are (its resources stay unused)",
            kind.as_str_name()
        );
        tracing::warn!(framework_id, %message, "offer operation refused");
        self.send_event(framework_id, error_event(&message));
        if let Some(operation_id) = id {
            let status = butte_api::mesos::v1::OperationStatus {
                operation_id: Some(operation_id),
                state: butte_api::mesos::v1::OperationState::OperationError as i32,
                message: Some(message),
                ..Default::default()
            };
            self.send_event(
                framework_id,
                Event {
                    r#type: Some(event::Type::UpdateOperationStatus as i32),
                    update_operation_status: Some(event::UpdateOperationStatus { status }),
                    ..Default::default()
                },
            );
        }
    }

    /// LAUNCH: each valid task launches; each invalid one gets TASK_ERROR.
    fn launch_tasks(&mut self, at: &Placement, tasks: Vec<TaskInfo>, budget: &mut Budget) {
        let mut valid = Vec::new();
        for task in tasks {
            match self.validate_task(at, &task, budget, false) {
                Ok(resources) => {
                    budget.take(&task.task_id.value, &resources);
                    valid.push((task, resources));
                }
                Err(message) => self.task_error(
                    at.framework_id,
                    &task,
                    task_status::Reason::TaskInvalid,
                    &message,
                ),
            }
        }
        if !valid.is_empty() {
            self.launch(at, valid, None, None);
        }
    }

    /// LAUNCH_GROUP: the group launches whole, or each task gets TASK_ERROR.
    fn launch_group(
        &mut self,
        at: &Placement,
        executor: ExecutorInfo,
        group: TaskGroupInfo,
        budget: &mut Budget,
    ) {
        match self.validate_group(at, &executor, &group, budget) {
            Ok((left, valid)) => {
                *budget = left;
                self.launch(at, valid, Some(executor), Some(group));
            }
            Err(message) => {
                for task in &group.tasks {
                    self.task_error(
                        at.framework_id,
                        task,
                        task_status::Reason::TaskGroupInvalid,
                        &message,
                    );
                }
            }
        }
    }

    /// Answers every task of an ACCEPT whose offers are not valid with
    /// TASK_DROPPED (partition-aware frameworks) or TASK_LOST.
    pub(super) fn drop_launches(
        &mut self,
        framework_id: &str,
        operations: &[Operation],
        why: &str,
    ) {
        let partition_aware = self
            .frameworks
            .get(framework_id)
            .is_some_and(|f| f.has_capability(capability::Type::PartitionAware));
        let state = if partition_aware {
            TaskState::TaskDropped
        } else {
            TaskState::TaskLost
        };
        for task in operations.iter().flat_map(tasks_of) {
            self.counters.tasks_invalid += 1;
            let reason = task_status::Reason::InvalidOffers;
            let status = master_status(&task.task_id, Some(&task.agent_id), state, reason, why);
            self.send_update_without_ack(framework_id, status);
        }
    }

    fn task_error(
        &mut self,
        framework_id: &str,
        task: &TaskInfo,
        reason: task_status::Reason,
        message: &str,
    ) {
        self.counters.tasks_invalid += 1;
        tracing::info!(
            framework_id,
            task_id = task.task_id.value,
            message,
            "task refused"
        );
        let status = master_status(
            &task.task_id,
            Some(&task.agent_id),
            TaskState::TaskError,
            reason,
            message,
        );
        self.send_update_without_ack(framework_id, status);
    }

    /// Records the validated tasks as staging and sends them to the agent;
    /// if the agent is gone they are lost at once.
    fn launch(
        &mut self,
        at: &Placement,
        tasks: Vec<(TaskInfo, Resources)>,
        executor: Option<ExecutorInfo>,
        group: Option<TaskGroupInfo>,
    ) {
        let retry = self.update_retry();
        let Some(framework) = self.frameworks.get_mut(at.framework_id) else {
            return;
        };
        let framework_info = framework.info.clone();
        let mut staged = Vec::new();
        for (info, resources) in &tasks {
            let task = staging_task(at, info, resources, executor.as_ref(), &framework_info);
            staged.push(task.clone());
            let entry = TaskEntry::launched(task, at.role, resources.clone(), retry);
            framework.tasks.insert(info.task_id.value.clone(), entry);
        }
        self.counters.tasks_launched += tasks.len() as u64;
        let message = link::LaunchTasks {
            framework_info,
            tasks: if group.is_some() {
                Vec::new()
            } else {
                tasks.into_iter().map(|(t, _)| t).collect()
            },
            executor,
            task_group: group,
        };
        for task in &staged {
            let result = self.registry.put_staging_task(task, &message);
            self.persist(result);
        }
        let kept = std::sync::Arc::new(message.clone());
        if let Some(framework) = self.frameworks.get_mut(at.framework_id) {
            for task in &staged {
                if let Some(entry) = framework.tasks.get_mut(&task.task_id.value) {
                    entry.launch = Some(kept.clone());
                }
            }
        }
        if !self.send_to_agent(
            at.agent_id,
            link::master_message::Kind::LaunchTasks(message),
        ) {
            // The agent went away between offer and launch: the tasks are lost.
            for task in staged {
                let status = TaskStatus {
                    uuid: Some(new_uuid()),
                    ..master_status(
                        &task.task_id,
                        Some(&task.agent_id),
                        TaskState::TaskLost,
                        task_status::Reason::AgentDisconnected,
                        "the agent disconnected before the launch reached it",
                    )
                };
                self.apply_update(at.framework_id, status, false);
            }
        }
    }

    /// KILL: asks the agent to kill the task; an unknown task is answered
    /// with its reconciled state so the scheduler learns it is gone.
    pub fn kill(&mut self, framework_id: &str, kill: &call::Kill) {
        let task_id = kill.task_id.value.as_str();
        let entry = self
            .frameworks
            .get(framework_id)
            .and_then(|f| f.tasks.get(task_id));
        match entry {
            Some(entry) if !is_terminal(entry.state()) => {
                let agent_id = entry.task.agent_id.value.clone();
                let sent = self.send_to_agent(
                    &agent_id,
                    link::master_message::Kind::KillTask(link::KillTask {
                        framework_id: FrameworkId {
                            value: framework_id.to_owned(),
                        },
                        task_id: kill.task_id.clone(),
                        kill_policy: kill.kill_policy,
                    }),
                );
                if !sent {
                    tracing::info!(
                        framework_id,
                        task_id,
                        "kill for a task on a disconnected agent; it is killed when the agent returns"
                    );
                }
            }
            Some(_) => {}
            None => {
                let status =
                    self.reconciled_status(framework_id, &kill.task_id, kill.agent_id.as_ref());
                self.send_update_without_ack(framework_id, status);
            }
        }
    }

    pub fn shutdown_executor(&mut self, framework_id: &str, shutdown: &call::Shutdown) {
        self.send_to_agent(
            &shutdown.agent_id.value,
            link::master_message::Kind::ShutdownExecutor(link::ShutdownExecutor {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                executor_id: shutdown.executor_id.clone(),
            }),
        );
    }

    pub fn message(&mut self, framework_id: &str, message: &call::Message) {
        let sent = self.send_to_agent(
            &message.agent_id.value,
            link::master_message::Kind::FrameworkMessage(link::FrameworkMessage {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                executor_id: message.executor_id.clone(),
                data: message.data.clone(),
            }),
        );
        if !sent {
            tracing::info!(
                framework_id,
                agent_id = message.agent_id.value,
                "message dropped: agent not connected"
            );
        }
    }
}

/// A launched task as the master records it: staging, on the offers' agent and role.
fn staging_task(
    at: &Placement,
    info: &TaskInfo,
    resources: &Resources,
    executor: Option<&ExecutorInfo>,
    framework: &FrameworkInfo,
) -> Task {
    Task {
        name: info.name.clone(),
        task_id: info.task_id.clone(),
        framework_id: FrameworkId {
            value: at.framework_id.to_owned(),
        },
        executor_id: executor
            .map(|e| e.executor_id.clone())
            .or_else(|| info.executor.as_ref().map(|e| e.executor_id.clone())),
        agent_id: AgentId {
            value: at.agent_id.to_owned(),
        },
        state: TaskState::TaskStaging as i32,
        resources: resources.to_proto(Some(at.role)),
        labels: info.labels.clone(),
        container: info.container.clone(),
        user: framework.user.clone().into(),
        ..Default::default()
    }
}
