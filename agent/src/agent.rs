//! The agent's tasks and what happens to them: launch into a container,
//! supervise, kill, report, clean up. State sits behind one lock that is
//! never held across an await; slow work (cgroups, the launcher) runs outside.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use butte_agent_ebpf::accounting::{Accounting, Event, EventKind};
use butte_agent_ebpf::devices::{DeviceFence, DeviceRule, default_rules, v1_rule};
use butte_agent_ebpf::network::{self, Network};
use butte_agent_ebpf::ports::{PortFence, cgroup_id};
use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{
    AgentId, ExecutorInfo, FrameworkId, FrameworkInfo, Label, Labels, Task, TaskId, TaskInfo,
    TaskState, TaskStatus, task_status,
};
use butte_api::resources::Resources;
use butte_api::telemetry::v1::TaskSample;
use butte_isolators::cgroups::{Isolator, Limits, Placement};
use tokio::sync::mpsc;

use crate::checkpoint::Checkpoint;
use crate::config::AgentConfig;
use crate::gpus::{Assignment, Fault, GpuBooks, Gpus, label};
use crate::launcher::LaunchRequest;
use crate::launcher_client::{ContainerExit, LauncherClient};

/// Grace period between SIGTERM and SIGKILL when the kill policy names none
/// (Mesos's command executor default).
const DEFAULT_GRACE: Duration = Duration::from_secs(3);

pub type TaskKey = (String, String);

pub struct TaskRecord {
    pub info: TaskInfo,
    pub framework_id: String,
    pub state: TaskState,
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
    pub killing: bool,
    /// The GPUs its container was given.
    pub gpus: Option<Assignment>,
}

/// Where a task staged for launch lives: its own container, or a group's.
struct Placing<'a> {
    container_id: &'a str,
    cgroup_id: &'a str,
    group: Option<&'a str>,
    executor_id: &'a str,
    sandbox: PathBuf,
}

impl AgentState {
    /// Records a task as TASK_STAGING in its container (and indexes the container).
    fn stage(
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
                framework_id: key.0.clone(),
                state: TaskState::TaskStaging,
                container_id: placing.container_id.to_owned(),
                cgroup_id: placing.cgroup_id.to_owned(),
                group: placing.group.map(str::to_owned),
                executor_id: placing.executor_id.to_owned(),
                resources,
                sandbox: placing.sandbox,
                killing: false,
                gpus: None,
            },
        );
        self.containers
            .insert(placing.container_id.to_owned(), key.clone());
    }
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
    /// Running task groups: the group container and its tasks still alive.
    groups: HashMap<String, Vec<TaskKey>>,
    updates: BTreeMap<TaskKey, UpdateStream>,
    frameworks: HashMap<String, FrameworkInfo>,
    outbound: Option<mpsc::UnboundedSender<link::AgentMessage>>,
    /// Clone-to-exec times of recent launches, microseconds (for /metrics and the benchmark).
    pub launch_micros: VecDeque<u64>,
    /// eBPF map keys (v2 cgroup ids) of fenced containers.
    pub(crate) fence_keys: HashMap<String, u64>,
    /// Process events counted per container (by eBPF key).
    pub(crate) event_counts: HashMap<u64, EventCounts>,
    /// Containers the OOM killer struck (from the event; their tasks fail with the memory reason).
    oom_struck: HashSet<String>,
    /// The last telemetry sample of each running task.
    pub latest: HashMap<TaskKey, TaskSample>,
    /// The GPUs, when the backend found any.
    pub gpus: Option<GpuBooks>,
}

/// A running task as the telemetry sampler sees it.
pub struct TaskView {
    pub key: TaskKey,
    pub executor_id: String,
    /// The container whose cgroup holds it (a group's, for a group task).
    pub container_id: String,
    /// Its cgroup's eBPF key.
    pub cgroup_key: u64,
    pub resources: Resources,
}

/// Process events seen in one container.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCounts {
    pub execs: u64,
    pub exits: u64,
    pub oom_kills: u64,
}

#[derive(Clone)]
pub struct Agent {
    state: Arc<Mutex<AgentState>>,
    pub config: Arc<AgentConfig>,
    isolator: Arc<dyn Isolator>,
    launcher: LauncherClient,
    checkpoint: Arc<Checkpoint>,
    /// The eBPF fences that loaded (none offers what it cannot enforce).
    fences: Arc<Mutex<Fences>>,
    /// Where GPU readings come from (NVML or the simulated file).
    pub gpu_backend: Option<Arc<dyn butte_gpu::GpuBackend>>,
}

/// The eBPF programs this agent runs; each is `None` when it could not load.
pub struct Fences {
    pub ports: Option<PortFence>,
    pub devices: Option<DeviceFence>,
    pub network: Option<Network>,
    pub accounting: Option<Accounting>,
}

/// Task label asking for ingress to be policed to the task's `network_bandwidth` too.
pub const POLICE_INGRESS_LABEL: &str = "butte.network_bandwidth.police_ingress";

fn new_uuid() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        total: Resources,
        isolator: Arc<dyn Isolator>,
        launcher: LauncherClient,
        fences: Fences,
        gpus: Option<Gpus>,
    ) -> Self {
        let (gpu_backend, gpus) = match gpus {
            Some(Gpus { backend, books }) => (Some(backend), Some(books)),
            None => (None, None),
        };
        let checkpoint = Arc::new(Checkpoint::new(&config.work_dir));
        let state = AgentState {
            agent_id: checkpoint.agent_id(),
            total,
            tasks: HashMap::new(),
            containers: HashMap::new(),
            groups: HashMap::new(),
            updates: BTreeMap::new(),
            frameworks: HashMap::new(),
            outbound: None,
            launch_micros: VecDeque::new(),
            fence_keys: HashMap::new(),
            event_counts: HashMap::new(),
            oom_struck: HashSet::new(),
            latest: HashMap::new(),
            gpus,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            config: Arc::new(config),
            isolator,
            launcher,
            checkpoint,
            fences: Arc::new(Mutex::new(fences)),
            gpu_backend,
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
                    attributes: state
                        .gpus
                        .as_ref()
                        .map(GpuBooks::attributes)
                        .unwrap_or_default(),
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
                if let Some(group) = launch.task_group {
                    let agent = self.clone();
                    let executor = launch.executor.unwrap_or_default();
                    tokio::spawn(async move {
                        agent
                            .launch_group(launch.framework_info, executor, group.tasks)
                            .await
                    });
                    return;
                }
                for task in launch.tasks {
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
        self.update_with(framework_id, task_id, state, message, reason, Vec::new());
    }

    /// A status update; a running task's carries the labels of its GPUs
    /// (which it was given and how they are linked) and `extra_labels`.
    fn update_with(
        &self,
        framework_id: &str,
        task_id: &str,
        state: TaskState,
        message: Option<String>,
        reason: Option<task_status::Reason>,
        extra_labels: Vec<Label>,
    ) {
        let mut guard = self.lock();
        let agent_id = guard.agent_id.clone();
        let key = (framework_id.to_owned(), task_id.to_owned());
        let mut labels = Vec::new();
        if let Some(record) = guard.tasks.get_mut(&key) {
            record.state = state;
            if state == TaskState::TaskRunning
                && let Some(gpus) = &record.gpus
            {
                labels = gpus.labels();
            }
        }
        labels.extend(extra_labels);
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
            labels: (!labels.is_empty()).then_some(Labels { labels }),
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
            let placing = Placing {
                container_id: &container_id,
                cgroup_id: &container_id,
                group: None,
                executor_id: &task.task_id.value,
                sandbox: sandbox.clone(),
            };
            state.stage(&key, &task, resources.clone(), placing);
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
            .start_container(&key, &framework, &task, &container_id, &sandbox, &resources)
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

    /// Launches a task group: one container (cgroup sized for all its tasks
    /// and its executor, pid/mount/uts/ipc namespaces held by an init), each
    /// task joining it with its own sandbox under the group's.
    async fn launch_group(
        &self,
        framework: FrameworkInfo,
        executor: ExecutorInfo,
        tasks: Vec<TaskInfo>,
    ) {
        let framework_id = framework
            .id
            .as_ref()
            .map_or(String::new(), |f| f.value.clone());
        let prefix = self.config.container_prefix();
        let group_id = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        let executor_id = if executor.executor_id.value.is_empty() {
            group_id.clone()
        } else {
            executor.executor_id.value.clone()
        };
        let group_sandbox = self
            .config
            .work_dir
            .join("sandboxes")
            .join(&framework_id)
            .join(&executor_id)
            .join(&group_id);
        let mut total = Resources::from_proto(&executor.resources).unwrap_or_default();
        let mut members = Vec::new();
        {
            let mut state = self.lock();
            state
                .frameworks
                .insert(framework_id.clone(), framework.clone());
            for task in &tasks {
                let key = (framework_id.clone(), task.task_id.value.clone());
                if state.tasks.contains_key(&key) {
                    continue;
                }
                let resources = Resources::from_proto(&task.resources).unwrap_or_default();
                total.add(&resources);
                let container_id = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
                let placing = Placing {
                    container_id: &container_id,
                    cgroup_id: &group_id,
                    group: Some(&group_id),
                    executor_id: &executor_id,
                    sandbox: group_sandbox.join("tasks").join(&task.task_id.value),
                };
                state.stage(&key, task, resources, placing);
                members.push(key);
            }
            state.groups.insert(group_id.clone(), members.clone());
        }
        if let Err(error) = self.checkpoint.framework(&framework) {
            tracing::error!(%error, "cannot checkpoint the framework");
        }
        for (_, task_id) in &members {
            self.update(&framework_id, task_id, TaskState::TaskStarting, None, None);
        }
        let police_ingress = tasks.iter().any(polices_ingress);
        let (placement, gpus) = match self
            .start_group_init(
                &group_id,
                &executor_id,
                &group_sandbox,
                &total,
                police_ingress,
            )
            .await
        {
            Ok(started) => started,
            Err(message) => {
                self.lock().groups.remove(&group_id);
                self.unfence(&group_id);
                let _ = self.isolator.destroy(&group_id);
                for key in &members {
                    self.finish(
                        key,
                        TaskState::TaskFailed,
                        message.clone(),
                        Some(task_status::Reason::ContainerLaunchFailed),
                    );
                }
                return;
            }
        };
        for key in &members {
            let Some((task, container_id, sandbox)) = self
                .lock()
                .tasks
                .get(key)
                .map(|r| (r.info.clone(), r.container_id.clone(), r.sandbox.clone()))
            else {
                continue;
            };
            self.set_gpus(key, &gpus);
            let launched = async {
                std::fs::create_dir_all(&sandbox)
                    .map_err(|e| format!("cannot create the sandbox {}: {e}", sandbox.display()))?;
                let mut env =
                    self.task_env(&framework, &task, &container_id, &sandbox, &executor_id);
                env.extend(gpus.iter().flat_map(Assignment::env));
                let request = LaunchRequest {
                    container_id: container_id.clone(),
                    argv: command_argv(&task)?,
                    env,
                    sandbox: sandbox.clone(),
                    hostname: executor_id.clone(),
                    cgroup: placement.unified.clone(),
                    v1_procs: placement.v1_procs.clone(),
                    tmp_mb: 1,
                    join: Some(group_id.clone()),
                };
                self.launcher
                    .launch(request)
                    .await
                    .map_err(|e| format!("joining the task group failed: {e}"))
            };
            match launched.await {
                Ok((_, micros)) => {
                    push_bounded(&mut self.lock().launch_micros, micros);
                    self.update(&key.0, &key.1, TaskState::TaskRunning, None, None);
                }
                Err(message) => {
                    self.finish(
                        key,
                        TaskState::TaskFailed,
                        message,
                        Some(task_status::Reason::ContainerLaunchFailed),
                    );
                    self.group_task_ended(&group_id, key, true);
                }
            }
        }
    }

    /// The task's environment: the Mesos variables, then the command's own.
    fn task_env(
        &self,
        framework: &FrameworkInfo,
        task: &TaskInfo,
        container_id: &str,
        sandbox: &std::path::Path,
        executor_id: &str,
    ) -> Vec<(String, String)> {
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
            ("MESOS_EXECUTOR_ID".to_owned(), executor_id.to_owned()),
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
        env
    }

    /// Fences the container's processes to its port ranges (none: only port
    /// 0) and to the default devices. On failure its cgroups are removed.
    fn fence(
        &self,
        container_id: &str,
        placement: &Placement,
        resources: &Resources,
        police_ingress: bool,
        granted_devices: &[DeviceRule],
    ) -> Result<(), String> {
        let fenced = (|| {
            let key = cgroup_id(&placement.unified).map_err(|e| e.to_string())?;
            // Recorded before any map entry is written, so a failure below
            // unfences whatever was written.
            self.lock().fence_keys.insert(container_id.to_owned(), key);
            let mut ranges = Vec::new();
            for &(begin, end) in resources
                .ranges("ports")
                .map(|r| r.ranges())
                .unwrap_or_default()
            {
                let (Ok(begin), Ok(end)) = (u16::try_from(begin), u16::try_from(end)) else {
                    return Err(format!("port range [{begin}-{end}] is outside 0-65535"));
                };
                ranges.push((begin, end));
            }
            // The v1 devices controller enforces on its own; eBPF on v2 too.
            let mut device_rules = default_rules();
            device_rules.extend_from_slice(granted_devices);
            let v1_rules: Vec<String> = device_rules.iter().map(v1_rule).collect();
            self.isolator
                .restrict_devices(container_id, &v1_rules)
                .map_err(|e| e.to_string())?;
            let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(ports) = fences.ports.as_mut() {
                ports.allow(key, &ranges).map_err(|e| e.to_string())?;
            }
            if let Some(devices) = fences.devices.as_mut() {
                devices
                    .allow(key, &device_rules)
                    .map_err(|e| e.to_string())?;
            }
            let bandwidth = resources.scalar("network_bandwidth");
            if let Some(network) = fences.network.as_mut() {
                let limits = network::Limits {
                    egress_mbit_per_s: (bandwidth > 0.0).then_some(bandwidth),
                    police_ingress,
                };
                network.track(key, limits).map_err(|e| e.to_string())?;
            }
            if let Some(accounting) = fences.accounting.as_mut() {
                accounting.track(key).map_err(|e| e.to_string())?;
            }
            Ok(())
        })();
        if fenced.is_err() {
            self.unfence(container_id);
            let _ = self.isolator.destroy(container_id);
        }
        fenced
    }

    /// Drops the container's fence entries and gives back its GPUs (it is going away).
    fn unfence(&self, container_id: &str) {
        if let Some(gpus) = self.lock().gpus.as_mut() {
            gpus.release(container_id);
        }
        let Some(key) = self.lock().fence_keys.remove(container_id) else {
            return;
        };
        self.lock().event_counts.remove(&key);
        let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ports) = fences.ports.as_mut() {
            ports.forget(key);
        }
        if let Some(devices) = fences.devices.as_mut() {
            devices.forget(key);
        }
        if let Some(network) = fences.network.as_mut() {
            network.forget(key);
        }
        if let Some(accounting) = fences.accounting.as_mut() {
            accounting.forget(key);
        }
    }

    /// What the telemetry sampler needs of each running task.
    pub fn task_views(&self) -> Vec<TaskView> {
        let state = self.lock();
        state
            .tasks
            .iter()
            .filter_map(|(key, record)| {
                Some(TaskView {
                    key: key.clone(),
                    executor_id: record.executor_id.clone(),
                    container_id: record.cgroup_id.clone(),
                    cgroup_key: *state.fence_keys.get(&record.cgroup_id)?,
                    resources: record.resources.clone(),
                })
            })
            .collect()
    }

    pub fn isolator(&self) -> &dyn Isolator {
        &*self.isolator
    }

    /// Keeps each task's newest sample and streams the batch to the master.
    pub fn publish(&self, batch: butte_api::telemetry::v1::TelemetryBatch) {
        let mut state = self.lock();
        for sample in &batch.samples {
            let key = (
                sample.framework_id.value.clone(),
                sample.task_id.value.clone(),
            );
            if state.tasks.contains_key(&key) {
                state.latest.insert(key, sample.clone());
            }
        }
        if let Some(outbound) = state.outbound.as_ref() {
            let _ = outbound.send(link::AgentMessage {
                kind: Some(agent_message::Kind::Telemetry(batch)),
            });
        }
    }

    /// The eBPF programs (the telemetry sampler reads their maps).
    pub fn fences(&self) -> MutexGuard<'_, Fences> {
        self.fences.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Process events from the ring buffer: counted per container; an OOM
    /// kill fails the task with the memory reason at once (Mesos's memory
    /// limitation: the container is destroyed).
    pub fn handle_events(&self, events: Vec<Event>) {
        let mut struck = Vec::new();
        {
            let mut state = self.lock();
            let containers: HashMap<u64, String> = state
                .fence_keys
                .iter()
                .map(|(id, &key)| (key, id.clone()))
                .collect();
            for event in events {
                let Some(container_id) = containers.get(&event.cgroup).cloned() else {
                    continue;
                };
                let counts = state.event_counts.entry(event.cgroup).or_default();
                match event.kind {
                    EventKind::Exec => counts.execs += 1,
                    EventKind::Exit => counts.exits += 1,
                    EventKind::OomKill => {
                        counts.oom_kills += 1;
                        tracing::warn!(
                            container_id,
                            pid = event.pid,
                            comm = event.comm,
                            "the OOM killer ended a process of the task"
                        );
                        if state.oom_struck.insert(container_id.clone()) {
                            struck.push(container_id);
                        }
                    }
                }
            }
        }
        for container_id in struck {
            let tasks: Vec<TaskKey> = self
                .lock()
                .tasks
                .iter()
                .filter(|(_, r)| r.cgroup_id == container_id && !r.killing)
                .map(|(k, _)| k.clone())
                .collect();
            for (framework_id, task_id) in tasks {
                self.kill(&framework_id, &task_id, Duration::ZERO);
            }
        }
    }

    /// The sandbox, the cgroups sized from `resources`, and the fences: all a
    /// container needs before the launcher starts it.
    fn prepare(
        &self,
        container_id: &str,
        sandbox: &std::path::Path,
        resources: &Resources,
        police_ingress: bool,
    ) -> Result<(Placement, Option<Assignment>), String> {
        std::fs::create_dir_all(sandbox)
            .map_err(|e| format!("cannot create the sandbox {}: {e}", sandbox.display()))?;
        let gpus = match self.lock().gpus.as_mut() {
            Some(books) => books.assign(container_id, resources)?,
            None if resources.has_gpus() => {
                return Err("the task asks for gpus and this agent has none".into());
            }
            None => None,
        };
        let limits = Limits {
            cpus: resources.scalar("cpus"),
            mem_mb: resources.scalar("mem"),
            pids_max: self.config.task_pids_max,
        };
        // On an error the caller unfences, which also gives the GPUs back.
        let placement = self
            .isolator
            .create(container_id, &limits)
            .map_err(|e| e.to_string())?;
        let granted = gpus
            .as_ref()
            .map(Assignment::device_rules)
            .unwrap_or_default();
        self.fence(
            container_id,
            &placement,
            resources,
            police_ingress,
            &granted,
        )?;
        Ok((placement, gpus))
    }

    /// Records the GPUs a task's container was given (its status shows them).
    fn set_gpus(&self, key: &TaskKey, gpus: &Option<Assignment>) {
        if let Some(record) = self.lock().tasks.get_mut(key) {
            record.gpus.clone_from(gpus);
        }
    }

    /// A GPU turned faulty: it is withdrawn from what the agent offers (the
    /// master hears the new total) and a task holding it is told.
    pub fn gpu_faulted(&self, fault: &Fault) {
        tracing::error!(
            gpu = fault.index,
            uuid = fault.uuid,
            reason = fault.reason,
            "GPU withdrawn"
        );
        let mut state = self.lock();
        if let Some(offered) = state.gpus.as_ref().and_then(|b| b.resources().ok()) {
            state.total.remove_gpus();
            state.total.add(&offered);
        }
        if let Some(outbound) = state.outbound.as_ref() {
            let _ = outbound.send(link::AgentMessage {
                kind: Some(agent_message::Kind::ResourcesChanged(
                    link::ResourcesChanged {
                        total_resources: state.total.to_proto(None),
                    },
                )),
            });
        }
        let holders: Vec<TaskKey> = state
            .tasks
            .iter()
            .filter(|(_, r)| {
                Some(&r.cgroup_id) == fault.holder.as_ref() && r.state == TaskState::TaskRunning
            })
            .map(|(key, _)| key.clone())
            .collect();
        drop(state);
        for (framework_id, task_id) in holders {
            self.update_with(
                &framework_id,
                &task_id,
                TaskState::TaskRunning,
                Some(format!(
                    "GPU {} ({}) is faulty: {}",
                    fault.index, fault.uuid, fault.reason
                )),
                None,
                vec![label("butte.gpu.faulty", &fault.index.to_string())],
            );
        }
    }

    async fn start_group_init(
        &self,
        group_id: &str,
        executor_id: &str,
        sandbox: &std::path::Path,
        total: &Resources,
        police_ingress: bool,
    ) -> Result<(Placement, Option<Assignment>), String> {
        let (placement, gpus) = self.prepare(group_id, sandbox, total, police_ingress)?;
        let request = LaunchRequest {
            container_id: group_id.to_owned(),
            argv: Vec::new(),
            env: Vec::new(),
            sandbox: sandbox.to_owned(),
            hostname: executor_id.to_owned(),
            cgroup: placement.unified.clone(),
            v1_procs: placement.v1_procs.clone(),
            tmp_mb: total.scalar("mem").clamp(1.0, 1024.0) as u64,
            join: None,
        };
        self.launcher
            .launch(request)
            .await
            .map_err(|e| format!("task group container launch failed: {e}"))?;
        Ok((placement, gpus))
    }

    async fn start_container(
        &self,
        key: &TaskKey,
        framework: &FrameworkInfo,
        task: &TaskInfo,
        container_id: &str,
        sandbox: &std::path::Path,
        resources: &Resources,
    ) -> Result<u64, String> {
        let (placement, gpus) =
            self.prepare(container_id, sandbox, resources, polices_ingress(task))?;
        self.set_gpus(key, &gpus);
        let argv = command_argv(task)?;
        let mut env = self.task_env(framework, task, container_id, sandbox, &task.task_id.value);
        env.extend(gpus.iter().flat_map(Assignment::env));
        let request = LaunchRequest {
            container_id: container_id.to_owned(),
            argv,
            env,
            sandbox: sandbox.to_owned(),
            hostname: task.task_id.value.clone(),
            cgroup: placement.unified,
            v1_procs: placement.v1_procs,
            tmp_mb: resources.scalar("mem").clamp(1.0, 1024.0) as u64,
            join: None,
        };
        match self.launcher.launch(request).await {
            Ok((_, micros)) => Ok(micros),
            Err(error) => {
                self.unfence(container_id);
                let _ = self.isolator.destroy(container_id);
                Err(format!("container launch failed: {error}"))
            }
        }
    }

    /// A container's first process ended: the task's last state, then cleanup.
    pub fn container_exited(&self, container_id: &str, exit: ContainerExit) {
        // A group's init ended (killed once its last task ended): remove the group's cgroups.
        if self.lock().groups.remove(container_id).is_some() {
            self.unfence(container_id);
            if let Err(error) = self.isolator.destroy(container_id) {
                tracing::error!(container_id, %error, "cannot remove the task group's cgroups");
            }
            return;
        }
        let Some(key) = self.lock().containers.get(container_id).cloned() else {
            return;
        };
        let (killing, cgroup_id, group) = match self.lock().tasks.get(&key) {
            Some(r) => (r.killing, r.cgroup_id.clone(), r.group.clone()),
            None => return,
        };
        let oom = self.lock().oom_struck.remove(&cgroup_id)
            || (exit.signal == Some(libc::SIGKILL)
                && self.isolator.oom_killed(&cgroup_id).unwrap_or(false));
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
        let failed = state != TaskState::TaskFinished;
        self.finish(&key, state, message, reason);
        if let Some(group) = group {
            self.group_task_ended(&group, &key, failed);
        }
    }

    /// One task of a group ended. Like Mesos's default executor, a task that
    /// fails or is killed takes the rest of its group down; when none is
    /// left, the group's init goes, and with it the group's namespaces.
    fn group_task_ended(&self, group: &str, key: &TaskKey, failed: bool) {
        let left = {
            let mut state = self.lock();
            let Some(members) = state.groups.get_mut(group) else {
                return;
            };
            members.retain(|k| k != key);
            members.len()
        };
        if failed && left > 0 {
            self.kill_group(group, Duration::ZERO);
        } else if left == 0 {
            let launcher = self.launcher.clone();
            let group = group.to_owned();
            tokio::runtime::Handle::current().spawn(async move {
                let _ = launcher.signal(&group, libc::SIGKILL).await;
            });
        }
    }

    /// Ends a task: removes its container and reports its terminal state.
    fn finish(
        &self,
        key: &TaskKey,
        state: TaskState,
        message: String,
        reason: Option<task_status::Reason>,
    ) {
        let (container_id, own_cgroup) = match self.lock().tasks.get(key) {
            Some(r) => (Some(r.container_id.clone()), r.group.is_none()),
            None => (None, false),
        };
        // A group task's cgroup is the group's: it goes with the group's init.
        if let Some(container_id) = container_id.as_ref().filter(|_| own_cgroup) {
            self.unfence(container_id);
        }
        if let Some(container_id) = container_id.as_ref().filter(|_| own_cgroup)
            && let Err(error) = self.isolator.destroy(container_id)
        {
            tracing::error!(container_id, %error, "cannot remove the task's cgroups");
        }
        self.update(&key.0, &key.1, state, Some(message), reason);
        let mut guard = self.lock();
        guard.tasks.remove(key);
        guard.latest.remove(key);
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
            if let Some(group) = record.group.clone() {
                drop(state);
                self.kill_group(&group, grace);
                return;
            }
            record.killing = true;
            record.container_id.clone()
        };
        if !grace.is_zero() {
            self.terminate_all(&container_id);
        }
        let launcher = self.launcher.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // Killing the pid namespace's init takes down every process in it.
            let _ = launcher.signal(&container_id, libc::SIGKILL).await;
        });
    }

    /// Kills every task of a group: SIGTERM to all its processes, then
    /// SIGKILL to each task and to the group's init when `grace` runs out.
    fn kill_group(&self, group: &str, grace: Duration) {
        let containers: Vec<String> = {
            let mut state = self.lock();
            let members = state.groups.get(group).cloned().unwrap_or_default();
            members
                .iter()
                .filter_map(|key| {
                    let record = state.tasks.get_mut(key)?;
                    record.killing = true;
                    Some(record.container_id.clone())
                })
                .collect()
        };
        if !grace.is_zero() {
            self.terminate_all(group);
        }
        let launcher = self.launcher.clone();
        let group = group.to_owned();
        tokio::runtime::Handle::current().spawn(async move {
            tokio::time::sleep(grace).await;
            for container_id in containers {
                let _ = launcher.signal(&container_id, libc::SIGKILL).await;
            }
            let _ = launcher.signal(&group, libc::SIGKILL).await;
        });
    }

    /// SIGTERM to every process in a cgroup, so each can end cleanly.
    fn terminate_all(&self, cgroup_id: &str) {
        for pid in self.isolator.pids(cgroup_id).unwrap_or_default() {
            // SAFETY: kill(2) has no memory effects; the pids come from our own cgroup.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
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

/// Whether the task asks for its ingress to be policed (label `POLICE_INGRESS_LABEL` = `true`).
fn polices_ingress(task: &TaskInfo) -> bool {
    task.labels.as_ref().is_some_and(|labels| {
        labels
            .labels
            .iter()
            .any(|l| l.key == POLICE_INGRESS_LABEL && l.value.as_deref() == Some("true"))
    })
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
