//! Helpers shared by the kernel test files: task cgroups, sandboxes and
//! shell containers on this machine.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

pub mod cluster;
pub mod driven;
pub mod fake_master;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use butte_isolators::cgroups::{Isolator, Limits, Placement, detect};
use butte_isolators::container::{ContainerSpec, Exit, spawn, wait};

pub fn isolator() -> Box<dyn Isolator> {
    isolator_at("butte")
}

/// Task cgroups under `subtree` (its own subtree lets a test attach eBPF
/// programs there without meeting another test's).
pub fn isolator_at(subtree: &str) -> Box<dyn Isolator> {
    assert_eq!(unsafe_geteuid(), 0, "kernel tests need root");
    detect(Path::new("/sys/fs/cgroup"), Path::new(subtree))
        .expect("a cgroup hierarchy on this host")
}

#[allow(unsafe_code)]
pub fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

pub fn sandbox(id: &str) -> PathBuf {
    // Not under /tmp: the task's private /tmp would hide it.
    let dir = PathBuf::from(format!("/var/lib/butte-kernel-tests/{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn run(
    isolator: &dyn Isolator,
    id: &str,
    limits: Limits,
    script: &str,
) -> (Exit, String, PathBuf) {
    let placement = isolator.create(id, &limits).unwrap();
    let sandbox = sandbox(id);
    let child = spawn(&shell_spec(id, &placement, &sandbox, script)).unwrap();
    let exit = wait(&child.pidfd).unwrap();
    let stdout = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    (exit, stdout, sandbox)
}

/// A container running `script` under `sh -c`, with PATH and MESOS_SANDBOX set.
pub fn shell_spec(id: &str, placement: &Placement, sandbox: &Path, script: &str) -> ContainerSpec {
    ContainerSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("MESOS_SANDBOX".into(), sandbox.display().to_string()),
        ],
        sandbox: sandbox.to_owned(),
        hostname: id.into(),
        cgroup: placement.unified.clone(),
        v1_procs: placement.v1_procs.clone(),
        tmp_mb: 16,
        privileges: Default::default(),
    }
}

/// How many times longer to wait where a test measures no time: 1 on a
/// real host, 5 in scripts/vm-test's emulated kernels (BUTTE_VM is set).
pub fn slowdown() -> u32 {
    if std::env::var_os("BUTTE_VM").is_some() {
        5
    } else {
        1
    }
}

pub fn unique(name: &str) -> String {
    format!("kt-{name}-{}", std::process::id())
}

/// CPU time of a task cgroup as cgroupfs reports it (v1 cpuacct, else v2 cpu.stat).
pub fn cpu_seconds(subtree: &str, id: &str) -> f64 {
    let usage = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/cpuacct/{subtree}/{id}/cpuacct.usage"
    ))
    .or_else(|_| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{subtree}/{id}/cpu.stat")).map(|s| {
            // usage_usec N on v2
            let usec: u64 = s
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (usec * 1000).to_string()
        })
    })
    .unwrap();
    usage.trim().parse::<f64>().unwrap() / 1e9
}

/// Child processes killed and reaped when dropped, so a failed assertion
/// leaves none behind.
pub struct Reaped(pub Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An iperf3 server on the host (outside our subtree); the caller kills it.
pub fn iperf3_server(port: u16) -> Child {
    let server = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (scripts/install-deps installs it)");
    // Wait until it listens; a probe connection would count as its client.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listening(port) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Whether a TCP socket listens on `port` (a LISTEN row, state 0A, in /proc/net/tcp).
pub fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table.lines().skip(1).any(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
    })
}

pub fn limits(cpus: f64, mem_mb: f64, pids_max: u64) -> Limits {
    Limits {
        cpus,
        mem_mb,
        pids_max,
    }
}

/// What an iperf3 client achieved, Mbit/s, from its JSON report.
pub fn mbit_per_s(report: &serde_json::Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no result in {report}"))
        / 1e6
}

/// `mknod PATH c 195 MINOR`: a node with NVIDIA's major; with no driver,
/// opening it on the host is ENXIO (what the GPU fences are tested against).
pub fn fake_nvidia_node(path: &Path, minor: u32) {
    let _ = std::fs::remove_file(path);
    let made = Command::new("mknod")
        .arg(path)
        .args(["c", "195", &minor.to_string()])
        .status()
        .unwrap();
    assert!(made.success(), "mknod {} c 195 {minor}", path.display());
    let on_host = std::fs::File::open(path).unwrap_err();
    assert_eq!(
        on_host.raw_os_error(),
        Some(libc::ENXIO),
        "{}: {on_host}; these tests need a host without an NVIDIA driver",
        path.display()
    );
}

/// Mounts a tmpfs of `size` (e.g. `2m`) at `dir`, made if missing: a disk
/// a test can fill.
pub fn mount_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "butte-kt-tmpfs",
        ])
        .arg(dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "a tmpfs at {}", dir.display());
}

/// Fills the filesystem of `dir` to the last byte with one file; its path.
pub fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![1u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    // And the last bytes a block could not take.
    while file.write_all(&[1u8]).is_ok() {}
    let _ = file.sync_all();
    filler
}
