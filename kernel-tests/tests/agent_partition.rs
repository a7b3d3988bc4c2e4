//! The agent's link to the master cut by a relay on loopback that drops
//! every byte (`common::link_cut`), with a partition-aware framework and one
//! that is not, both real mesoshttp clients (tests/driven_framework.py),
//! on the master's default timers (15 s x 5 ping timeouts, as Mesos):
//! 1. a 30 s cut, within the master's ping timeouts: a task that ends
//!    during it is reported as it ended, never lost or unreachable;
//! 2. a 2-minute cut, past them: the master marks the agent unreachable.
//!    The partition-aware framework sees TASK_UNREACHABLE, then, once the
//!    link heals, the real end of its task that finished meanwhile and its
//!    running task RUNNING again on reconciliation; the other framework
//!    sees TASK_LOST, once, and its task is killed on the agent;
//! 3. the master killed -9 and started again: the frameworks, with a
//!    `failover_timeout` of 0, subscribe again by themselves, and the
//!    running task is still RUNNING, in the same container.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;
use butte_kernel_tests::link_cut::LinkCut;
use common::cluster::{Cluster, Ports, wait_for};
use common::driven::Driven;

const MASTER_PORT: u16 = 15_184;
const AGENT_PORT: u16 = 15_185;
const RELAY_PORT: u16 = 15_186;
/// Within the master's 5 x 15 s of patience, and past it.
const SHORT_CUT: Duration = Duration::from_secs(30);
const LONG_CUT: Duration = Duration::from_secs(120);
const WAIT_FOR_GO: &str = "while [ ! -e $MESOS_SANDBOX/go ]; do sleep 0.1; done; exit 0";

fn tell(cluster: &Cluster, task_id: &str) {
    std::fs::write(cluster.sandbox(task_id).join("go"), "").unwrap();
}

#[test]
fn a_cut_link_loses_no_end_and_partition_aware_frameworks_see_the_truth_after() {
    // The master's default timers: unreachable after 5 ping timeouts of
    // 15 s of silence.
    let relay = LinkCut::start(RELAY_PORT, MASTER_PORT).unwrap();
    let mut cluster = Cluster::start_via(
        "partition",
        Ports {
            master: MASTER_PORT,
            agent: AGENT_PORT,
            agent_to_master: RELAY_PORT,
        },
        "cpus:2;mem:1024",
        &[],
    );
    let mut aware = Driven::start(
        &cluster,
        "aware",
        true,
        &[
            ("short-end", WAIT_FOR_GO),
            ("long-end", WAIT_FOR_GO),
            ("stay", "sleep 600"),
        ],
    );
    for task in ["short-end", "long-end", "stay"] {
        aware.until(task, "TASK_RUNNING", Duration::from_secs(60));
    }
    let mut plain = Driven::start(&cluster, "plain", false, &[("plain-stay", "sleep 600")]);
    plain.until("plain-stay", "TASK_RUNNING", Duration::from_secs(60));

    // 1. A 30 s cut, shorter than the master's patience.
    aware.mark();
    relay.cut();
    tell(&cluster, "short-end");
    std::thread::sleep(SHORT_CUT);
    relay.heal();
    aware.until("short-end", "TASK_FINISHED", Duration::from_secs(60));
    assert_eq!(
        aware.states_of("short-end").last(),
        Some(&"TASK_FINISHED"),
        "{:?}",
        aware.seen
    );
    assert!(
        !aware
            .seen
            .iter()
            .any(|(_, s, _)| s == "TASK_LOST" || s == "TASK_UNREACHABLE"),
        "a short cut makes nothing lost or unreachable: {:?}",
        aware.seen
    );

    // 2. A 2-minute cut, past it: the agent is unreachable.
    aware.mark();
    relay.cut();
    let cut_at = Instant::now();
    let reason = aware.until("stay", "TASK_UNREACHABLE", LONG_CUT);
    assert_eq!(reason, "REASON_AGENT_REMOVED");
    aware.until("long-end", "TASK_UNREACHABLE", Duration::from_secs(10));
    plain.until("plain-stay", "TASK_LOST", Duration::from_secs(10));
    tell(&cluster, "long-end");
    wait_for("long-end to end on the agent", || {
        cluster.container_pids("long-end").is_empty()
    });
    std::thread::sleep(LONG_CUT.saturating_sub(cut_at.elapsed()));
    relay.heal();
    aware.until("long-end", "TASK_FINISHED", Duration::from_secs(60));
    aware.mark();
    aware.send("reconcile stay");
    aware.until("stay", "TASK_RUNNING", Duration::from_secs(60));
    wait_for("the lost task killed on the agent", || {
        cluster.container_pids("plain-stay").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    plain.drain();
    let ends: Vec<&str> = plain
        .states_of("plain-stay")
        .into_iter()
        .filter(|s| *s != "TASK_STARTING" && *s != "TASK_RUNNING")
        .collect();
    assert_eq!(
        ends,
        vec!["TASK_LOST"],
        "lost once, never taken back: {:?}",
        plain.seen
    );

    // 3. The master killed -9 and started again: the frameworks (whose
    // failover_timeout is 0) subscribe again by themselves (mesoshttp
    // retries after 10 s), and the running task runs on, in its container.
    let stay_pids = cluster.container_pids("stay");
    aware.mark();
    cluster.restart_master();
    aware.until("", "SUBSCRIBED", Duration::from_secs(60));
    aware.send("reconcile stay");
    aware.until("stay", "TASK_RUNNING", Duration::from_secs(60));
    assert_eq!(
        cluster.container_pids("stay"),
        stay_pids,
        "the same container"
    );

    aware.mark();
    aware.send("kill stay");
    aware.until("stay", "TASK_KILLED", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    aware.drain();
    for task in ["short-end", "long-end"] {
        assert_eq!(
            aware.states_since_end(task),
            vec!["TASK_FINISHED"],
            "{task} ended once: {:?}",
            aware.seen
        );
    }
    drop(aware);
    drop(plain);
    cluster.stop_agent();
}
