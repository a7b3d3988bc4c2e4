//! The agent's tasks and what happens to them: launch into a container,
//! supervise, kill, report, clean up. State sits behind one lock that is
//! never held across an await; slow work (cgroups, the launcher) runs outside.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{
    AgentId, FrameworkId, FrameworkInfo, Task, TaskId, TaskInfo, TaskState, TaskStatus, task_status,
};
use butte_api::resources::Resources;
use butte_isolators::cgroups::{Isolator, Limits};
use tokio::sync::mpsc;

use crate::checkpoint::Checkpoint;
use crate::config::AgentConfig;
use crate::launcher::LaunchRequest;
use crate::launcher_client::{ContainerExit, LauncherClient};

/// Grace period between SIGTERM and SIGKILL when the kill policy names none
/// (Mesos's command executor default).
const DEFAULT_GRACE: Duration = Duration::from_secs(3);

type TaskKey = (String, String);

pub struct TaskRecord {
    pub info: TaskInfo,
    pub framework_id: String,
    pub state: TaskState,
    pub container_id: String,
    pub resources: Resources,
    pub sandbox: PathBuf,
    pub killing: bool,
    pub launched_at: Instant,
}

/// Status updates waiting for the master's acknowledgement, per task, in order.
#[derive(Default)]
struct UpdateStream {
    queue: VecDeque<link::StatusUpdate>,
    sent_at: Option<Instant>,
}

pub struct AgentState {
    pub agent_id: Option<String>,
    pub total: Resources,
    pub tasks: HashMap<TaskKey, TaskRecord>,
    containers: HashMap<String, TaskKey>,
    updates: BTreeMap<TaskKey, UpdateStream>,
    frameworks: HashMap<String, FrameworkInfo>,
    outbound: Option<mpsc::UnboundedSender<link::AgentMessage>>,
    /// Clone-to-exec times of recent launches, microseconds (for /metrics and the benchmark).
    pub launch_micros: VecDeque<u64>,
}

#[derive(Clone)]
pub struct Agent {
    state: Arc<Mutex<AgentState>>,
    pub config: Arc<AgentConfig>,
    isolator: Arc<dyn Isolator>,
    launcher: LauncherClient,
    checkpoint: Arc<Checkpoint>,
}

fn new_uuid() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        total: Resources,
        isolator: Arc<dyn Isolator>,
        launcher: LauncherClient,
    ) -> Self {
        let checkpoint = Arc::new(Checkpoint::new(&config.work_dir));
        let state = AgentState {
            agent_id: checkpoint.agent_id(),
            total,
            tasks: HashMap::new(),
            containers: HashMap::new(),
            updates: BTreeMap::new(),
            frameworks: HashMap::new(),
            outbound: None,
            launch_micros: VecDeque::new(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            config: Arc::new(config),
            isolator,
            launcher,
            checkpoint,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes containers a previous run left behind (it died without cleaning up).
    pub fn remove_leftovers(&self) {
        match self.isolator.list() {
            Ok(ids) => {
                let prefix = self.config.container_prefix();
                for id in ids.into_iter().filter(|id| id.starts_with(&prefix)) {
                    tracing::warn!(
                        container_id = id,
                        "removing a container left by a previous agent run"
                    );
                    if let Err(error) = self.isolator.destroy(&id) {
                        tracing::error!(container_id = id, %error, "cannot remove leftover container");
                    }
                }
            }
            Err(error) => tracing::error!(%error, "cannot list leftover containers"),
        }
    }

    // ---- the link -------------------------------------------------------------------

    /// A new link to the master: what to register with.
    pub fn register_message(
        &self,
        outbound: mpsc::UnboundedSender<link::AgentMessage>,
    ) -> link::AgentMessage {
        let mut state = self.lock();
        state.outbound = Some(outbound);
        let running: Vec<Task> = state
            .tasks
            .values()
            .map(|r| task_proto(r, state.agent_id.as_deref()))
            .collect();
        link::AgentMessage {
            kind: Some(agent_message::Kind::Register(link::Register {
                agent_info: butte_api::mesos::v1::AgentInfo {
                    hostname: self.config.hostname(),
                    port: Some(i32::from(self.config.port)),
                    id: state.agent_id.clone().map(|value| AgentId { value }),
                    ..Default::default()
                },
                total_resources: state.total.to_proto(None),
                running_tasks: running,
                frameworks: state.frameworks.values().cloned().collect(),
                version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            })),
        }
    }

    pub fn registered(&self, agent_id: String) {
        if let Err(error) = self.checkpoint.set_agent_id(&agent_id) {
            tracing::error!(%error, "cannot checkpoint the agent id");
        }
        let mut state = self.lock();
        state.agent_id = Some(agent_id);
        // A new link has seen none of our pending updates.
        for stream in state.updates.values_mut() {
            stream.sent_at = None;
        }
        drop(state);
        self.flush_updates();
    }

    pub fn disconnected(&self) {
        self.lock().outbound = None;
    }

    pub fn handle(&self, message: link::master_message::Kind) {
        use link::master_message::Kind;
        match message {
            Kind::LaunchTasks(launch) => {
                let mut tasks = launch.tasks;
                // Task groups run each task in its own container for now (no shared pid namespace yet).
                tasks.extend(launch.task_group.map(|g| g.tasks).unwrap_or_default());
                for task in tasks {
                    let agent = self.clone();
                    let framework = launch.framework_info.clone();
                    tokio::spawn(async move { agent.launch(framework, task).await });
                }
            }
            Kind::KillTask(kill) => {
                let grace = kill
                    .kill_policy
                    .and_then(|p| p.grace_period)
                    .map(|d| Duration::from_nanos(d.nanoseconds.max(0) as u64))
                    .unwrap_or(DEFAULT_GRACE);
                self.kill(&kill.framework_id.value, &kill.task_id.value, grace);
            }
            Kind::ShutdownFramework(shutdown) => {
                let keys: Vec<TaskKey> = self
                    .lock()
                    .tasks
                    .keys()
                    .filter(|(f, _)| *f == shutdown.framework_id.value)
                    .cloned()
                    .collect();
                for (framework_id, task_id) in keys {
                    self.kill(&framework_id, &task_id, Duration::ZERO);
                }
            }
            Kind::StatusAck(ack) => {
                self.acknowledged(&ack.framework_id.value, &ack.task_id.value, &ack.uuid)
            }
            Kind::Refused(refused) => {
                tracing::error!(message = refused.message, "the master refused this agent")
            }
            Kind::FrameworkMessage(_) | Kind::ShutdownExecutor(_) => {
                tracing::debug!("no custom executors run here yet; message dropped");
            }
            Kind::Registered(_) | Kind::Heartbeat(_) => {}
        }
    }

    // ---- status updates -----------------------------------------------------------------

    fn update(
        &self,
        framework_id: &str,
        task_id: &str,
        state: TaskState,
        message: Option<String>,
        reason: Option<task_status::Reason>,
    ) {
        let mut guard = self.lock();
        let agent_id = guard.agent_id.clone();
        let key = (framework_id.to_owned(), task_id.to_owned());
        if let Some(record) = guard.tasks.get_mut(&key) {
            record.state = state;
        }
        let status = TaskStatus {
            task_id: TaskId {
                value: task_id.to_owned(),
            },
            state: state as i32,
            message,
            source: Some(task_status::Source::Executor as i32),
            reason: reason.map(|r| r as i32),
            agent_id: agent_id.map(|value| AgentId { value }),
            timestamp: Some(crate::unix_now()),
            uuid: Some(new_uuid()),
            ..Default::default()
        };
        let update = link::StatusUpdate {
            framework_id: FrameworkId {
                value: framework_id.to_owned(),
            },
            status,
        };
        guard
            .updates
            .entry(key.clone())
            .or_default()
            .queue
            .push_back(update);
        let task = guard
            .tasks
            .get(&key)
            .map(|r| task_proto(r, guard.agent_id.as_deref()));
        drop(guard);
        if let Some(task) = task
            && let Err(error) = self.checkpoint.task(&task)
        {
            tracing::error!(%error, task_id, "cannot checkpoint the task");
        }
        self.flush_updates();
    }

    /// Sends each task's oldest unacknowledged update when due.
    pub fn flush_updates(&self) {
        let retry = Duration::from_secs_f64(self.config.status_update_retry.max(0.1));
        let mut state = self.lock();
        let Some(outbound) = state.outbound.clone() else {
            return;
        };
        let now = Instant::now();
        for stream in state.updates.values_mut() {
            let Some(head) = stream.queue.front() else {
                continue;
            };
            if stream
                .sent_at
                .is_none_or(|at| now.duration_since(at) >= retry)
            {
                stream.sent_at = Some(now);
                let _ = outbound.send(link::AgentMessage {
                    kind: Some(agent_message::Kind::StatusUpdate(head.clone())),
                });
            }
        }
    }

    fn acknowledged(&self, framework_id: &str, task_id: &str, uuid: &[u8]) {
        let key = (framework_id.to_owned(), task_id.to_owned());
        let mut state = self.lock();
        let Some(stream) = state.updates.get_mut(&key) else {
            return;
        };
        if stream
            .queue
            .front()
            .is_none_or(|u| u.status.uuid.as_deref() != Some(uuid))
        {
            return;
        }
        stream.queue.pop_front();
        stream.sent_at = None;
        let drained = stream.queue.is_empty();
        let finished = drained && !state.tasks.contains_key(&key);
        if drained {
            state.updates.remove(&key);
        }
        drop(state);
        if finished && let Err(error) = self.checkpoint.remove_task(framework_id, task_id) {
            tracing::error!(%error, task_id, "cannot remove the task's checkpoint");
        }
        self.flush_updates();
    }

    // ---- launch, exit, kill ---------------------------------------------------------------

    async fn launch(&self, framework: FrameworkInfo, task: TaskInfo) {
        let framework_id = framework
            .id
            .as_ref()
            .map_or(String::new(), |f| f.value.clone());
        let task_id = task.task_id.value.clone();
        let key = (framework_id.clone(), task_id.clone());
        let resources = Resources::from_proto(&task.resources).unwrap_or_default();
        let container_id = format!(
            "{}{}",
            self.config.container_prefix(),
            uuid::Uuid::new_v4().simple()
        );
        let sandbox = self
            .config
            .work_dir
            .join("sandboxes")
            .join(&framework_id)
            .join(&task_id)
            .join(&container_id);
        {
            let mut state = self.lock();
            if state.tasks.contains_key(&key) {
                drop(state);
                tracing::warn!(task_id, "launch of a task that already runs here; ignored");
                return;
            }
            let mut used = Resources::new();
            for record in state.tasks.values() {
                used.add(&record.resources);
            }
            used.add(&resources);
            let fits = state.total.contains(&used);
            state
                .frameworks
                .insert(framework_id.clone(), framework.clone());
            state.tasks.insert(
                key.clone(),
                TaskRecord {
                    info: task.clone(),
                    framework_id: framework_id.clone(),
                    state: TaskState::TaskStaging,
                    container_id: container_id.clone(),
                    resources: resources.clone(),
                    sandbox: sandbox.clone(),
                    killing: false,
                    launched_at: Instant::now(),
                },
            );
            state.containers.insert(container_id.clone(), key.clone());
            if !fits {
                drop(state);
                self.finish(
                    &key,
                    TaskState::TaskFailed,
                    "the task's resources are more than this agent has free".into(),
                    Some(task_status::Reason::ContainerLaunchFailed),
                );
                return;
            }
        }
        if let Err(error) = self.checkpoint.framework(&framework) {
            tracing::error!(%error, "cannot checkpoint the framework");
        }
        self.update(&framework_id, &task_id, TaskState::TaskStarting, None, None);

        match self
            .start_container(&framework, &task, &container_id, &sandbox, &resources)
            .await
        {
            Ok(micros) => {
                let mut state = self.lock();
                push_bounded(&mut state.launch_micros, micros);
                let killed_meanwhile = state.tasks.get(&key).is_some_and(|r| r.killing);
                drop(state);
                if !killed_meanwhile {
                    self.update(&framework_id, &task_id, TaskState::TaskRunning, None, None);
                }
            }
            Err(message) => {
                tracing::warn!(task_id, message, "launch failed");
                self.finish(
                    &key,
                    TaskState::TaskFailed,
                    message,
                    Some(task_status::Reason::ContainerLaunchFailed),
                );
            }
        }
    }

    async fn start_container(
        &self,
        framework: &FrameworkInfo,
        task: &TaskInfo,
        container_id: &str,
        sandbox: &std::path::Path,
        resources: &Resources,
    ) -> Result<u64, String> {
        std::fs::create_dir_all(sandbox)
            .map_err(|e| format!("cannot create the sandbox {}: {e}", sandbox.display()))?;
        let limits = Limits {
            cpus: resources.scalar("cpus"),
            mem_mb: resources.scalar("mem"),
            pids_max: self.config.task_pids_max,
        };
        let placement = self
            .isolator
            .create(container_id, &limits)
            .map_err(|e| e.to_string())?;
        let argv = command_argv(task)?;
        let agent_id = self.lock().agent_id.clone().unwrap_or_default();
        let mut env = vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOME".to_owned(), sandbox.display().to_string()),
            ("MESOS_SANDBOX".to_owned(), sandbox.display().to_string()),
            ("MESOS_DIRECTORY".to_owned(), sandbox.display().to_string()),
            ("MESOS_TASK_ID".to_owned(), task.task_id.value.clone()),
            ("MESOS_EXECUTOR_ID".to_owned(), task.task_id.value.clone()),
            (
                "MESOS_FRAMEWORK_ID".to_owned(),
                framework
                    .id
                    .as_ref()
                    .map_or(String::new(), |f| f.value.clone()),
            ),
            ("MESOS_AGENT_ID".to_owned(), agent_id.clone()),
            ("MESOS_SLAVE_ID".to_owned(), agent_id),
            (
                "MESOS_AGENT_ENDPOINT".to_owned(),
                format!("{}:{}", self.config.ip, self.config.port),
            ),
            ("MESOS_CONTAINER_ID".to_owned(), container_id.to_owned()),
        ];
        if let Some(environment) = task.command.as_ref().and_then(|c| c.environment.as_ref()) {
            for variable in &environment.variables {
                env.retain(|(k, _)| *k != variable.name);
                env.push((
                    variable.name.clone(),
                    variable.value.clone().unwrap_or_default(),
                ));
            }
        }
        let request = LaunchRequest {
            container_id: container_id.to_owned(),
            argv,
            env,
            sandbox: sandbox.to_owned(),
            hostname: task.task_id.value.clone(),
            cgroup: placement.unified,
            v1_procs: placement.v1_procs,
            tmp_mb: resources.scalar("mem").clamp(1.0, 1024.0) as u64,
        };
        match self.launcher.launch(request).await {
            Ok((_, micros)) => Ok(micros),
            Err(error) => {
                let _ = self.isolator.destroy(container_id);
                Err(format!("container launch failed: {error}"))
            }
        }
    }

    /// A container's first process ended: the task's last state, then cleanup.
    pub fn container_exited(&self, container_id: &str, exit: ContainerExit) {
        let Some(key) = self.lock().containers.get(container_id).cloned() else {
            return;
        };
        let killing = self.lock().tasks.get(&key).is_some_and(|r| r.killing);
        let oom = exit.signal == Some(libc::SIGKILL)
            && self.isolator.oom_killed(container_id).unwrap_or(false);
        let (state, message, reason) = if oom {
            (
                TaskState::TaskFailed,
                "the task used more memory than its 'mem' and the OOM killer ended it".to_owned(),
                Some(task_status::Reason::ContainerLimitationMemory),
            )
        } else if killing {
            (TaskState::TaskKilled, "killed as asked".to_owned(), None)
        } else {
            match (exit.code, exit.signal) {
                (Some(0), _) => (
                    TaskState::TaskFinished,
                    "Command exited with status 0".to_owned(),
                    None,
                ),
                (Some(code), _) => (
                    TaskState::TaskFailed,
                    format!("Command exited with status {code}"),
                    Some(task_status::Reason::CommandExecutorFailed),
                ),
                (None, Some(signal)) => (
                    TaskState::TaskFailed,
                    format!("Command terminated by signal {signal}"),
                    Some(task_status::Reason::CommandExecutorFailed),
                ),
                (None, None) => (
                    TaskState::TaskFailed,
                    "Command ended for an unknown reason".to_owned(),
                    None,
                ),
            }
        };
        self.finish(&key, state, message, reason);
    }

    /// Ends a task: removes its container and reports its terminal state.
    fn finish(
        &self,
        key: &TaskKey,
        state: TaskState,
        message: String,
        reason: Option<task_status::Reason>,
    ) {
        let container_id = self.lock().tasks.get(key).map(|r| r.container_id.clone());
        if let Some(container_id) = &container_id
            && let Err(error) = self.isolator.destroy(container_id)
        {
            tracing::error!(container_id, %error, "cannot remove the task's cgroups");
        }
        self.update(&key.0, &key.1, state, Some(message), reason);
        let mut guard = self.lock();
        guard.tasks.remove(key);
        if let Some(container_id) = container_id {
            guard.containers.remove(&container_id);
        }
    }

    /// SIGTERM to every process of the task, SIGKILL when `grace` runs out.
    pub fn kill(&self, framework_id: &str, task_id: &str, grace: Duration) {
        let key = (framework_id.to_owned(), task_id.to_owned());
        let container_id = {
            let mut state = self.lock();
            let Some(record) = state.tasks.get_mut(&key) else {
                drop(state);
                tracing::info!(task_id, "kill for a task not running here");
                return;
            };
            record.killing = true;
            record.container_id.clone()
        };
        if !grace.is_zero() {
            for pid in self.isolator.pids(&container_id).unwrap_or_default() {
                // SAFETY: kill(2) has no memory effects; pids come from the task's own cgroup.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let launcher = self.launcher.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // Killing the pid namespace's init takes down every process in it.
            let _ = launcher.signal(&container_id, libc::SIGKILL).await;
        });
    }

    /// Kills every task (the agent is stopping) and waits for their cleanup.
    pub async fn shutdown(&self) {
        let keys: Vec<TaskKey> = self.lock().tasks.keys().cloned().collect();
        for (framework_id, task_id) in &keys {
            self.kill(framework_id, task_id, Duration::ZERO);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.lock().tasks.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn push_bounded(queue: &mut VecDeque<u64>, value: u64) {
    if queue.len() >= 10_000 {
        queue.pop_front();
    }
    queue.push_back(value);
}

/// The argv of a command task: `sh -c VALUE` for shell commands (the
/// default), else VALUE with `arguments` as argv.
fn command_argv(task: &TaskInfo) -> Result<Vec<String>, String> {
    let command = task
        .command
        .as_ref()
        .ok_or("the task has no command (custom executors are not supported yet)")?;
    let value = command.value.clone().unwrap_or_default();
    if command.shell.unwrap_or(true) {
        return Ok(vec!["/bin/sh".into(), "-c".into(), value]);
    }
    let mut argv = command.arguments.clone();
    if argv.is_empty() {
        argv.push(value.clone());
    }
    // `value` is the program; arguments[0] is what it sees as argv[0].
    argv[0] = value;
    Ok(argv)
}

fn task_proto(record: &TaskRecord, agent_id: Option<&str>) -> Task {
    Task {
        name: record.info.name.clone(),
        task_id: record.info.task_id.clone(),
        framework_id: FrameworkId {
            value: record.framework_id.clone(),
        },
        agent_id: AgentId {
            value: agent_id.unwrap_or_default().to_owned(),
        },
        state: record.state as i32,
        resources: record.info.resources.clone(),
        labels: record.info.labels.clone(),
        ..Default::default()
    }
}
