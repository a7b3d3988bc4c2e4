//! ACCEPT to TASK_RUNNING through the master: the master and agent binaries
//! on loopback, a JSON scheduler that launches one task per offer, acknowledges
//! every update, and times each ACCEPT until the task's TASK_RUNNING arrives.
//! This includes the agent's hop to its launcher and the status update
//! stream's acknowledgement of TASK_STARTING before TASK_RUNNING (as in Mesos).
//! A second cluster runs beside it with authentication and TLS on (HTTPS
//! with HTTP Basic for the scheduler, the agent link over TLS with the
//! agent's certificate), launches alternating between the two, so that
//! both meet the same machine state; the difference of the medians is
//! what authentication and TLS cost (connections are kept alive).
//!
//! `cargo build --release --workspace --bins && sudo target/release/accept-to-running [LAUNCHES]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_bench::cluster::{Cluster, Scheduler, Secured, stats, task};

const MASTER_PORT: u16 = 15250;
const AGENT_PORT: u16 = 15251;
const SECURED_MASTER_PORT: u16 = 15252;
const SECURED_AGENT_PORT: u16 = 15253;

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
    let secured = Secured::make(&dir.with_extension("pki"));
    let secured_cluster = Cluster::start_secured(
        &dir.with_extension("secured"),
        SECURED_MASTER_PORT,
        SECURED_AGENT_PORT,
        "cpus:8;mem:8192",
        &secured,
    )
    .await;
    let mut scheduler = Scheduler::subscribe(MASTER_PORT).await;
    let mut secured_scheduler = Scheduler::subscribe_secured(SECURED_MASTER_PORT, &secured).await;
    let (mut samples, mut secured_samples) = (Vec::new(), Vec::new());
    let mut no_running = Vec::new();
    for i in 0..launches {
        for (scheduler, samples, kind) in [
            (&mut scheduler, &mut samples, "plain"),
            (&mut secured_scheduler, &mut secured_samples, "secured"),
        ] {
            let task_id = format!("bench-{kind}-{i}");
            match launch(scheduler, &task_id).await {
                Some(took) => samples.push(took),
                None => no_running.push(task_id),
            }
        }
    }
    let plain = stats("ACCEPT -> TASK_RUNNING through master and agent", samples);
    let with_tls = stats("the same with authentication and TLS on", secured_samples);
    println!(
        "authentication and TLS add {:+.3} ms to the median",
        (with_tls.as_secs_f64() - plain.as_secs_f64()) * 1e3
    );
    if !no_running.is_empty() {
        println!(
            "{} of {} tasks ended without TASK_RUNNING: {}",
            no_running.len(),
            2 * launches,
            no_running.join(", ")
        );
    }
    scheduler.teardown().await;
    secured_scheduler.teardown().await;
    drop(cluster);
    drop(secured_cluster);
    let _ = std::fs::remove_dir_all(dir.with_extension("pki"));
}
