//! How tasks end: their container's first process exits, a kill is asked
//! for, the OOM killer strikes, or a GPU they hold turns faulty.

use std::time::{Duration, Instant};

use butte_agent_ebpf::accounting::{Event, EventKind};
use butte_api::agent_link::v1::{self as link, agent_message};
use butte_api::mesos::v1::{TaskState, task_status};

use super::Agent;
use super::status::Change;
use super::tasks::TaskKey;
use crate::gpus::{Fault, label};
use crate::launcher_client::ContainerExit;

impl Agent {
    /// A container's first process ended: the task's last state, then cleanup.
    pub fn container_exited(&self, container_id: &str, exit: ContainerExit) {
        // A group's init ended (killed once its last task ended): remove the group's cgroups.
        if self.lock().tasks.remove_group(container_id) {
            self.release(container_id);
            if let Err(error) = self.isolator.destroy(container_id) {
                tracing::error!(container_id, %error, "cannot remove the task group's cgroups");
            }
            self.forget_container(container_id);
            return;
        }
        let found = {
            let state = self.lock();
            state
                .tasks
                .by_container(container_id)
                .and_then(|key| Some((key.clone(), state.tasks.get(key)?)))
                .map(|(key, r)| (key, r.is_killing(), r.cgroup_id.clone(), r.group.clone()))
        };
        let Some((key, killing, cgroup_id, group)) = found else {
            // Its task ended already (a limit or a fault struck during the
            // launch): only the container's hold and records are left.
            self.forget_container(container_id);
            return;
        };
        let oom = self.lock().oom_struck.remove(&cgroup_id)
            || (exit.signal == Some(libc::SIGKILL)
                && self.isolator.oom_killed(&cgroup_id).unwrap_or(false));
        let disk = self.lock().disk_struck.remove(&key);
        let limited = oom || disk.is_some();
        let change = match disk {
            Some(message) if !oom => Change::to(TaskState::TaskFailed)
                .message(message)
                .reason(Some(task_status::Reason::ContainerLimitationDisk)),
            _ => outcome(exit, oom, killing),
        };
        if !killing || limited {
            // An exit follows exec: the task ran, even if its launch is not
            // answered yet (the agent's own kill at a limit is not a kill).
            self.report_running(&key);
        }
        let failed = change.state() != TaskState::TaskFinished;
        self.finish(&key, change);
        if let Some(group) = group {
            self.group_task_ended(&group, &key, failed);
        }
    }

    /// One task of a group ended. Like Mesos's default executor, a task that
    /// fails or is killed takes the rest of its group down; when none is
    /// left, the group's init goes, and with it the group's namespaces.
    pub(super) fn group_task_ended(&self, group: &str, key: &TaskKey, failed: bool) {
        let Some(left) = self.lock().tasks.leave_group(group, key) else {
            return;
        };
        if failed && left > 0 {
            self.kill_group(group, Duration::ZERO);
        } else if left == 0 {
            self.containers.signal(group, libc::SIGKILL);
        }
    }

    /// Ends a task: removes its container and reports its terminal state.
    pub(super) fn finish(&self, key: &TaskKey, change: Change) {
        let own_container = self
            .lock()
            .tasks
            .get(key)
            .filter(|r| r.group.is_none())
            .map(|r| r.container_id.clone());
        // A group task's cgroup is the group's: it goes with the group's init.
        if let Some(container_id) = own_container {
            self.release(&container_id);
            if let Err(error) = self.isolator.destroy(&container_id) {
                tracing::error!(container_id, %error, "cannot remove the task's cgroups");
            }
        }
        self.update(key, change);
        let removed = {
            let mut guard = self.lock();
            guard.latest.remove(key);
            guard.disk_struck.remove(key);
            guard.tasks.remove(key)
        };
        // The terminal state is checkpointed: the container's records may go,
        // and its sandbox's age (for sandbox GC) counts from now.
        if let Some(record) = removed {
            self.forget_container(&record.container_id);
            if !record.sandbox.as_os_str().is_empty() {
                crate::gc::mark_ended(&super::container_sandbox(&record));
            }
        }
    }

    /// Lets go of an ended container and its records.
    fn forget_container(&self, container_id: &str) {
        self.containers.forget(container_id);
        if let Err(error) = self.checkpoint.remove_container(container_id) {
            tracing::warn!(container_id, %error, "cannot remove the container's records");
        }
    }

    /// SIGTERM to every process of the task, SIGKILL when `grace` runs out.
    pub fn kill(&self, key: &TaskKey, grace: Duration) {
        let container_id = {
            let mut state = self.lock();
            let Some(record) = state.tasks.get_mut(key) else {
                drop(state);
                tracing::info!(%key, "kill for a task not running here");
                return;
            };
            if let Some(group) = record.group.clone() {
                drop(state);
                self.kill_group(&group, grace);
                return;
            }
            record.mark_killing();
            record.container_id.clone()
        };
        self.checkpoint_now(key);
        if !grace.is_zero() {
            self.terminate_all(&container_id);
        }
        let containers = self.containers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // Killing the pid namespace's init takes down every process in it.
            containers.signal(&container_id, libc::SIGKILL);
        });
    }

    /// Kills every task of a group: SIGTERM to all its processes, then
    /// SIGKILL to each task and to the group's init when `grace` runs out.
    fn kill_group(&self, group: &str, grace: Duration) {
        let containers: Vec<(TaskKey, String)> = {
            let mut state = self.lock();
            let members = state.tasks.group_members(group);
            members
                .iter()
                .filter_map(|key| {
                    let record = state.tasks.get_mut(key)?;
                    record.mark_killing();
                    Some((key.clone(), record.container_id.clone()))
                })
                .collect()
        };
        for (key, _) in &containers {
            self.checkpoint_now(key);
        }
        let containers: Vec<String> = containers.into_iter().map(|(_, id)| id).collect();
        if !grace.is_zero() {
            self.terminate_all(group);
        }
        let held = self.containers.clone();
        let group = group.to_owned();
        tokio::runtime::Handle::current().spawn(async move {
            tokio::time::sleep(grace).await;
            for container_id in containers {
                held.signal(&container_id, libc::SIGKILL);
            }
            held.signal(&group, libc::SIGKILL);
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
        let keys = self.lock().tasks.keys();
        for key in &keys {
            self.kill(key, Duration::ZERO);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.lock().tasks.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Gives the node up (SIGUSR1, `--recover cleanup`, or the master
    /// marked this agent gone): every task killed, the agent's cgroups,
    /// pins and checkpoints removed.
    pub async fn drain(&self) {
        self.shutdown().await;
        self.fences().unpin();
        self.isolator.remove_subtree();
        if let Err(error) = self.checkpoint.clear() {
            tracing::error!(%error, "cannot remove the task checkpoints");
        }
    }

    /// Process events from the ring buffer: counted per container; an OOM
    /// kill fails the task with the memory reason at once (Mesos's memory
    /// limitation: the container is destroyed).
    pub fn handle_events(&self, events: Vec<Event>) {
        let mut struck = Vec::new();
        {
            // The keys are read under the state lock, so a container that
            // `release` unfences either is not in them or is cleaned after.
            let mut state = self.lock();
            let containers = self.fences().containers_by_key();
            for event in events {
                let Some(container_id) = containers.get(&event.cgroup) else {
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
                            struck.push(container_id.clone());
                        }
                    }
                }
            }
        }
        for container_id in struck {
            let tasks: Vec<TaskKey> = self
                .lock()
                .tasks
                .in_cgroup(&container_id)
                .filter(|(_, r)| !r.is_killing())
                .map(|(k, _)| k.clone())
                .collect();
            for key in &tasks {
                self.kill(key, Duration::ZERO);
            }
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
        let (total, holders) = {
            let mut state = self.lock();
            if let Some(offered) = state.gpus.as_ref().and_then(|b| b.resources().ok()) {
                state.total.remove_gpus();
                state.total.add(&offered);
            }
            let holders: Vec<TaskKey> = match fault.holder.as_deref() {
                Some(holder) => state
                    .tasks
                    .in_cgroup(holder)
                    .filter(|(_, r)| r.state() == TaskState::TaskRunning)
                    .map(|(key, _)| key.clone())
                    .collect(),
                None => Vec::new(),
            };
            (state.total.to_proto(None), holders)
        };
        self.status.send(agent_message::Kind::ResourcesChanged(
            link::ResourcesChanged {
                total_resources: total,
            },
        ));
        for key in &holders {
            let change = Change::to(TaskState::TaskRunning)
                .message(format!(
                    "GPU {} ({}) is faulty: {}",
                    fault.index, fault.uuid, fault.reason
                ))
                .label(label("butte.gpu.faulty", &fault.index.to_string()));
            self.update(key, change);
        }
    }
}

/// What a container's exit means for its task.
fn outcome(exit: ContainerExit, oom: bool, killing: bool) -> Change {
    use task_status::Reason;
    let failed = |message: String, reason: Option<Reason>| {
        Change::to(TaskState::TaskFailed)
            .message(message)
            .reason(reason)
    };
    if oom {
        return failed(
            "the task used more memory than its 'mem' and the OOM killer ended it".to_owned(),
            Some(Reason::ContainerLimitationMemory),
        );
    }
    if killing {
        return Change::to(TaskState::TaskKilled).message("killed as asked");
    }
    match (exit.code, exit.signal) {
        (Some(0), _) => Change::to(TaskState::TaskFinished).message("Command exited with status 0"),
        (Some(code), _) => failed(
            format!("Command exited with status {code}"),
            Some(Reason::CommandExecutorFailed),
        ),
        (None, Some(signal)) => failed(
            format!("Command terminated by signal {signal}"),
            Some(Reason::CommandExecutorFailed),
        ),
        // It ended while nothing watched it (its supervisor was killed too).
        (None, None) => Change::to(TaskState::TaskLost)
            .message("the task's container ended while no agent or supervisor watched it; how it ended is not known")
            .reason(Some(Reason::ExecutorTerminated)),
    }
}
