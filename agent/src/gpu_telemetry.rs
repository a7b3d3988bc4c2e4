//! GPU telemetry: each round the backend's readings per GPU (a faulty one is
//! withdrawn) and its per-process figures, mapped to containers through the
//! processes' v2 cgroups. Their Prometheus series are in `metrics`.

use std::collections::HashMap;

use crate::agent::Agent;

/// What a container's processes use of its GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuUse {
    pub memory_bytes: u64,
    /// Summed over its processes (one busy process on each of two GPUs: 200).
    pub utilization_percent: f64,
}

/// One round: readings (faults withdraw GPUs and tell their tasks), then
/// the per-process figures by container id.
pub fn sample(agent: &Agent) -> HashMap<String, GpuUse> {
    let Some(backend) = agent.gpu_backend.as_ref() else {
        return HashMap::new();
    };
    match backend.samples() {
        Ok(samples) => {
            let faults = agent
                .lock()
                .gpus
                .as_mut()
                .map(|books| books.record(samples))
                .unwrap_or_default();
            for fault in &faults {
                agent.gpu_faulted(fault);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the GPUs' figures"),
    }
    let processes = backend.processes().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read the GPUs' processes");
        Vec::new()
    });
    let prefix = format!("0::/{}/", agent.config.cgroup_subtree().display());
    let mut usage: HashMap<String, GpuUse> = HashMap::new();
    // NVML lists a process once per GPU it uses: read its cgroup once.
    let mut containers: HashMap<u32, Option<String>> = HashMap::new();
    for process in processes {
        let container = containers.entry(process.pid).or_insert_with(|| {
            let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", process.pid)).ok()?;
            container_of(&cgroups, &prefix).map(str::to_owned)
        });
        if let Some(container) = container {
            let entry = usage.entry(container.clone()).or_default();
            entry.memory_bytes += process.memory_used_mib << 20;
            entry.utilization_percent += process.sm_utilization_percent;
        }
    }
    usage
}

/// The container a process is in, from its /proc/PID/cgroup text: the
/// first path component under the agent's v2 subtree (`prefix`,
/// `0::/butte/agent-5051/`).
fn container_of<'a>(cgroups: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = cgroups.lines().find_map(|line| line.strip_prefix(prefix))?;
    rest.split('/').next().filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_belongs_to_the_container_under_the_agents_subtree() {
        let prefix = "0::/butte/agent-5051/";
        let v2_only = "0::/butte/agent-5051/a5051-c0ffee\n";
        assert_eq!(container_of(v2_only, prefix), Some("a5051-c0ffee"));
        let hybrid = "12:pids:/butte/agent-5051/a5051-beef\n0::/butte/agent-5051/a5051-beef/sub\n";
        assert_eq!(container_of(hybrid, prefix), Some("a5051-beef"));
        assert_eq!(
            container_of("0::/user.slice/session-1.scope\n", prefix),
            None
        );
        assert_eq!(container_of("0::/butte/agent-5052/a5052-x\n", prefix), None);
    }
}
