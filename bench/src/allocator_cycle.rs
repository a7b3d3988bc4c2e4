//! The allocation cycle at the size of Mesos's allocator benchmark: 10,000
//! agents and 1,000 frameworks. Mesos 1.7 published about 1.06 s per cycle
//! for it; we print our median and the ratio.
//!
//! Scenarios (each cycle offers every agent, then everything is given back,
//! outside the timed part):
//! - `fresh`: no filters, frameworks in one role;
//! - `roles`: the same over 100 roles (two DRF levels sorting);
//! - `declines`: every offer is declined with a long filter, so each cycle a
//!   framework must be found that has not refused that agent yet (Mesos's
//!   DeclineOffers shape; the cost grows with the filters held).
//!
//! `cargo run --release -p butte-bench --bin allocator-cycle [-- CYCLES]`

use std::time::{Duration, Instant};

use butte_api::resources::Resources;
use butte_master_lite::allocator::Allocator;

const AGENTS: usize = 10_000;
const FRAMEWORKS: usize = 1_000;
const MESOS_CYCLE_SECONDS: f64 = 1.06;

fn cluster(roles: usize) -> Allocator {
    let mut allocator = Allocator::new();
    let agent =
        Resources::parse("cpus:24;mem:65536;disk:409600;ports:[31000-32000]").unwrap_or_default();
    for i in 0..AGENTS {
        allocator.add_agent(&format!("agent-{i}"), agent.clone());
    }
    for i in 0..FRAMEWORKS {
        allocator.add_framework(
            &format!("framework-{i}"),
            &[format!("role-{}", i % roles)],
            false,
        );
    }
    allocator
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(name: &str, roles: usize, cycles: usize, refuse: Option<Duration>) -> Duration {
    let mut allocator = cluster(roles);
    let mut times = Vec::with_capacity(cycles);
    let mut offered = 0;
    for _ in 0..cycles {
        let now = Instant::now();
        let started = Instant::now();
        let allocations = allocator.allocate(now);
        times.push(started.elapsed());
        offered = allocations.len();
        for a in allocations {
            allocator.recover(
                &a.framework_id,
                &a.agent_id,
                &a.role,
                &a.resources,
                refuse,
                now,
            );
        }
    }
    times.sort();
    let median = percentile(&times, 0.5);
    println!(
        "{name:<9} {AGENTS} agents x {FRAMEWORKS} frameworks, {roles} role(s): median {:.1} ms, p90 {:.1} ms, max {:.1} ms over {cycles} cycles ({offered} offers in the last); Mesos 1.7: {:.0} ms -> {:.1}x faster",
        median.as_secs_f64() * 1e3,
        percentile(&times, 0.9).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        MESOS_CYCLE_SECONDS * 1e3,
        MESOS_CYCLE_SECONDS / median.as_secs_f64(),
    );
    median
}

fn main() {
    let cycles: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(21)
        .max(1);
    run("fresh", 1, cycles, None);
    run("roles", 100, cycles, None);
    run("declines", 1, cycles, Some(Duration::from_secs(3600)));
}
