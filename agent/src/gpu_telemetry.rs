//! GPU telemetry: each round the backend's readings per GPU (a faulty one is
//! withdrawn) and its per-process figures, mapped to containers through the
//! processes' v2 cgroups; Prometheus text for the GPUs themselves.

use std::collections::HashMap;
use std::fmt::Write as _;

use butte_gpu::GpuSample;

use crate::agent::Agent;
use crate::gpus::GpuBooks;

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

/// Prometheus text for each GPU: utilisation, memory, power, temperature,
/// uncorrectable ECC errors, and whether it was withdrawn as faulty.
pub fn prometheus(books: &GpuBooks) -> String {
    let mut out = String::new();
    type Read = fn(&GpuSample) -> f64;
    let series: &[(&str, &str, &str, Read)] = &[
        (
            "butte_gpu_utilization_percent",
            "gauge",
            "GPU utilisation",
            |s| s.utilization_percent,
        ),
        (
            "butte_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use",
            |s| (s.memory_used_mib << 20) as f64,
        ),
        ("butte_gpu_power_watts", "gauge", "Power draw", |s| {
            s.power_watts
        }),
        (
            "butte_gpu_temperature_celsius",
            "gauge",
            "Temperature",
            |s| s.temperature_c,
        ),
        (
            "butte_gpu_ecc_uncorrectable_errors",
            "gauge",
            "Uncorrectable ECC errors since the driver loaded",
            |s| s.ecc_uncorrectable as f64,
        ),
    ];
    let inventory = books.inventory();
    let labels = |index: u32| {
        let gpu = inventory.gpu(index);
        format!(
            "gpu=\"{index}\",uuid=\"{}\",model=\"{}\"",
            gpu.map_or("", |g| g.uuid.as_str()),
            gpu.map_or("", |g| g.model.as_str()).replace('"', "'")
        )
    };
    for (name, kind, help, read) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for sample in &books.samples {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(sample.index), read(sample));
        }
    }
    let name = "butte_gpu_faulty";
    let _ = writeln!(
        out,
        "# HELP {name} 1 when the GPU reported uncorrectable ECC or critical XID errors and was withdrawn\n# TYPE {name} gauge"
    );
    for gpu in &inventory.gpus {
        let faulty = u8::from(books.faulty().contains_key(&gpu.index));
        let _ = writeln!(out, "{name}{{{}}} {faulty}", labels(gpu.index));
    }
    out
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
