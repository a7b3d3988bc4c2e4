//! A starting agent takes back what a previous run left: the tasks in its
//! checkpoints, with their unacknowledged updates, and their containers,
//! which kept running (and fenced) while no agent ran. A container that
//! ended meanwhile is reported from its supervisor's exit record.

use std::collections::BTreeMap;

use butte_api::resources::Resources;
use butte_api::task_state::is_terminal;

use super::Agent;
use super::launch::{FenceAsks, task_fence};
use super::tasks::{TaskKey, TaskRecord};
use crate::checkpoint::Recovered;
use crate::gpus::Assignment;
use crate::launcher::read_started;

/// What recovery found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Tasks taken back whose containers still run.
    pub running: usize,
    /// Tasks whose containers ended while no agent ran (reported now).
    pub ended: usize,
    /// Ended tasks whose last updates still wait for acknowledgement.
    pub unacknowledged: usize,
}

impl Agent {
    /// Reads the checkpoints and takes back every task in them; what is
    /// left in the agent's cgroups and records afterwards is removed.
    /// Call inside the runtime, before the link to the master opens.
    pub fn recover(&self) -> Recovery {
        let mut recovery = Recovery::default();
        let mut groups: BTreeMap<String, Vec<TaskKey>> = BTreeMap::new();
        // What each cgroup's fence holds: its tasks' resources together.
        let mut fenced: BTreeMap<String, (Resources, FenceAsks, Option<Assignment>)> =
            BTreeMap::new();
        let mut adopted = Vec::new();
        let mut killing = Vec::new();
        for Recovered { framework, task } in self.checkpoint.recover() {
            let (key, mut record) = TaskRecord::from_checkpoint(&task);
            // The newest update queued may be newer than the task's state
            // as last checkpointed (an acknowledgement rewrote an older one).
            if let Some(newest) = task.pending.last() {
                record.advance(newest.status.state());
            }
            if let Some(id) = framework.id.as_ref() {
                self.lock()
                    .frameworks
                    .insert(id.value.clone(), framework.clone());
            }
            let ended = is_terminal(record.state());
            self.status.restore(&key, task);
            if ended {
                // Its end is known and waits for acknowledgement; its
                // container is gone.
                recovery.unacknowledged += 1;
                continue;
            }
            let fence = fenced.entry(record.cgroup_id.clone()).or_default();
            fence.0.add(&record.resources);
            fence.1 = fence
                .1
                .or(FenceAsks::of(&record.info, self.config.runqueue_histogram));
            fence.2 = fence.2.take().or_else(|| record.gpus.clone());
            if let Some(group) = &record.group {
                groups.entry(group.clone()).or_default().push(key.clone());
            } else {
                self.hold_sandbox(&record.container_id, &record.sandbox);
            }
            adopted.push((key.clone(), record.container_id.clone()));
            if record.is_killing() {
                killing.push(key.clone());
            }
            self.lock().tasks.restore(key, record);
        }
        for (cgroup_id, (resources, asks, gpus)) in &fenced {
            self.refence(cgroup_id, resources, *asks, gpus.as_ref());
        }
        {
            let mut state = self.lock();
            for (group, members) in &groups {
                state.tasks.add_group(group, members.clone());
            }
        }
        for group in groups.keys() {
            self.adopt(group);
        }
        for (key, container_id) in &adopted {
            if self.adopt(container_id) {
                recovery.running += 1;
                // Started while the previous run was answering its launch.
                self.report_running(key);
            } else {
                recovery.ended += 1;
            }
        }
        // A kill asked of the previous run: its grace is over.
        for key in &killing {
            self.kill(key, std::time::Duration::ZERO);
        }
        self.remove_leftovers();
        recovery
    }

    /// Watches a container again; whether it still runs (if not, its end
    /// is reported from its record, or as not known).
    fn adopt(&self, container_id: &str) -> bool {
        let Ok(record_dir) = self.checkpoint.container_dir(container_id) else {
            return false;
        };
        match read_started(&record_dir) {
            Some(started) => {
                let running = started.process.open().is_ok();
                self.containers.watch(container_id, &record_dir, started);
                running
            }
            None => {
                // Staged, but never started (or its start went unrecorded).
                self.containers.report_gone(container_id, &record_dir);
                false
            }
        }
    }

    /// Holds a recovered sandbox's disk again (its project id is on it).
    fn hold_sandbox(&self, container_id: &str, sandbox: &std::path::Path) {
        if let Some(quotas) = &self.quotas {
            quotas.restore(container_id, sandbox);
        }
    }

    /// Writes a recovered container's fences and GPUs again: the pinned
    /// maps kept them while no agent ran, but a map made anew (a changed
    /// program, bpffs remounted) must not leave it unfenced.
    fn refence(
        &self,
        cgroup_id: &str,
        resources: &Resources,
        asks: FenceAsks,
        gpus: Option<&Assignment>,
    ) {
        if let Some(gpus) = gpus
            && let Some(books) = self.lock().gpus.as_mut()
        {
            books.restore(cgroup_id, gpus);
        }
        let written = task_fence(resources, asks, gpus)
            .map_err(|e| e.to_string())
            .and_then(|fence| {
                let dir = self.isolator.v2_dir(cgroup_id);
                self.fences()
                    .refence(cgroup_id, &dir, &fence)
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = written {
            tracing::error!(container_id = cgroup_id, %error, "cannot fence a recovered container again");
        }
    }
}
