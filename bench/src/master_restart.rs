//! Master restart with many tasks over many agents: the master is killed -9
//! and started again on its registry while 10 agents run 100 tasks each;
//! how long until it answers (registry read back), until every agent is
//! re-registered (the full view: `master/slaves_active` and
//! `master/tasks_running`), and until the framework, subscribed again, has
//! all its tasks RUNNING back from an implicit reconciliation. Next to it,
//! what the restart would cost if the tasks were lost with the master: all
//! of them launched again through the master (timed here for the same
//! tasks).
//!
//! `cargo build --release --workspace --bins && sudo target/release/master-restart [TASKS_PER_AGENT] [RESTARTS]`

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_bench::cluster::{Cluster, Scheduler, stats, task};
use serde_json::{Value, json};

const MASTER_PORT: u16 = 15260;
/// The agents' ports: 15261 to 15270.
const FIRST_AGENT_PORT: u16 = 15261;
const AGENTS: u16 = 10;

fn framework_info(id: Option<&Value>) -> Value {
    let mut info = json!({"user": "root", "name": "master-restart", "failover_timeout": 3600});
    if let Some(id) = id {
        info["id"] = id.clone();
    }
    info
}

/// The master's Mesos metrics, once it answers.
async fn snapshot(http: &reqwest::Client) -> Option<Value> {
    let url = format!("http://127.0.0.1:{MASTER_PORT}/metrics/snapshot");
    let body = http.get(url).send().await.ok()?.bytes().await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// Launches `per_agent` `sleep 3600` tasks on each agent and waits until
/// all run; how long that took.
async fn launch_sleepers(scheduler: &mut Scheduler, per_agent: usize) -> Duration {
    let started = Instant::now();
    let total = per_agent * usize::from(AGENTS);
    let mut placed: HashMap<String, usize> = HashMap::new();
    let mut launched = 0;
    while launched < total {
        let offer = scheduler.offer().await;
        let agent = offer["agent_id"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let here = placed.entry(agent).or_default();
        let batch: Vec<_> = (0..per_agent - *here)
            .map(|i| {
                task(
                    &format!("sleeper-{}", launched + i),
                    &offer["agent_id"],
                    &["/bin/sleep", "3600"],
                )
            })
            .collect();
        if batch.is_empty() {
            continue;
        }
        *here += batch.len();
        launched += batch.len();
        scheduler.accept(&offer, batch).await;
    }
    scheduler.until_running(total).await;
    started.elapsed()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let per_agent: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(100)
        .max(1);
    let restarts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let total = per_agent * usize::from(AGENTS);
    let dir = PathBuf::from("/var/lib/butte-bench/master-restart");
    let resources = format!("cpus:{};mem:{}", per_agent, per_agent * 32);
    let mut cluster = Cluster::start(&dir, MASTER_PORT, FIRST_AGENT_PORT, &resources).await;
    for port in FIRST_AGENT_PORT + 1..FIRST_AGENT_PORT + AGENTS {
        cluster.add_agent(port);
    }
    let http = reqwest::Client::new();
    let mut scheduler = Scheduler::try_subscribe(MASTER_PORT, framework_info(None))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let framework_id = scheduler.framework_id.clone();
    let relaunch = launch_sleepers(&mut scheduler, per_agent).await;
    println!(
        "{total} sleepers on {AGENTS} agents: launched through the master in {:.0} ms",
        relaunch.as_secs_f64() * 1e3
    );

    let (mut answering, mut full_view, mut reconciled) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..restarts {
        cluster.kill_master();
        drop(scheduler);
        let started = Instant::now();
        cluster.start_master();
        let mut answered = None;
        let deadline = started + Duration::from_secs(120);
        loop {
            assert!(
                Instant::now() < deadline,
                "no full view within 120 s; see {}",
                dir.display()
            );
            if let Some(metrics) = snapshot(&http).await {
                answered.get_or_insert_with(|| started.elapsed());
                let gauge = |name: &str| metrics[name].as_f64().unwrap_or(0.0) as usize;
                if gauge("master/slaves_active") == usize::from(AGENTS)
                    && gauge("master/tasks_running") == total
                {
                    full_view.push(started.elapsed());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        answering.push(answered.unwrap_or_default());
        scheduler = Scheduler::try_subscribe(MASTER_PORT, framework_info(Some(&framework_id)))
            .await
            .unwrap_or_else(|e| panic!("subscribe again: {e}"));
        assert!(scheduler.reconcile(&[]).await, "RECONCILE refused");
        scheduler.until_running(total).await;
        reconciled.push(started.elapsed());
    }
    stats("exec to answering (registry read back)", answering);
    stats(
        &format!("exec to all {AGENTS} agents re-registered with {total} tasks running"),
        full_view.clone(),
    );
    stats(
        &format!("exec to the framework subscribed again with {total} RUNNING reconciled"),
        reconciled,
    );
    full_view.sort();
    let median = full_view[full_view.len() / 2];
    println!(
        "restart vs relaunching every task: {:.0} ms vs {:.0} ms: {:.1}x",
        median.as_secs_f64() * 1e3,
        relaunch.as_secs_f64() * 1e3,
        relaunch.as_secs_f64() / median.as_secs_f64()
    );
    scheduler.teardown().await;
    drop(cluster);
}
