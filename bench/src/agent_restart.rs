//! Agent restart with many running tasks: the agent is killed -9 and started
//! again on its work dir; how long until every task is re-adopted (the
//! agent's own count) and the agent is registered with the master again,
//! next to what the restart cost before recovery existed: every task killed
//! and launched again through the master (timed here for the same tasks).
//! Also the memory a container's supervisor costs (proportional set size).
//!
//! `cargo build --release --workspace --bins && sudo target/release/agent-restart [TASKS] [RESTARTS]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_bench::cluster::{Cluster, Scheduler, stats, task};

const MASTER_PORT: u16 = 15252;
const AGENT_PORT: u16 = 15253;
const PER_OFFER: usize = 100;

/// Launches `count` `sleep 600` tasks and waits until all run; how long that took.
async fn launch_sleepers(scheduler: &mut Scheduler, count: usize) -> Duration {
    let started = Instant::now();
    let mut launched = 0;
    while launched < count {
        let offer = scheduler.offer().await;
        let batch: Vec<_> = (launched..count.min(launched + PER_OFFER))
            .map(|i| {
                task(
                    &format!("sleeper-{i}"),
                    &offer["agent_id"],
                    &["/bin/sleep", "600"],
                )
            })
            .collect();
        launched += batch.len();
        scheduler.accept(&offer, batch).await;
    }
    scheduler.until_running(count).await;
    started.elapsed()
}

/// Supervisors running and their mean proportional set size, in KiB.
fn supervisors() -> (usize, f64) {
    let mut pss = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let is_supervisor = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.trim() == "butte-supervise");
        if !is_supervisor {
            continue;
        }
        let rollup = std::fs::read_to_string(path.join("smaps_rollup")).unwrap_or_default();
        if let Some(kib) = rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            pss.push(kib);
        }
    }
    let mean = pss.iter().sum::<f64>() / pss.len().max(1) as f64;
    (pss.len(), mean)
}

/// The `millis=` and `running=` of the agent's recovery line.
fn recovery_figures(line: &str) -> (u64, usize) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("millis="), field("running=") as usize)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000)
        .max(1);
    let restarts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let dir = PathBuf::from("/var/lib/butte-bench/agent-restart");
    let mut cluster = Cluster::start(&dir, MASTER_PORT, AGENT_PORT, "cpus:64;mem:65536").await;
    let mut scheduler = Scheduler::subscribe(MASTER_PORT).await;
    let relaunch = launch_sleepers(&mut scheduler, count).await;
    let (supervisors, pss_kib) = supervisors();
    println!(
        "{count} sleepers running: launched through the master in {:.0} ms; {supervisors} supervisors, {pss_kib:.0} KiB each (PSS)",
        relaunch.as_secs_f64() * 1e3
    );
    let mut adopted = Vec::new();
    let mut registered = Vec::new();
    for _ in 0..restarts {
        cluster.kill_agent();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        cluster.start_agent();
        let line = cluster
            .agent_logged("registered with the master", Duration::from_secs(60))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "the agent did not register again; see {}",
                    cluster.agent_log().display()
                )
            });
        registered.push(started.elapsed());
        let _ = line;
        let recovered = cluster
            .agent_logged("recovered the tasks", Duration::from_secs(1))
            .await
            .unwrap_or_default();
        let (millis, running) = recovery_figures(&recovered);
        assert_eq!(running, count, "every sleeper re-adopted: {recovered}");
        adopted.push(Duration::from_millis(millis));
    }
    stats(
        &format!("re-adopting {count} running tasks (the agent's recovery)"),
        adopted,
    );
    stats(
        &format!("exec to registered again with {count} tasks"),
        registered.clone(),
    );
    registered.sort();
    let median = registered[registered.len() / 2];
    println!(
        "restart vs killing and relaunching them: {:.0} ms vs {:.0} ms: {:.1}x",
        median.as_secs_f64() * 1e3,
        relaunch.as_secs_f64() * 1e3,
        relaunch.as_secs_f64() / median.as_secs_f64()
    );
    scheduler.teardown().await;
    drop(cluster);
}
