//! Soak (issue 15): short tasks for a while, launched through the master,
//! while a driver kills -9 the agent, its launcher and the master at random
//! and cuts the agent's link twice (a relay on loopback that drops every
//! byte). It counts what the framework saw: tasks never ended, ended as
//! lost, or ended more than once; whether the agent's books agree (nothing
//! running, no checkpoint left); and what is left behind after the agent is
//! drained (cgroups, pins, supervisors, records). RELIABILITY.md has the counts.
//!
//! `cargo build --release --workspace --bins && sudo target/release/soak [MINUTES] [TASKS]`
//! (10 and 1000 by default; SOAK_SEED=N repeats a run's chaos).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use butte_bench::cluster::{Cluster, Scheduler, task};
use butte_kernel_tests::launcher_of;
use butte_kernel_tests::link_cut::LinkCut;
use serde_json::{Value, json};

const MASTER_PORT: u16 = 15254;
const AGENT_PORT: u16 = 15255;
const RELAY_PORT: u16 = 15256;
const SUBTREE: &str = "butte/bench-15255";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chaos {
    KillAgent,
    KillLauncher,
    KillMaster,
    Cut(Duration),
}

/// A small xorshift: the chaos is random but repeatable from its seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// When each chaos action happens: kills every 40 s or so, in random
/// order, and two cuts of 30 s (shorter for a short run).
fn plan(length: Duration, random: &mut Random) -> Vec<(Duration, Chaos)> {
    let cut = Duration::from_secs(30).min(length / 10);
    let mut plan = vec![
        (length.mul_f64(0.3), Chaos::Cut(cut)),
        (length.mul_f64(0.65), Chaos::Cut(cut)),
    ];
    let kills = (length.as_secs() / 40).max(3);
    for i in 1..=kills {
        let at = length.mul_f64(i as f64 / (kills + 1) as f64);
        let jitter = Duration::from_millis(random.next() % 10_000);
        let action = [Chaos::KillAgent, Chaos::KillLauncher, Chaos::KillMaster]
            [(random.next() % 3) as usize];
        plan.push((at + jitter, action));
    }
    plan.sort_by_key(|(at, _)| *at);
    plan
}

/// Processes named butte-supervise.
fn supervisors() -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim() == "butte-supervise")
        })
        .count()
}

/// Directories under `dir` (none if it is missing).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// The agent's container cgroups, in every hierarchy.
fn cgroups() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = if root.join("cgroup.controllers").exists() {
        vec![root.to_owned()]
    } else {
        entries(root)
    };
    hierarchies
        .iter()
        .flat_map(|h| entries(&h.join(SUBTREE)))
        .collect()
}

async fn resubscribe(info: &Value) -> Scheduler {
    loop {
        match Scheduler::try_subscribe(MASTER_PORT, info.clone()).await {
            Ok(scheduler) => return scheduler,
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let tasks: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000)
        .max(1);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 | 1);
    let mut random = Random(seed);
    let length = Duration::from_secs_f64(minutes * 60.0);
    let mut chaos = plan(length, &mut random);
    println!("soak: {tasks} tasks over {minutes} min, seed {seed}; chaos: {chaos:?}");

    let relay = LinkCut::start(RELAY_PORT, MASTER_PORT).unwrap_or_else(|e| panic!("relay: {e}"));
    let dir = PathBuf::from("/var/lib/butte-bench/soak");
    let mut cluster =
        Cluster::start_via(&dir, MASTER_PORT, AGENT_PORT, RELAY_PORT, "cpus:8;mem:8192").await;
    let mut info = json!({"user": "root", "name": "soak", "failover_timeout": 3600});
    let mut scheduler = resubscribe(&info).await;
    info["id"] = scheduler.framework_id.clone();

    let started = Instant::now();
    let mut launched: Vec<String> = Vec::new();
    let mut ends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Each task's first end: state, reason and message.
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    let mut refused_accepts = 0;
    let mut heal_at: Option<Instant> = None;
    let mut done_chaos = Vec::new();
    let mut last_reconcile = Instant::now();
    loop {
        let now = started.elapsed();
        if heal_at.is_some_and(|at| Instant::now() >= at) {
            relay.heal();
            heal_at = None;
        }
        while chaos.first().is_some_and(|(at, _)| *at <= now) {
            let (_, action) = chaos.remove(0);
            match action {
                Chaos::KillAgent => {
                    cluster.kill_agent();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    cluster.start_agent();
                }
                Chaos::KillLauncher => {
                    if let Some(pid) = cluster.agent_pid().and_then(launcher_of) {
                        // SAFETY: kill(2) has no memory effects.
                        #[allow(unsafe_code)]
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
                Chaos::KillMaster => {
                    cluster.kill_master();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    cluster.start_master();
                }
                Chaos::Cut(length) => {
                    relay.cut();
                    heal_at = Some(Instant::now() + length);
                }
            }
            println!("{:>6.1} s: {action:?}", now.as_secs_f64());
            done_chaos.push(action);
        }
        let all_ended = launched.iter().all(|t| ends.contains_key(t));
        if now >= length && launched.len() >= tasks && all_ended && heal_at.is_none() {
            break;
        }
        if now >= length + Duration::from_secs(180) {
            println!(
                "gave up waiting for {} tasks",
                launched.iter().filter(|t| !ends.contains_key(*t)).count()
            );
            break;
        }
        // Past the launch window, ask after the tasks not ended yet.
        if now >= length && last_reconcile.elapsed() >= Duration::from_secs(5) {
            let open: Vec<String> = launched
                .iter()
                .filter(|t| !ends.contains_key(*t))
                .cloned()
                .collect();
            scheduler.reconcile(&open).await;
            last_reconcile = Instant::now();
        }
        let event = match tokio::time::timeout(Duration::from_millis(300), scheduler.next()).await {
            Ok(event) => event,
            Err(_) => continue,
        };
        if event.is_null() {
            // The master went away: subscribe again with the framework's id.
            scheduler = resubscribe(&info).await;
            continue;
        }
        match event["type"].as_str() {
            Some("OFFERS") => {
                let due = ((tasks as f64) * (now.as_secs_f64() / (length.as_secs_f64() * 0.9)))
                    .ceil() as usize;
                let due = due.min(tasks);
                if launched.len() < due {
                    let offer = scheduler.offer().await;
                    // No more than the offer holds (0.01 cpus and 16 MB a task).
                    let fits = ["cpus", "mem"]
                        .iter()
                        .zip([0.01, 16.0])
                        .map(|(name, each)| {
                            offer["resources"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|r| r["name"] == *name)
                                .filter_map(|r| r["scalar"]["value"].as_f64())
                                .sum::<f64>()
                                / each
                        });
                    let room = fits.fold(4.0_f64, f64::min).floor() as usize;
                    let batch: Vec<String> = (launched.len()..due.min(launched.len() + room))
                        .map(|i| format!("soak-{i}"))
                        .collect();
                    let infos = batch
                        .iter()
                        .map(|id| {
                            // Every fifth fails on purpose: a failure must arrive as one.
                            let exit = if id.ends_with('0') || id.ends_with('5') {
                                "3"
                            } else {
                                "0"
                            };
                            let command = format!("sleep 0.5; exit {exit}");
                            task(id, &offer["agent_id"], &["/bin/sh", "-c", &command])
                        })
                        .collect();
                    if scheduler.accept(&offer, infos).await {
                        launched.extend(batch);
                    } else {
                        refused_accepts += 1;
                    }
                }
                scheduler.decline_all().await;
            }
            Some("UPDATE") => {
                let status = &event["update"]["status"];
                let state = status["state"].as_str().unwrap_or_default().to_owned();
                let id = status["task_id"]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let why = format!(
                    "at {:.0} s: {} {}: {}",
                    now.as_secs_f64(),
                    state,
                    status["reason"].as_str().unwrap_or_default(),
                    status["message"].as_str().unwrap_or_default()
                );
                let terminal = !matches!(
                    state.as_str(),
                    "TASK_STAGING" | "TASK_STARTING" | "TASK_RUNNING" | "TASK_KILLING"
                );
                // An answer to reconciliation carries no uuid and may repeat.
                if terminal {
                    reasons.entry(id.clone()).or_insert(why);
                }
                if terminal && status.get("uuid").is_some() {
                    ends.entry(id).or_default().push(state);
                } else if terminal {
                    ends.entry(id).or_insert_with(|| vec![state]);
                }
            }
            _ => {}
        }
    }

    let launched_set: HashSet<&String> = launched.iter().collect();
    let never_ended = launched.iter().filter(|t| !ends.contains_key(*t)).count();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut twice = Vec::new();
    let mut wrong = Vec::new();
    for (id, states) in &ends {
        if !launched_set.contains(id) {
            continue;
        }
        *counts.entry(states[0].as_str()).or_default() += 1;
        if states.len() > 1 {
            twice.push(format!("{id}: {states:?}"));
        }
        let should_fail = id.ends_with('0') || id.ends_with('5');
        let expected = if should_fail {
            "TASK_FAILED"
        } else {
            "TASK_FINISHED"
        };
        if states[0] != expected {
            wrong.push(reasons.get(id).cloned().unwrap_or_default());
        }
    }
    println!("chaos done: {done_chaos:?}");
    println!(
        "launched {} (ACCEPTs refused while the master was down: {refused_accepts}); ends: {counts:?}",
        launched.len()
    );
    println!(
        "never ended: {never_ended}; ended more than once: {}; ended other than their command says: {}",
        twice.len(),
        wrong.len()
    );
    for line in twice.iter().take(10) {
        println!("  {line}");
    }
    let mut why: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in &wrong {
        *why.entry(reason.as_str()).or_default() += 1;
    }
    for (reason, count) in why {
        println!("  {count} × {reason}");
    }
    // The agent's books against the framework's: nothing running, nothing checkpointed.
    let running = cgroups().len();
    let checkpointed: usize = entries(&dir.join("agent/meta/frameworks"))
        .iter()
        .map(|f| entries(&f.join("tasks")).len())
        .sum();
    println!(
        "agent before drain: {running} container cgroups, {checkpointed} task checkpoints, {} supervisors",
        supervisors()
    );
    // With nothing running, the master must hold nothing as used.
    let slaves: Value = match reqwest::get(format!("http://127.0.0.1:{MASTER_PORT}/slaves")).await {
        Ok(response) => {
            serde_json::from_str(&response.text().await.unwrap_or_default()).unwrap_or_default()
        }
        Err(_) => Value::Null,
    };
    println!(
        "master's view of the agent with nothing running: used {}, offered {}",
        slaves["slaves"][0]["used_resources"], slaves["slaves"][0]["offered_resources"]
    );
    scheduler.teardown().await;
    drop(cluster);
    let pins = Path::new("/sys/fs/bpf/butte/butte_bench-15255").exists();
    let records = entries(&dir.join("agent/meta/containers")).len();
    println!(
        "left after drain: {} cgroups, pins: {pins}, {} supervisors, {records} container records",
        cgroups().len(),
        supervisors()
    );
}
