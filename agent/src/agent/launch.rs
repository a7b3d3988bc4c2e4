//! Launching: a task alone in its container, or a task group in one shared
//! container. Both stage the same way (book, check the fit, checkpoint,
//! TASK_STARTING), then prepare the container (sandbox, GPUs, cgroups,
//! fences) and hand it to the launcher.

use std::path::{Path, PathBuf};

use butte_agent_ebpf::FenceError;
use butte_agent_ebpf::devices::v1_rule;
use butte_api::mesos::v1::{ExecutorInfo, FrameworkInfo, TaskInfo, TaskState, task_status};
use butte_api::resources::Resources;
use butte_isolators::cgroups::{CgroupError, Limits, Placement};
use butte_isolators::container::Privileges;
use butte_isolators::fences::TaskFence;

use super::Agent;
use super::status::Change;
use super::tasks::{Placing, TaskKey};
use butte_api::ids::IdError;

use crate::config::RunqueueHistogram;
use crate::gpus::{AssignError, Assignment};
use crate::launcher::LaunchRequest;
use crate::launcher_client::LauncherError;
use crate::users::{Allowed, UserError, apply_linux_info, privileges_of};
use crate::workdir::beneath;

/// Task label asking for ingress to be policed to the task's `network_bandwidth` too.
pub const POLICE_INGRESS_LABEL: &str = "butte.network_bandwidth.police_ingress";
/// The label by which a task asks for a run-queue latency histogram.
pub const RUNQUEUE_HISTOGRAM_LABEL: &str = "butte.telemetry.runqueue_histogram";

/// What a task's labels (and the agent's flags) ask of its fences; a task
/// group's container is asked what any of its tasks asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct FenceAsks {
    pub police_ingress: bool,
    pub runqueue_histogram: bool,
}

impl FenceAsks {
    pub(super) fn of(task: &TaskInfo, histogram: RunqueueHistogram) -> Self {
        Self {
            police_ingress: labelled_true(task, POLICE_INGRESS_LABEL),
            runqueue_histogram: match histogram {
                RunqueueHistogram::All => true,
                RunqueueHistogram::Labelled => labelled_true(task, RUNQUEUE_HISTOGRAM_LABEL),
                RunqueueHistogram::Off => false,
            },
        }
    }

    pub(super) fn or(self, other: Self) -> Self {
        Self {
            police_ingress: self.police_ingress || other.police_ingress,
            runqueue_histogram: self.runqueue_histogram || other.runqueue_histogram,
        }
    }
}

/// Why a task could not be launched (its TASK_FAILED message).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// the agent has less free than the task asks
    #[error("the task's resources are more than this agent has free")]
    DoesNotFit,
    /// the task or its framework could not be checkpointed (a full disk,
    /// say): a task this agent could not recover after a restart is not started
    #[error("cannot checkpoint the task or its framework, so the task is not started: {0}")]
    Checkpoint(std::io::Error),
    /// the sandbox directory could not be made
    #[error("cannot create the sandbox {path}: {source}")]
    Sandbox {
        path: PathBuf,
        source: std::io::Error,
    },
    /// GPUs asked of an agent without any
    #[error("the task asks for gpus and this agent has none")]
    NoGpus,
    /// the GPUs asked for cannot be given
    #[error(transparent)]
    Gpus(#[from] AssignError),
    /// a port range beyond what a port can be
    #[error("port range [{begin}-{end}] is outside 0-65535")]
    PortRange { begin: u64, end: u64 },
    /// the task's user cannot be used on this agent
    #[error(transparent)]
    User(#[from] UserError),
    /// an id that would not make a plain directory name
    #[error(transparent)]
    Id(#[from] IdError),
    /// a task without a command (custom executors are not run here)
    #[error("the task has no command (custom executors are not supported yet)")]
    NoCommand,
    /// the task's cgroups could not be made or limited
    #[error(transparent)]
    Cgroups(#[from] CgroupError),
    /// the task's eBPF fence entries could not be written
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// the container's record directory could not be named
    #[error("cannot place the records of container {container_id}: {source}")]
    Record {
        container_id: String,
        source: std::io::Error,
    },
    /// the launcher could not start the container (`what` says which)
    #[error("{what} failed: {source}")]
    Launcher {
        what: &'static str,
        source: LauncherError,
    },
}

/// A task about to be staged: where it runs and under which executor.
struct Staging {
    key: TaskKey,
    task: TaskInfo,
    resources: Resources,
    container_id: String,
    executor_id: String,
    /// Refused when an id would not make a plain directory name.
    sandbox: Result<PathBuf, IdError>,
}

impl Agent {
    /// A fresh container id under this agent's prefix.
    fn new_container_id(&self) -> String {
        format!(
            "{}{}",
            self.config.container_prefix(),
            uuid::Uuid::new_v4().simple()
        )
    }

    /// `executor` is the field and id the executor directory is named by:
    /// a command task is its own executor, so its `task_id`.
    fn sandbox_root(
        &self,
        framework_id: &str,
        executor: (&str, &str),
        container_id: &str,
    ) -> Result<PathBuf, IdError> {
        beneath(
            &self.config.work_dir.join("sandboxes"),
            &[
                ("framework_id", framework_id),
                executor,
                ("container_id", container_id),
            ],
        )
    }

    /// Stages one launch (a task alone, or a group in `group`'s cgroup):
    /// books the framework and the tasks, refuses what does not fit,
    /// checkpoints the framework and reports TASK_STARTING. The tasks
    /// staged; none when it does not fit (they are reported failed).
    fn stage(
        &self,
        framework: &FrameworkInfo,
        staging: Vec<Staging>,
        group: Option<&str>,
        executor_resources: &Resources,
    ) -> Option<Vec<TaskKey>> {
        let mut members = Vec::new();
        let mut refused = Vec::new();
        let fits = {
            let mut state = self.lock();
            let mut used = state.tasks.used();
            used.add(executor_resources);
            if let Some(id) = framework.id.as_ref() {
                state.frameworks.insert(id.value.clone(), framework.clone());
            }
            for staged in staging {
                if state.tasks.contains(&staged.key) {
                    tracing::warn!(key = %staged.key, "launch of a task that already runs here; ignored");
                    continue;
                }
                used.add(&staged.resources);
                // A task with a bad id is booked all the same, so that its
                // framework hears why; it never gets a path.
                let (sandbox, bad_id) = match staged.sandbox {
                    Ok(sandbox) => (sandbox, None),
                    Err(error) => (PathBuf::new(), Some(error)),
                };
                let placing = Placing {
                    container_id: &staged.container_id,
                    cgroup_id: group.unwrap_or(&staged.container_id),
                    group,
                    executor_id: &staged.executor_id,
                    sandbox,
                };
                state
                    .tasks
                    .stage(&staged.key, &staged.task, staged.resources, placing);
                match bad_id {
                    Some(error) => refused.push((staged.key, error)),
                    None => members.push(staged.key),
                }
            }
            // A group runs whole or not at all.
            if group.is_some()
                && let Some((_, error)) = refused.first().cloned()
            {
                refused.extend(members.drain(..).map(|key| (key, error.clone())));
            }
            if let Some(group) = group.filter(|_| !members.is_empty()) {
                state.tasks.add_group(group, members.clone());
            }
            state.total.contains(&used)
        };
        for (key, error) in refused {
            self.fail_launch(&key, &LaunchError::Id(error));
        }
        if !fits {
            if let Some(group) = group {
                self.lock().tasks.remove_group(group);
            }
            for key in &members {
                self.fail_launch(key, &LaunchError::DoesNotFit);
            }
            return None;
        }
        if members.is_empty() {
            return None;
        }
        if let Err(error) = self.checkpoint.framework(framework) {
            tracing::error!(%error, "cannot checkpoint the framework; its tasks are refused");
            if let Some(group) = group {
                self.lock().tasks.remove_group(group);
            }
            let message = error.to_string();
            for key in &members {
                let error = std::io::Error::new(error.kind(), message.clone());
                self.fail_launch(key, &LaunchError::Checkpoint(error));
            }
            return None;
        }
        // A task whose checkpoint cannot be written could not be recovered
        // after a restart: it is not started.
        let mut started = Vec::new();
        for key in members {
            if self.update_checkpointed(&key, Change::to(TaskState::TaskStarting)) {
                started.push(key);
            } else {
                let error = std::io::Error::other(
                    "the task's checkpoint could not be written (see the agent's log)",
                );
                self.fail_launch(&key, &LaunchError::Checkpoint(error));
            }
        }
        (!started.is_empty()).then_some(started)
    }

    fn fail_launch(&self, key: &TaskKey, error: &LaunchError) {
        tracing::warn!(%key, %error, "launch failed");
        let (state, reason) = match error {
            LaunchError::Id(_) => (TaskState::TaskError, task_status::Reason::TaskInvalid),
            _ => (
                TaskState::TaskFailed,
                task_status::Reason::ContainerLaunchFailed,
            ),
        };
        let change = Change::to(state)
            .message(error.to_string())
            .reason(Some(reason));
        self.finish(key, change);
    }

    pub(super) async fn launch(&self, framework: FrameworkInfo, task: TaskInfo) {
        let framework_id = framework.id.as_ref().map_or("", |f| f.value.as_str());
        let key = TaskKey::new(framework_id, &task.task_id.value);
        let container_id = self.new_container_id();
        let staging = Staging {
            sandbox: self.sandbox_root(framework_id, ("task_id", &key.task_id), &container_id),
            resources: Resources::from_proto(&task.resources).unwrap_or_default(),
            executor_id: key.task_id.clone(),
            container_id,
            key: key.clone(),
            task,
        };
        let (container_id, sandbox, resources) = (
            staging.container_id.clone(),
            staging.sandbox.clone(),
            staging.resources.clone(),
        );
        let task = staging.task.clone();
        let staged = self.stage(&framework, vec![staging], None, &Resources::new());
        let (Some(_), Ok(sandbox)) = (staged, sandbox) else {
            return;
        };
        let started = self
            .start_container(&key, &framework, &task, &container_id, &sandbox, &resources)
            .await;
        match started {
            Ok(micros) => {
                self.record_launch(micros);
                if !self.kill_if_asked(&key, &container_id) {
                    self.report_running(&key);
                }
            }
            Err(error) => self.fail_launch(&key, &error),
        }
    }

    /// Launches a task group: one container (cgroup sized for all its tasks
    /// and its executor, pid/mount/uts/ipc namespaces held by an init), each
    /// task joining it with its own sandbox under the group's.
    pub(super) async fn launch_group(
        &self,
        framework: FrameworkInfo,
        executor: ExecutorInfo,
        tasks: Vec<TaskInfo>,
    ) {
        let framework_id = framework.id.as_ref().map_or("", |f| f.value.as_str());
        let group_id = self.new_container_id();
        let executor_id = if executor.executor_id.value.is_empty() {
            group_id.clone()
        } else {
            executor.executor_id.value.clone()
        };
        let group_sandbox =
            self.sandbox_root(framework_id, ("executor_id", &executor_id), &group_id);
        let executor_resources = Resources::from_proto(&executor.resources).unwrap_or_default();
        let staging: Vec<Staging> = tasks
            .iter()
            .map(|task| {
                let resources = Resources::from_proto(&task.resources).unwrap_or_default();
                Staging {
                    key: TaskKey::new(framework_id, &task.task_id.value),
                    task: task.clone(),
                    resources,
                    container_id: self.new_container_id(),
                    executor_id: executor_id.clone(),
                    sandbox: group_sandbox.clone().and_then(|root| {
                        beneath(&root.join("tasks"), &[("task_id", &task.task_id.value)])
                    }),
                }
            })
            .collect();
        let staged = self.stage(&framework, staging, Some(&group_id), &executor_resources);
        let (Some(members), Ok(group_sandbox)) = (staged, group_sandbox) else {
            return;
        };
        // The group's cgroup holds its executor and the tasks staged (not
        // those skipped as already running here).
        let mut total = executor_resources.clone();
        {
            let state = self.lock();
            for key in &members {
                if let Some(record) = state.tasks.get(key) {
                    total.add(&record.resources);
                }
            }
        }
        let asks = tasks
            .iter()
            .map(|task| FenceAsks::of(task, self.config.runqueue_histogram))
            .fold(FenceAsks::default(), FenceAsks::or);
        let started = self
            .start_group_init(&group_id, &executor_id, &group_sandbox, &total, asks)
            .await;
        let (placement, gpus) = match started {
            Ok(started) => started,
            Err(error) => {
                self.lock().tasks.remove_group(&group_id);
                self.release(&group_id);
                let _ = self.isolator.destroy(&group_id);
                for key in &members {
                    self.fail_launch(key, &error);
                }
                return;
            }
        };
        for key in &members {
            let joined = self
                .join_group(key, &framework, &group_id, &executor_id, &placement, &gpus)
                .await;
            match joined {
                Ok(Some(micros)) => {
                    self.record_launch(micros);
                    self.report_running(key);
                }
                Ok(None) => {}
                Err(error) => {
                    self.fail_launch(key, &error);
                    self.group_task_ended(&group_id, key, true);
                }
            }
        }
    }

    /// Starts one group task in the group's container; its clone-to-exec
    /// microseconds (None: the task is gone already, or a kill came first).
    async fn join_group(
        &self,
        key: &TaskKey,
        framework: &FrameworkInfo,
        group_id: &str,
        executor_id: &str,
        placement: &Placement,
        gpus: &Option<Assignment>,
    ) -> Result<Option<u64>, LaunchError> {
        let Some((task, container_id, sandbox)) = self
            .lock()
            .tasks
            .get(key)
            .map(|r| (r.info.clone(), r.container_id.clone(), r.sandbox.clone()))
        else {
            return Ok(None);
        };
        self.set_gpus(key, gpus);
        let privileges = self.privileges(framework, &task)?;
        self.create_sandbox(&sandbox)?;
        give_sandbox(&sandbox, &privileges)?;
        let mut env = self.task_env(framework, &task, &container_id, &sandbox, executor_id);
        env.extend(gpus.iter().flat_map(Assignment::env));
        let Some(init) = self.containers.started(group_id) else {
            return Err(LaunchError::Launcher {
                what: "joining the task group",
                source: LauncherError::Failed("the task group's container is not running".into()),
            });
        };
        let request = LaunchRequest {
            container_id: container_id.clone(),
            argv: command_argv(&task)?,
            env,
            sandbox,
            hostname: executor_id.to_owned(),
            cgroup: placement.unified.clone(),
            v1_procs: placement.v1_procs.clone(),
            tmp_mb: 1,
            join: Some(init.process),
            privileges,
            record_dir: self.record_dir(&container_id)?,
        };
        let micros = self.start(request, "joining the task group").await?;
        if self.kill_if_asked(key, &container_id) {
            return Ok(None);
        }
        Ok(Some(micros))
    }

    async fn start_group_init(
        &self,
        group_id: &str,
        executor_id: &str,
        sandbox: &Path,
        total: &Resources,
        asks: FenceAsks,
    ) -> Result<(Placement, Option<Assignment>), LaunchError> {
        let (placement, gpus) = self.prepare(group_id, sandbox, total, asks)?;
        let request = LaunchRequest {
            container_id: group_id.to_owned(),
            argv: Vec::new(),
            env: Vec::new(),
            sandbox: sandbox.to_owned(),
            hostname: executor_id.to_owned(),
            cgroup: placement.unified.clone(),
            v1_procs: placement.v1_procs.clone(),
            tmp_mb: tmp_mb(total),
            join: None,
            privileges: Privileges::default(),
            record_dir: self.record_dir(group_id)?,
        };
        self.start(request, "task group container launch").await?;
        Ok((placement, gpus))
    }

    /// Prepares and starts a task's own container; its clone-to-exec
    /// microseconds. On an error the caller's `finish` removes what was made.
    async fn start_container(
        &self,
        key: &TaskKey,
        framework: &FrameworkInfo,
        task: &TaskInfo,
        container_id: &str,
        sandbox: &Path,
        resources: &Resources,
    ) -> Result<u64, LaunchError> {
        let privileges = self.privileges(framework, task)?;
        let asks = FenceAsks::of(task, self.config.runqueue_histogram);
        let (placement, gpus) = self.prepare(container_id, sandbox, resources, asks)?;
        give_sandbox(sandbox, &privileges)?;
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
            tmp_mb: tmp_mb(resources),
            join: None,
            privileges,
            record_dir: self.record_dir(container_id)?,
        };
        self.start(request, "container launch").await
    }

    /// Has the launcher start a container, and watches it; its
    /// clone-to-exec microseconds. A launcher that dies on the way is
    /// survived: a request it never took goes to the next launcher (once);
    /// one it took is settled by the container's record, which its
    /// supervisor writes once the container runs.
    async fn start(&self, request: LaunchRequest, what: &'static str) -> Result<u64, LaunchError> {
        let (container_id, record_dir) = (request.container_id.clone(), request.record_dir.clone());
        let mut launched = self.launcher.launch(request.clone()).await;
        if let Err(LauncherError::NotSent(reason)) = &launched {
            tracing::warn!(
                container_id,
                reason,
                "the launcher is gone; the launch goes to the next one"
            );
            launched = self.launch_when_back(request.clone()).await;
        }
        let (started, micros) = match launched {
            Ok(started) => started,
            Err(LauncherError::Gone) => match self.recorded_start(&record_dir).await {
                Some(started) => (started, 0),
                // It died before it forked a supervisor: nothing started.
                None if !record_dir.exists() => {
                    tracing::warn!(
                        container_id,
                        "the launcher died before it started the container; the launch goes to the next one"
                    );
                    self.launch_when_back(request)
                        .await
                        .map_err(|source| LaunchError::Launcher { what, source })?
                }
                None => {
                    return Err(LaunchError::Launcher {
                        what,
                        source: LauncherError::Gone,
                    });
                }
            },
            Err(source) => return Err(LaunchError::Launcher { what, source }),
        };
        self.containers.watch(&container_id, &record_dir, started);
        Ok(micros)
    }

    /// The launch again, once a launcher runs (up to 10 s).
    async fn launch_when_back(
        &self,
        request: LaunchRequest,
    ) -> Result<(crate::launcher::Started, u64), LauncherError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self.launcher.launch(request.clone()).await {
                Err(LauncherError::NotSent(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// The start a container's supervisor recorded, waited for a little:
    /// a supervisor that got the request writes it within moments.
    async fn recorded_start(&self, record_dir: &Path) -> Option<crate::launcher::Started> {
        for _ in 0..20 {
            if let Some(started) = crate::launcher::read_started(record_dir) {
                return Some(started);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        None
    }

    /// Where a container's supervisor records its start and its end.
    fn record_dir(&self, container_id: &str) -> Result<PathBuf, LaunchError> {
        self.checkpoint
            .container_dir(container_id)
            .map_err(|source| LaunchError::Record {
                container_id: container_id.to_owned(),
                source,
            })
    }

    /// The sandbox, the GPUs, the cgroups sized from `resources`, and the
    /// fences: all a container needs before the launcher starts it. On an
    /// error the caller releases and destroys the container.
    fn prepare(
        &self,
        container_id: &str,
        sandbox: &Path,
        resources: &Resources,
        asks: FenceAsks,
    ) -> Result<(Placement, Option<Assignment>), LaunchError> {
        self.create_sandbox(sandbox)?;
        self.hold_disk(container_id, sandbox, resources);
        let gpus = match self.lock().gpus.as_mut() {
            Some(books) => books.assign(container_id, resources)?,
            None if resources.has_gpus() => return Err(LaunchError::NoGpus),
            None => None,
        };
        let limits = Limits {
            cpus: resources.scalar("cpus"),
            mem_mb: resources.scalar("mem"),
            pids_max: self.config.task_pids_max,
        };
        let placement = self.isolator.create(container_id, &limits)?;
        let fence = task_fence(resources, asks, gpus.as_ref())?;
        // The v1 devices controller enforces on its own; eBPF on v2 too.
        let v1_rules: Vec<String> = fence.device_rules().iter().map(v1_rule).collect();
        self.isolator.restrict_devices(container_id, &v1_rules)?;
        self.fences()
            .fence(container_id, &placement.unified, &fence)?;
        Ok((placement, gpus))
    }

    /// A hard limit on the sandbox where project quotas exist; without
    /// one (or if it cannot be set) the disk watcher measures it instead.
    fn hold_disk(&self, container_id: &str, sandbox: &Path, resources: &Resources) {
        let bytes = (resources.scalar("disk") * 1024.0 * 1024.0) as u64;
        let Some(quotas) = self.quotas.as_ref().filter(|_| bytes > 0) else {
            return;
        };
        if let Err(error) = quotas.limit(container_id, sandbox, bytes) {
            tracing::warn!(container_id, %error, "no hard disk limit; the sandbox is measured instead");
        }
    }

    /// Who a task runs as: its command's user, else its framework's (root
    /// for all with --switch-user=false).
    fn privileges(
        &self,
        framework: &FrameworkInfo,
        task: &TaskInfo,
    ) -> Result<Privileges, LaunchError> {
        let name = task
            .command
            .as_ref()
            .and_then(|c| c.user.as_deref())
            .filter(|u| !u.is_empty())
            .unwrap_or(&framework.user);
        let mut privileges = if self.config.switch_user {
            privileges_of(name)?
        } else {
            Privileges::default()
        };
        let allowed = Allowed {
            bounding: self.config.bounding_capabilities,
            effective: self.config.effective_capabilities,
            unconfined_seccomp: self.config.allow_unconfined_seccomp,
            profiles: &self.seccomp_profiles,
        };
        let linux = task.container.as_ref().and_then(|c| c.linux_info.as_ref());
        apply_linux_info(&mut privileges, linux, allowed)?;
        Ok(privileges)
    }

    /// Records the GPUs a task's container was given (its status shows them).
    fn set_gpus(&self, key: &TaskKey, gpus: &Option<Assignment>) {
        if let Some(record) = self.lock().tasks.get_mut(key) {
            record.gpus.clone_from(gpus);
        }
    }

    /// The task's environment: the Mesos variables, then the command's own.
    fn task_env(
        &self,
        framework: &FrameworkInfo,
        task: &TaskInfo,
        container_id: &str,
        sandbox: &Path,
        executor_id: &str,
    ) -> Vec<(String, String)> {
        let agent_id = self.lock().agent_id.clone().unwrap_or_default();
        let sandbox = sandbox.display().to_string();
        let framework_id = framework.id.as_ref().map_or("", |f| f.value.as_str());
        let mut env: Vec<(String, String)> = [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", &sandbox),
            ("MESOS_SANDBOX", &sandbox),
            ("MESOS_DIRECTORY", &sandbox),
            ("MESOS_TASK_ID", &task.task_id.value),
            ("MESOS_EXECUTOR_ID", executor_id),
            ("MESOS_FRAMEWORK_ID", framework_id),
            ("MESOS_AGENT_ID", &agent_id),
            ("MESOS_SLAVE_ID", &agent_id),
            (
                "MESOS_AGENT_ENDPOINT",
                &format!("{}:{}", self.config.ip, self.config.port),
            ),
            ("MESOS_CONTAINER_ID", container_id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
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
}

/// The private /tmp's size: the task's memory, 1 MiB to 1 GiB (it is
/// charged to the task's memory anyway).
fn tmp_mb(resources: &Resources) -> u64 {
    resources.scalar("mem").clamp(1.0, 1024.0) as u64
}

/// A sandbox belongs to the user its task runs as.
fn give_sandbox(sandbox: &Path, privileges: &Privileges) -> Result<(), LaunchError> {
    let Some(user) = &privileges.user else {
        return Ok(());
    };
    std::os::unix::fs::chown(sandbox, Some(user.uid), Some(user.gid)).map_err(|source| {
        LaunchError::Sandbox {
            path: sandbox.to_owned(),
            source,
        }
    })
}

impl Agent {
    /// Makes a staged task's sandbox, holding off sandbox GC meanwhile
    /// (it removes empty parent directories, and this fills them).
    fn create_sandbox(&self, sandbox: &Path) -> Result<(), LaunchError> {
        let _gc = self.sandbox_gc();
        std::fs::create_dir_all(sandbox).map_err(|source| LaunchError::Sandbox {
            path: sandbox.to_owned(),
            source,
        })
    }
}

/// What a container is fenced to: its port ranges (none: only port 0), its
/// egress limit, its GPUs' device nodes beyond the defaults, and what its
/// labels ask.
pub(super) fn task_fence(
    resources: &Resources,
    asks: FenceAsks,
    gpus: Option<&Assignment>,
) -> Result<TaskFence, LaunchError> {
    let mut ports = Vec::new();
    for &(begin, end) in resources
        .ranges("ports")
        .map(|r| r.ranges())
        .unwrap_or_default()
    {
        let (Ok(low), Ok(high)) = (u16::try_from(begin), u16::try_from(end)) else {
            return Err(LaunchError::PortRange { begin, end });
        };
        ports.push((low, high));
    }
    let bandwidth = resources.scalar("network_bandwidth");
    Ok(TaskFence {
        ports,
        granted_devices: gpus.map(Assignment::device_rules).unwrap_or_default(),
        egress_mbit_per_s: (bandwidth > 0.0).then_some(bandwidth),
        police_ingress: asks.police_ingress,
        runqueue_histogram: asks.runqueue_histogram,
    })
}

/// The argv of a command task: `sh -c VALUE` for shell commands (the
/// default), else VALUE with `arguments` as argv.
fn command_argv(task: &TaskInfo) -> Result<Vec<String>, LaunchError> {
    let command = task.command.as_ref().ok_or(LaunchError::NoCommand)?;
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

/// Whether the task has the label `key` set to `true`.
fn labelled_true(task: &TaskInfo, key: &str) -> bool {
    task.labels.as_ref().is_some_and(|labels| {
        labels
            .labels
            .iter()
            .any(|l| l.key == key && l.value.as_deref() == Some("true"))
    })
}
