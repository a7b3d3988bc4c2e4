//! ACCEPT to TASK_RUNNING through the master: the master and agent binaries
//! on loopback, a JSON scheduler that launches one task per offer, acknowledges
//! every update, and times each ACCEPT until the task's TASK_RUNNING arrives.
//! This includes the agent's hop to its launcher and the status update
//! stream's acknowledgement of TASK_STARTING before TASK_RUNNING (as in Mesos).
//!
//! `cargo build --release --workspace --bins && sudo target/release/accept-to-running [LAUNCHES]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_bench::cluster::{Cluster, Scheduler, stats, task};

const MASTER_PORT: u16 = 15250;
const AGENT_PORT: u16 = 15251;

/// Launches `task_id` (`/bin/true`) on the oldest offer; the time from
/// ACCEPT to its TASK_RUNNING, or None when it ended without one.
async fn launch(scheduler: &mut Scheduler, task_id: &str) -> Option<Duration> {
    let offer = scheduler.offer().await;
    let started = Instant::now();
    scheduler
        .accept(
            &offer,
            vec![task(task_id, &offer["agent_id"], &["/bin/true"])],
        )
        .await;
    loop {
        let event = scheduler.next().await;
        let status = &event["update"]["status"];
        if event["type"] != "UPDATE" || status["task_id"]["value"] != task_id {
            continue;
        }
        match status["state"].as_str() {
            Some("TASK_RUNNING") => return Some(started.elapsed()),
            Some("TASK_STARTING") => {}
            // Ended without ever being reported RUNNING.
            _ => return None,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let launches: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500)
        .max(1);
    let dir = PathBuf::from("/var/lib/butte-bench/accept-to-running");
    let cluster = Cluster::start(&dir, MASTER_PORT, AGENT_PORT, "cpus:8;mem:8192").await;
    let mut scheduler = Scheduler::subscribe(MASTER_PORT).await;
    let mut samples = Vec::with_capacity(launches);
    let mut no_running = Vec::new();
    for i in 0..launches {
        let task_id = format!("bench-{i}");
        match launch(&mut scheduler, &task_id).await {
            Some(took) => samples.push(took),
            None => no_running.push(task_id),
        }
    }
    stats("ACCEPT -> TASK_RUNNING through master and agent", samples);
    if !no_running.is_empty() {
        println!(
            "{} of {launches} tasks ended without TASK_RUNNING: {}",
            no_running.len(),
            no_running.join(", ")
        );
    }
    scheduler.teardown().await;
    drop(cluster);
}
