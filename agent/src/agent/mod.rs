//! The agent's tasks and what happens to them: launch into a container
//! (`launch`), supervise, kill and clean up (`exit`), report (`status`), all
//! booked in one `TaskTable` (`tasks`). State sits behind one lock that is
//! never held across an await; slow work (cgroups, the launcher) runs outside.

mod exit;
mod launch;
mod recover;
mod status;
mod tasks;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{AgentId, FrameworkInfo, Task};
use butte_api::resources::Resources;
use butte_api::telemetry::v1::{TaskSample, TelemetryBatch};
use butte_isolators::cgroups::Isolator;
use butte_isolators::fences::Fences;

pub use launch::{LaunchError, POLICE_INGRESS_LABEL};
pub use recover::Recovery;
use status::StatusStream;
pub use tasks::{TaskKey, TaskRecord, TaskTable};

use crate::checkpoint::Checkpoint;
use crate::config::AgentConfig;
use crate::containers::Containers;
use crate::gpus::{GpuBooks, Gpus};
use crate::launcher_client::LauncherClient;
use crate::metrics::ContainerStarts;
use crate::seccomp_profiles::SeccompProfiles;
use butte_isolators::quota::ProjectQuotas;

/// Grace period between SIGTERM and SIGKILL when the kill policy names none
/// (Mesos's command executor default).
const DEFAULT_GRACE: Duration = Duration::from_secs(3);

pub struct AgentState {
    pub agent_id: Option<String>,
    pub total: Resources,
    pub tasks: TaskTable,
    frameworks: HashMap<String, FrameworkInfo>,
    /// Process events counted per container (by eBPF key).
    pub(crate) event_counts: HashMap<u64, EventCounts>,
    /// Containers the OOM killer struck (from the event; their tasks fail with the memory reason).
    oom_struck: HashSet<String>,
    /// Tasks killed for using more disk than their `disk`: why.
    disk_struck: HashMap<TaskKey, String>,
    /// The last telemetry sample of each running task.
    pub latest: HashMap<TaskKey, TaskSample>,
    /// The GPUs, when the backend found any.
    pub gpus: Option<GpuBooks>,
}

impl AgentState {
    fn new(agent_id: Option<String>, total: Resources, gpus: Option<GpuBooks>) -> Self {
        Self {
            agent_id,
            total,
            tasks: TaskTable::default(),
            frameworks: HashMap::new(),
            event_counts: HashMap::new(),
            oom_struck: HashSet::new(),
            disk_struck: HashMap::new(),
            latest: HashMap::new(),
            gpus,
        }
    }
}

/// The sandbox of the container a task runs in: its own, or its group's
/// (`GROUP/tasks/TASK` for a group task).
fn container_sandbox(record: &TaskRecord) -> std::path::PathBuf {
    match &record.group {
        Some(_) => record
            .sandbox
            .parent()
            .and_then(std::path::Path::parent)
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
        None => record.sandbox.clone(),
    }
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
    /// Its sandbox's newest measure (tasks with a `disk`).
    pub disk_used_bytes: Option<u64>,
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
    /// The running containers: their first processes and their ends.
    containers: Arc<Containers>,
    checkpoint: Arc<Checkpoint>,
    status: Arc<StatusStream>,
    /// The eBPF fences that loaded (none offers what it cannot enforce).
    fences: Arc<Mutex<Fences>>,
    /// Where GPU readings come from (NVML or the simulated file).
    pub gpu_backend: Option<Arc<dyn butte_gpu::GpuBackend>>,
    /// Clone-to-exec times, for `/metrics`.
    pub container_starts: ContainerStarts,
    /// The seccomp profiles tasks may name.
    seccomp_profiles: Arc<SeccompProfiles>,
    /// Hard disk limits, where the work dir's filesystem has project quotas.
    pub quotas: Option<Arc<ProjectQuotas>>,
    /// Held by sandbox GC while it chooses and moves away, and by a launch
    /// while it makes a sandbox: a sandbox made is always in the books GC reads.
    sandbox_gc: Arc<Mutex<()>>,
}

/// What starts containers and holds the running ones.
pub struct ContainerRuntime {
    pub launcher: LauncherClient,
    pub containers: Containers,
}

/// What holds a task beyond its cgroups and fences, set up at start.
pub struct Confinement {
    /// The seccomp profiles tasks may name (--seccomp-config-dir).
    pub seccomp_profiles: SeccompProfiles,
    /// Hard disk limits, where the work dir's filesystem has project quotas.
    pub quotas: Option<ProjectQuotas>,
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        total: Resources,
        isolator: Arc<dyn Isolator>,
        runtime: ContainerRuntime,
        fences: Fences,
        gpus: Option<Gpus>,
        confinement: Confinement,
    ) -> Self {
        let Confinement {
            seccomp_profiles,
            quotas,
        } = confinement;
        let ContainerRuntime {
            launcher,
            containers,
        } = runtime;
        let (gpu_backend, gpus) = match gpus {
            Some(Gpus { backend, books }) => (Some(backend), Some(books)),
            None => (None, None),
        };
        let checkpoint = Arc::new(Checkpoint::new(&config.work_dir));
        // 0.1 s to a day: a huge, infinite or NaN flag must not panic the agent.
        let retry = Duration::try_from_secs_f64(config.status_update_retry.clamp(0.1, 86_400.0))
            .unwrap_or(Duration::from_secs(10));
        let state = AgentState::new(checkpoint.agent_id(), total, gpus);
        Self {
            state: Arc::new(Mutex::new(state)),
            config: Arc::new(config),
            isolator,
            launcher,
            containers: Arc::new(containers),
            status: Arc::new(StatusStream::new(retry, checkpoint.clone())),
            checkpoint,
            fences: Arc::new(Mutex::new(fences)),
            gpu_backend,
            container_starts: ContainerStarts::default(),
            seccomp_profiles: Arc::new(seccomp_profiles),
            quotas: quotas.map(Arc::new),
            sandbox_gc: Arc::default(),
        }
    }

    /// Excludes sandbox GC (see `sandbox_gc`).
    pub fn sandbox_gc(&self) -> MutexGuard<'_, ()> {
        self.sandbox_gc.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eBPF fences (the telemetry sampler reads their maps).
    pub fn fences(&self) -> MutexGuard<'_, Fences> {
        self.fences.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn isolator(&self) -> &dyn Isolator {
        &*self.isolator
    }

    /// Removes the containers (cgroups) and container records of this
    /// agent's prefix that no task holds: a previous run's, not recovered.
    pub fn remove_leftovers(&self) {
        let in_use: std::collections::HashSet<String> = {
            let state = self.lock();
            state
                .tasks
                .iter()
                .flat_map(|(_, r)| [r.container_id.clone(), r.cgroup_id.clone()])
                .collect()
        };
        match self.isolator.list() {
            Ok(ids) => {
                let prefix = self.config.container_prefix();
                for id in ids
                    .into_iter()
                    .filter(|id| id.starts_with(&prefix) && !in_use.contains(id))
                {
                    tracing::warn!(
                        container_id = id,
                        "removing a container left by a previous agent run"
                    );
                    if let Ok(key) = butte_agent_ebpf::ports::cgroup_id(&self.isolator.v2_dir(&id))
                    {
                        self.fences().forget(key);
                    }
                    if let Err(error) = self.isolator.destroy(&id) {
                        tracing::error!(container_id = id, %error, "cannot remove leftover container");
                    }
                }
            }
            Err(error) => tracing::error!(%error, "cannot list leftover containers"),
        }
        let records = self.config.work_dir.join("meta/containers");
        for entry in std::fs::read_dir(records).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !in_use.contains(&id) {
                let _ = self.checkpoint.remove_container(&id);
            }
        }
    }

    /// The checkpoints under `--work-dir/meta`.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    // ---- the link -------------------------------------------------------------------

    /// A new link to the master: registers on it (with the tasks still
    /// here) before anything else goes out; false when it is already gone.
    pub fn connect(&self, outbound: crate::link::Outbound) -> bool {
        let register = self.register_message();
        self.status.connect(outbound, register)
    }

    /// What to register with: this agent and the tasks it holds.
    fn register_message(&self) -> link::AgentMessage {
        // Under the agent's lock, where tasks end and their updates queue:
        // a task is in the books or among the unacknowledged ends, never
        // in neither.
        let state = self.lock();
        let ended = self.status.unacknowledged_ends();
        let mut running: Vec<Task> = state
            .tasks
            .iter()
            .map(|(_, r)| r.to_proto(state.agent_id.as_deref()))
            .collect();
        running.extend(ended.into_iter().filter(|task| {
            !state
                .tasks
                .contains(&TaskKey::new(&task.framework_id.value, &task.task_id.value))
        }));
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
        self.lock().agent_id = Some(agent_id);
        self.status.registered();
    }

    pub fn disconnected(&self) {
        self.status.disconnect();
    }

    /// Sends each task's oldest unacknowledged update when due.
    pub fn flush_updates(&self) {
        self.status.flush();
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
                let key = TaskKey::new(&kill.framework_id.value, &kill.task_id.value);
                self.kill(&key, grace);
            }
            Kind::ShutdownFramework(shutdown) => {
                let keys: Vec<TaskKey> = self
                    .lock()
                    .tasks
                    .keys()
                    .into_iter()
                    .filter(|key| key.framework_id == shutdown.framework_id.value)
                    .collect();
                for key in &keys {
                    self.kill(key, Duration::ZERO);
                }
            }
            Kind::StatusAck(ack) => {
                let key = TaskKey::new(&ack.framework_id.value, &ack.task_id.value);
                self.status.acknowledge(&key, &ack.uuid);
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

    // ---- telemetry ------------------------------------------------------------------------

    /// What the telemetry sampler needs of each running task.
    pub fn task_views(&self) -> Vec<TaskView> {
        let mut views: Vec<TaskView> = self
            .lock()
            .tasks
            .iter()
            .map(|(key, record)| TaskView {
                key: key.clone(),
                executor_id: record.executor_id.clone(),
                container_id: record.cgroup_id.clone(),
                cgroup_key: 0,
                resources: record.resources.clone(),
                disk_used_bytes: record.disk_used_bytes,
            })
            .collect();
        let fences = self.fences();
        views.retain_mut(|view| match fences.key(&view.container_id) {
            Some(key) => {
                view.cgroup_key = key;
                true
            }
            None => false,
        });
        views
    }

    /// Keeps each task's newest sample and streams the batch to the master.
    pub fn publish(&self, batch: TelemetryBatch) {
        {
            let mut state = self.lock();
            for sample in &batch.samples {
                let key = TaskKey::new(&sample.framework_id.value, &sample.task_id.value);
                if state.tasks.contains(&key) {
                    state.latest.insert(key, sample.clone());
                }
            }
        }
        self.status.send(agent_message::Kind::Telemetry(batch));
    }

    /// A task's sandbox and its `disk` in bytes (0: none given).
    pub fn disk_of(&self, key: &TaskKey) -> Option<(std::path::PathBuf, u64)> {
        let state = self.lock();
        let record = state.tasks.get(key)?;
        (!record.sandbox.as_os_str().is_empty())
            .then(|| (record.sandbox.clone(), record.disk_limit_bytes()))
    }

    /// The container sandboxes of the tasks here (a group task's is its
    /// group's): what sandbox GC must leave alone.
    pub fn sandboxes_in_use(&self) -> HashSet<std::path::PathBuf> {
        let state = self.lock();
        state
            .tasks
            .iter()
            .map(|(_, record)| container_sandbox(record))
            .collect()
    }

    /// The sandboxes to hold to their `disk` (tasks not already ending).
    pub fn disk_watched(&self) -> Vec<crate::disk::Watched> {
        let state = self.lock();
        state
            .tasks
            .iter()
            .filter(|(key, r)| !r.is_killing() && !state.disk_struck.contains_key(*key))
            .filter_map(|(key, record)| {
                let limit_bytes = record.disk_limit_bytes();
                (limit_bytes > 0 && !record.sandbox.as_os_str().is_empty()).then(|| {
                    crate::disk::Watched {
                        key: key.clone(),
                        container_id: record.container_id.clone(),
                        sandbox: record.sandbox.clone(),
                        limit_bytes,
                    }
                })
            })
            .collect()
    }

    /// The newest measure of a task's sandbox (telemetry reports it).
    pub fn disk_measured(&self, key: &TaskKey, used_bytes: u64) {
        if let Some(record) = self.lock().tasks.get_mut(key) {
            record.disk_used_bytes = Some(used_bytes);
        }
    }

    /// A task's sandbox holds more than its `disk`: it is killed and fails
    /// with the disk reason (Mesos's disk/du).
    pub fn disk_exceeded(&self, key: &TaskKey, used_bytes: u64, limit_bytes: u64) {
        let message = format!(
            "the task's sandbox holds {:.1} MB, more than its 'disk' of {:.1} MB",
            used_bytes as f64 / 1048576.0,
            limit_bytes as f64 / 1048576.0
        );
        tracing::warn!(%key, message, "disk limit exceeded");
        self.lock().disk_struck.insert(key.clone(), message);
        self.kill(key, Duration::ZERO);
    }

    /// A launch reached exec in `micros` (clone to exec, in the launcher).
    fn record_launch(&self, micros: u64) {
        self.container_starts.observe(micros as f64 / 1e6);
    }

    /// Drops the container's fence entries and event counts, and gives back
    /// its GPUs (it is going away).
    fn release(&self, container_id: &str) {
        let key = self.fences().unfence(container_id);
        if let Some(quotas) = &self.quotas {
            quotas.release(container_id);
        }
        let mut state = self.lock();
        if let Some(gpus) = state.gpus.as_mut() {
            gpus.release(container_id);
        }
        state.oom_struck.remove(container_id);
        if let Some(key) = key {
            state.event_counts.remove(&key);
        }
    }

    /// A kill asked for while the container was being started reached a
    /// launcher that did not have it yet: now that it exists, kill it.
    /// Whether the task was being killed.
    fn kill_if_asked(&self, key: &TaskKey, container_id: &str) -> bool {
        let killing = self.lock().tasks.get(key).is_some_and(|r| r.is_killing());
        if killing {
            self.containers.signal(container_id, libc::SIGKILL);
        }
        killing
    }
}
