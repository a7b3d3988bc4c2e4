//! One task's launch as the agent's launch path does it, without the agent:
//! what launch-latency and cgroup-rounds share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_isolators::cgroups::{Isolator, Limits};
use butte_isolators::container::{ContainerSpec, spawn, wait};
use butte_isolators::fences::{Fences, TaskFence};

/// Where the benchmarks' sandboxes go.
pub const WORK: &str = "/var/lib/butte-bench";

/// A task's limits in these benchmarks.
pub fn limits() -> Limits {
    Limits {
        cpus: 1.0,
        mem_mb: 128.0,
        pids_max: 4096,
    }
}

/// The cgroups, fence (with `fences`) and sandbox of task `id` running
/// `argv`, as the agent's launch path makes them.
pub fn spec(
    isolator: &dyn Isolator,
    id: &str,
    argv: &[&str],
    fences: Option<&mut Fences>,
) -> ContainerSpec {
    let placement = isolator
        .create(id, &limits())
        .unwrap_or_else(|e| panic!("cgroups for {id}: {e}"));
    if let Some(fences) = fences {
        let fence = TaskFence {
            ports: vec![(31000, 31010)],
            egress_mbit_per_s: Some(100.0),
            ..TaskFence::default()
        };
        fences
            .fence(id, &placement.unified, &fence)
            .unwrap_or_else(|e| panic!("fence {id}: {e}"));
    }
    let sandbox = PathBuf::from(WORK).join("sandboxes").join(id);
    std::fs::create_dir_all(&sandbox)
        .unwrap_or_else(|e| panic!("sandbox {}: {e}", sandbox.display()));
    ContainerSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        sandbox,
        hostname: id.into(),
        cgroup: placement.unified,
        v1_procs: placement.v1_procs,
        tmp_mb: 16,
        privileges: Default::default(),
    }
}

/// Prints the median and p99 of `samples`; returns the median.
pub fn stats(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<34} median {:>7.3} ms  p99 {:>7.3} ms  (n={})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.len()
    );
    at(0.5)
}

/// One launch, run and removal; (launch -> execve, whole cycle).
pub fn one_launch(isolator: &dyn Isolator, id: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let spec = spec(isolator, id, &["/bin/true"], None);
    let child = spawn(&spec).unwrap_or_else(|e| panic!("spawn {id}: {e}"));
    let to_exec = started.elapsed();
    wait(&child.pidfd).unwrap_or_else(|e| panic!("wait {id}: {e}"));
    isolator
        .destroy(id)
        .unwrap_or_else(|e| panic!("destroy {id}: {e}"));
    (to_exec, started.elapsed())
}
