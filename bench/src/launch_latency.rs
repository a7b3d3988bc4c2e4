//! Launch latency of the agent's launch path against `runc run`, side by
//! side in one run, on this machine (needs root).
//!
//! - butte: what the launcher does for each task: create the task's cgroups
//!   (v1 cpu/memory/pids + the v2 node), clone3 into new pid/mount/uts/ipc
//!   namespaces straight into the v2 cgroup, join the v1 cgroups, read-only
//!   rootfs with a writable sandbox, private /tmp and /proc, hostname, exec.
//!   Timed from the start of the launch to the execve (the spawn returns when
//!   the child's exec closes its error pipe), and the whole cycle with wait
//!   and cgroup removal.
//! - runc: `runc run` of the same `/bin/true` in a busybox bundle with the
//!   same namespaces and limits, timed from spawn to exit (runc cannot report
//!   its exec time; its whole run is the comparable cycle).
//! - 1,000 launches held at once on one agent, then 1,000 destroys (Mesos 1.7
//!   published about 30 s and 20 s for these).
//!
//! `cargo run --release -p butte-bench --bin launch-latency [-- LAUNCHES [HELD]]`
//! (HELD: the launches held at once, 1,000 by default; 0 leaves that part
//! out, as under emulation in `scripts/vm-test`'s kernels).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use butte_bench::launch::{WORK, one_launch, spec, stats};
use butte_isolators::cgroups::{Isolator, detect};
use butte_isolators::container::{spawn, wait};
use butte_isolators::fences::Fences;

/// `n` launches without eBPF programs and `n` in a second subtree where
/// every program is attached and each task gets its map entries,
/// interleaved so that both meet the same machine state.
fn butte_launches(plain: &dyn Isolator, fenced: &dyn Isolator, n: usize) -> [Duration; 4] {
    let mut fences = Fences::attach_all(&fenced.v2_subtree()).unwrap_or_else(|e| panic!("{e}"));
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for i in 0..n {
        let (to_exec, cycle) = one_launch(plain, &format!("bench-{i}"));
        samples[0].push(to_exec);
        samples[1].push(cycle);
        let id = format!("bench-ebpf-{i}");
        let started = Instant::now();
        let spec = spec(fenced, &id, &["/bin/true"], Some(&mut fences));
        let child = spawn(&spec).unwrap_or_else(|e| panic!("spawn {id}: {e}"));
        samples[2].push(started.elapsed());
        wait(&child.pidfd).unwrap_or_else(|e| panic!("wait {id}: {e}"));
        fences.unfence(&id);
        fenced
            .destroy(&id)
            .unwrap_or_else(|e| panic!("destroy {id}: {e}"));
        samples[3].push(started.elapsed());
    }
    let [a, b, c, d] = samples;
    [
        stats("butte: launch -> execve", a),
        stats("butte: whole cycle", b),
        stats("butte: launch -> execve, all eBPF", c),
        stats("butte: whole cycle, all eBPF", d),
    ]
}

fn runc_bundle() -> PathBuf {
    let bundle = PathBuf::from(WORK).join("runc-bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap_or_else(|e| panic!("bundle: {e}"));
    let busybox = rootfs.join("bin/busybox");
    if !busybox.exists() {
        std::fs::copy("/bin/busybox", &busybox)
            .unwrap_or_else(|e| panic!("copy busybox (apt install busybox-static): {e}"));
    }
    for applet in ["sh", "true"] {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .unwrap_or_else(|e| panic!("symlink {applet}: {e}"));
        }
    }
    let _ = std::fs::remove_file(bundle.join("config.json"));
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .unwrap_or_else(|e| panic!("runc spec (apt install runc): {e}"));
    assert!(status.success(), "runc spec failed");
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut config: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["process"]["terminal"] = serde_json::json!(false);
    config["root"]["readonly"] = serde_json::json!(true);
    config["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    config["linux"]["resources"] = serde_json::json!({
        "cpu": {"shares": 1024, "quota": 100000, "period": 100000},
        "memory": {"limit": 128u64 << 20},
        "pids": {"limit": 4096}
    });
    std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("{e}"));
    bundle
}

fn runc_runs(bundle: &Path, n: usize) -> Duration {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let status = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(format!("butte-bench-{i}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .unwrap_or_else(|e| panic!("runc run: {e}"));
        samples.push(started.elapsed());
        assert!(status.success(), "runc run failed");
    }
    stats("runc run (same command and limits)", samples)
}

fn held_launches(isolator: &dyn Isolator, n: usize) {
    let started = Instant::now();
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("held-{i}");
        let spec = spec(isolator, &id, &["/bin/sleep", "60"], None);
        children.push((id, spawn(&spec).unwrap_or_else(|e| panic!("spawn: {e}"))));
    }
    let launched = started.elapsed();
    let started = Instant::now();
    for (id, child) in &children {
        isolator
            .destroy(id)
            .unwrap_or_else(|e| panic!("destroy {id}: {e}"));
        let _ = wait(&child.pidfd);
    }
    let destroyed = started.elapsed();
    println!(
        "{n} launches held at once on one agent: {:.2} s (Mesos 1.7: ~30 s -> {:.0}x); {n} destroys: {:.2} s (Mesos 1.7: ~20 s -> {:.0}x)",
        launched.as_secs_f64(),
        30.0 / launched.as_secs_f64(),
        destroyed.as_secs_f64(),
        20.0 / destroyed.as_secs_f64()
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500)
        .max(1);
    let isolator = detect(Path::new("/sys/fs/cgroup"), Path::new("butte/bench"))
        .unwrap_or_else(|e| panic!("cgroups (run as root): {e}"));
    let _ = std::fs::remove_dir_all(PathBuf::from(WORK).join("sandboxes"));
    let fenced = detect(Path::new("/sys/fs/cgroup"), Path::new("butte/bench-ebpf"))
        .unwrap_or_else(|e| panic!("cgroups (run as root): {e}"));
    let [to_exec, cycle, to_exec_ebpf, cycle_ebpf] = butte_launches(&*isolator, &*fenced, n);
    fenced.remove_subtree();
    println!(
        "eBPF programs add {:+.3} ms to launch -> execve, {:+.3} ms to the whole cycle (medians)",
        (to_exec_ebpf.as_secs_f64() - to_exec.as_secs_f64()) * 1e3,
        (cycle_ebpf.as_secs_f64() - cycle.as_secs_f64()) * 1e3
    );
    let runc = runc_runs(&runc_bundle(), n);
    println!(
        "ratio: runc run / butte launch->execve = {:.1}x; runc run / butte whole cycle = {:.1}x",
        runc.as_secs_f64() / to_exec.as_secs_f64(),
        runc.as_secs_f64() / cycle.as_secs_f64()
    );
    let held: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    if held > 0 {
        held_launches(&*isolator, held);
    }
    let _ = std::fs::remove_dir_all(PathBuf::from(WORK).join("sandboxes"));
}
