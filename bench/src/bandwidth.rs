//! Bandwidth accuracy of our per-task egress limit (a token bucket in a
//! cgroup_skb egress program) against `tc` tbf, side by side in one run:
//! iperf3 TCP from the host to a server in a network namespace over a veth
//! pair, 20/100/500 Mbit/s configured, achieved/configured printed for both.
//! tbf shapes the veth (every flow on it); ours holds the one task's cgroup.
//!
//! `cargo run --release -p butte-bench --bin bandwidth [-- SECONDS]`

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use butte_agent_ebpf::network::{self, Network};
use butte_isolators::cgroups::{Isolator, Limits, detect};
use butte_isolators::container::{ContainerSpec, spawn, wait};

const NETNS: &str = "butte-bench-bw";
const HOST_IF: &str = "bbw0";
const PEER_IF: &str = "bbw1";
const HOST_IP: &str = "10.251.0.1";
const PEER_IP: &str = "10.251.0.2";
const PORT: &str = "15260";
const WORK: &str = "/var/lib/butte-bench/bandwidth";

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e} (apt: iproute2)", args[0]));
    assert!(status.success(), "{} failed", args.join(" "));
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status();
}

/// A veth pair to a fresh namespace, an iperf3 server inside it.
fn set_up() -> Child {
    tear_down();
    sh(&["ip", "netns", "add", NETNS]);
    sh(&[
        "ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF,
    ]);
    sh(&["ip", "link", "set", PEER_IF, "netns", NETNS]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_IP}/30"),
        "dev",
        HOST_IF,
    ]);
    sh(&["ip", "link", "set", HOST_IF, "up"]);
    let inside = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", NETNS];
        all.extend_from_slice(args);
        sh(&all);
    };
    inside(&[
        "ip",
        "addr",
        "add",
        &format!("{PEER_IP}/30"),
        "dev",
        PEER_IF,
    ]);
    inside(&["ip", "link", "set", PEER_IF, "up"]);
    inside(&["ip", "link", "set", "lo", "up"]);
    let server = Command::new("ip")
        .args([
            "netns", "exec", NETNS, "iperf3", "-s", "-B", PEER_IP, "-p", PORT,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("iperf3 server: {e}"));
    std::thread::sleep(Duration::from_millis(500));
    server
}

fn tear_down() {
    quiet(&["ip", "netns", "del", NETNS]);
    quiet(&["ip", "link", "del", HOST_IF]);
}

fn iperf_args(seconds: u64) -> Vec<String> {
    [
        "iperf3",
        "-c",
        PEER_IP,
        "-p",
        PORT,
        "-J",
        "-t",
        &seconds.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn received_mbit(json: &str) -> f64 {
    let report: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("iperf3 output: {e}: {json}"));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no result: {json}"))
        / 1e6
}

/// tbf on the host side of the veth; the client runs on the host.
fn with_tbf(mbit: f64, seconds: u64) -> f64 {
    // A burst of 10 ms of traffic (at least 64 KiB), 50 ms of queue.
    let burst = ((mbit * 1e6 / 8.0 / 100.0) as u64).max(64 * 1024);
    sh(&[
        "tc",
        "qdisc",
        "replace",
        "dev",
        HOST_IF,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        "latency",
        "50ms",
    ]);
    let args = iperf_args(seconds);
    let output = Command::new(&args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("iperf3: {e}"));
    sh(&["tc", "qdisc", "del", "dev", HOST_IF, "root"]);
    received_mbit(&String::from_utf8_lossy(&output.stdout))
}

/// Our limit on a task's cgroup; the client runs in that task.
fn with_butte(isolator: &dyn Isolator, network: &mut Network, mbit: f64, seconds: u64) -> f64 {
    let id = format!("bw-{mbit}");
    let placement = isolator
        .create(
            &id,
            &Limits {
                cpus: 1.0,
                mem_mb: 256.0,
                pids_max: 16,
            },
        )
        .unwrap_or_else(|e| panic!("cgroups: {e}"));
    let key = std::fs::metadata(&placement.unified)
        .map(|m| m.ino())
        .unwrap_or_else(|e| panic!("{e}"));
    let limits = network::Limits {
        egress_mbit_per_s: Some(mbit),
        police_ingress: false,
    };
    network
        .track(key, limits, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let sandbox = PathBuf::from(WORK).join(&id);
    std::fs::create_dir_all(&sandbox).unwrap_or_else(|e| panic!("sandbox: {e}"));
    let spec = ContainerSpec {
        argv: iperf_args(seconds),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        sandbox: sandbox.clone(),
        hostname: id.clone(),
        cgroup: placement.unified,
        v1_procs: placement.v1_procs,
        tmp_mb: 16,
        privileges: Default::default(),
    };
    let child = spawn(&spec).unwrap_or_else(|e| panic!("spawn: {e}"));
    wait(&child.pidfd).unwrap_or_else(|e| panic!("wait: {e}"));
    network.forget(key);
    let _ = isolator.destroy(&id);
    let stdout = std::fs::read_to_string(sandbox.join("stdout")).unwrap_or_default();
    received_mbit(&stdout)
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5)
        .max(1);
    let isolator = detect(Path::new("/sys/fs/cgroup"), Path::new("butte/bench-bw"))
        .unwrap_or_else(|e| panic!("cgroups (run as root): {e}"));
    let mut network =
        Network::attach(&isolator.v2_subtree(), None).unwrap_or_else(|e| panic!("{e}"));
    let mut server = set_up();
    let started = Instant::now();
    println!("iperf3 TCP over a veth for {seconds} s each; achieved / configured");
    println!("{:>10}  {:>16}  {:>16}", "Mbit/s", "tc tbf", "butte eBPF");
    for mbit in [20.0, 100.0, 500.0] {
        let tbf = with_tbf(mbit, seconds);
        let ours = with_butte(&*isolator, &mut network, mbit, seconds);
        println!(
            "{mbit:>10}  {:>7.1} = {:.3}  {:>7.1} = {:.3}",
            tbf,
            tbf / mbit,
            ours,
            ours / mbit
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    tear_down();
    drop(network);
    isolator.remove_subtree();
    let _ = std::fs::remove_dir_all(WORK);
    println!("({:.0} s)", started.elapsed().as_secs_f64());
}
