//! Work survives the agent: through master + agent + a mesoshttp framework
//! (tests/recovery_framework.py), with tasks running,
//! 1. the launcher alone is killed -9: no task notices, a task ends and is
//!    reported, and the next launch works (a new launcher);
//! 2. the agent is killed -9; while no agent runs, one task finishes, one
//!    fails, one is killed -9 by hand, and one tries a bind outside its
//!    ports, which the pinned fence still refuses; the agent is started
//!    again on the same work dir, as a new build would be (its eBPF maps
//!    made anew): the framework hears each real end, once, never TASK_LOST,
//!    the fence holds over the new maps, and the task that kept running is
//!    killed as asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use butte_kernel_tests::launcher_of;

mod common;
use common::cluster::{Cluster, http_get, http_post_json, wait_for};

const MASTER_PORT: u16 = 15_182;
const AGENT_PORT: u16 = 15_183;

fn kill(pid: i32) {
    // SAFETY: kill(2) has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}");
}

fn tell(cluster: &Cluster, task_id: &str) {
    std::fs::write(cluster.sandbox(task_id).join("go"), "").unwrap();
}

/// The framework's next JSON line (its failures say why).
fn next_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    cluster: &Cluster,
) -> serde_json::Value {
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("FAILED") {
            panic!(
                "{line}\nagent log (newest first):\n{}",
                cluster.agent_log_tail(30)
            );
        }
        if let Ok(value) = serde_json::from_str(&line) {
            return value;
        }
    }
    panic!(
        "the framework ended early; agent log (newest first):\n{}",
        cluster.agent_log_tail(30)
    );
}

fn expect_phase(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    cluster: &Cluster,
    phase: &str,
) {
    let value = next_line(lines, cluster);
    assert_eq!(value["phase"], phase, "{value}");
}

fn binds(sandbox: &Path, file: &str) -> Option<String> {
    let text = std::fs::read_to_string(sandbox.join(file)).ok()?;
    (text.lines().count() == 2).then_some(text)
}

/// The binds outside and inside the task's ports: refused, and allowed.
fn assert_fenced(tried: &str, when: &str) {
    assert!(
        tried.contains("31001 EPERM") || tried.contains("31001 EACCES"),
        "a bind outside the task's ports is refused {when}:\n{tried}"
    );
    assert!(
        tried.contains("31000 ok"),
        "its own port binds {when}:\n{tried}"
    );
}

/// The agent's pinned maps, one directory per build of each object.
fn pinned_maps(cluster: &Cluster) -> Vec<std::path::PathBuf> {
    let pins = Path::new("/sys/fs/bpf/butte").join(cluster.subtree.replace('/', "_"));
    std::fs::read_dir(pins.join("maps"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn tasks_live_through_the_launchers_death_and_the_agents_kill_9() {
    let mut cluster = Cluster::start(
        "recovery",
        MASTER_PORT,
        AGENT_PORT,
        "cpus:2;mem:1024;ports:[31000-31010]",
    );
    let mut framework = cluster
        .framework("recovery_framework.py", "recovery", 240)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(cluster.dir.join("framework.err")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(framework.stdout.take().unwrap()).lines();
    expect_phase(&mut lines, &cluster, "running");

    // 1. The launcher alone.
    let agent = cluster.agent_pid().unwrap();
    let launcher = launcher_of(agent).expect("the agent's launcher");
    kill(launcher);
    wait_for("a new launcher", || {
        launcher_of(agent).is_some_and(|pid| pid != launcher)
    });
    tell(&cluster, "finish");
    expect_phase(&mut lines, &cluster, "agent");

    // 2. The agent, kill -9; the tasks go on without it.
    let long = cluster.container_pids("long");
    assert!(!long.is_empty(), "long runs");
    cluster.kill_agent();
    tell(&cluster, "fail");
    tell(&cluster, "fenced");
    let killed = cluster.container_pids("killed");
    assert!(!killed.is_empty(), "killed runs");
    for pid in killed {
        // Killing the container's init takes the rest of its pid namespace
        // with it: a later pid may be gone already.
        // SAFETY: kill(2) has no memory effects.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let fenced = cluster.sandbox("fenced");
    wait_for("the fenced task's binds", || {
        binds(&fenced, "bind").is_some()
    });
    assert_fenced(&binds(&fenced, "bind").unwrap(), "while no agent runs");
    wait_for("fail and killed to end", || {
        cluster.container_pids("fail").is_empty() && cluster.container_pids("killed").is_empty()
    });
    assert_eq!(
        cluster.container_pids("long"),
        long,
        "long ran on untouched"
    );
    // As an upgrade to a new build: the maps pinned are another build's, so
    // the new agent makes its own and must fill them before taking over
    // the links.
    let maps = pinned_maps(&cluster);
    assert_eq!(
        maps.len(),
        3,
        "ports, devices and network maps pinned: {maps:?}"
    );
    for dir in &maps {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let object = name.rsplit_once('-').unwrap().0;
        std::fs::rename(
            dir,
            dir.with_file_name(format!("{object}-0000000000000000")),
        )
        .unwrap();
    }
    cluster.start_agent();
    wait_for("the agent's second run to register", || {
        std::fs::read_to_string(cluster.dir.join("agent-2.log"))
            .is_ok_and(|log| log.contains("registered with the master"))
    });
    std::fs::write(fenced.join("go2"), "").unwrap();
    wait_for("the fenced task's binds after the restart", || {
        binds(&fenced, "bind2").is_some()
    });
    assert_fenced(
        &binds(&fenced, "bind2").unwrap(),
        "over the new build's maps",
    );
    let maps = pinned_maps(&cluster);
    assert!(
        maps.len() == 3
            && !maps
                .iter()
                .any(|d| d.to_string_lossy().ends_with("-0000000000000000")),
        "the old build's maps are gone once the links run the new programs: {maps:?}"
    );

    let result = next_line(&mut lines, &cluster);
    let status = framework.wait().unwrap();
    assert!(status.success(), "framework: {result}");
    let final_ = &result["final"];
    let ended = |task: &str| -> (String, String) {
        let ends = final_[task]
            .as_array()
            .unwrap_or_else(|| panic!("{task} never ended: {result}"));
        assert_eq!(ends.len(), 1, "{task} ended once: {ends:?}");
        (
            ends[0][0].as_str().unwrap().to_owned(),
            ends[0][1].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(ended("finish").0, "TASK_FINISHED");
    assert_eq!(
        ended("after").0,
        "TASK_FINISHED",
        "a launch after the launcher's death"
    );
    assert_eq!(ended("fenced").0, "TASK_FINISHED");
    let (state, message) = ended("fail");
    assert_eq!(state, "TASK_FAILED");
    assert!(message.contains("status 7"), "{message}");
    let (state, message) = ended("killed");
    assert_eq!(state, "TASK_FAILED");
    assert!(message.contains("signal 9"), "{message}");
    assert_eq!(ended("long").0, "TASK_KILLED");
    let seen = result["seen"].as_array().unwrap();
    assert!(
        !seen.iter().any(|u| u[1] == "TASK_LOST"),
        "no task was reported lost: {seen:?}"
    );
    let log = std::fs::read_to_string(cluster.dir.join("agent-2.log")).unwrap();
    assert!(
        !log.contains("pinned link") && !log.contains("pin that cannot"),
        "every pinned link switched in one step:\n{log}"
    );
    assert!(
        log.contains("recovered the tasks of the previous run")
            && log.contains("running=2")
            && log.contains("ended_meanwhile=2"),
        "the new agent took back 2 running tasks (long, fenced) and 2 that ended meanwhile (fail, killed):\n{log}"
    );
    // The operator marks the agent gone: it kills what it runs, forgets
    // its id and exits, leaving nothing behind.
    let slaves: serde_json::Value =
        serde_json::from_str(&http_get(MASTER_PORT, "/slaves").unwrap()).unwrap();
    let agent_id = slaves["slaves"][0]["id"].as_str().unwrap().to_owned();
    let call = serde_json::json!({"type": "MARK_AGENT_GONE",
        "mark_agent_gone": {"agent_id": {"value": agent_id}}});
    let (status, body) = http_post_json(MASTER_PORT, "/api/v1", &call.to_string()).unwrap();
    assert!(status.contains("200"), "{status}: {body}");
    wait_for("the gone agent to drain and exit", || {
        cluster.agent_exited()
    });
    assert!(
        cluster.cgroups_left().is_empty(),
        "drained: {:?}",
        cluster.cgroups_left()
    );
    let pins = Path::new("/sys/fs/bpf/butte").join(cluster.subtree.replace('/', "_"));
    assert!(!pins.exists(), "its pins are gone");
    assert!(
        !cluster.dir.join("agent/meta/agent_id").exists(),
        "it forgot its id, to join as a new agent"
    );
}
