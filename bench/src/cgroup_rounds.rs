//! Repeated 500-task rounds leave no dying memory cgroups, and launches
//! stay as fast: the launch-latency median, the dying cgroups (v2's
//! `nr_dying_descendants`, and v1 memcgs counted in /proc/cgroups but no
//! longer in the hierarchy) before and after ten rounds of 500 tasks that
//! each leave 1 MiB of page cache in their sandbox (the file outlives the
//! task, so its memcg would stay dying unless emptied before removal).
//!
//! `cargo run --release -p butte-bench --bin cgroup-rounds [-- ROUNDS TASKS LAUNCHES]`
//! (10, 500 and 300 by default; needs root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use butte_bench::launch::{WORK, one_launch, spec, stats};
use butte_isolators::cgroups::{Isolator, detect};
use butte_isolators::container::{spawn, wait};

/// The cgroups the kernel still holds after their removal: v2's dying
/// descendants of the root, and v1 memcgs (/proc/cgroups's count less the
/// directories in the hierarchy), where memory is on v1.
fn dying() -> (u64, Option<i64>) {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(Path::new)
        .find(|root| root.join("cgroup.stat").exists());
    let v2 = root
        .and_then(|root| std::fs::read_to_string(root.join("cgroup.stat")).ok())
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("nr_dying_descendants "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let v1 = v1.join("cgroup.procs").exists().then(|| {
        let counted: i64 = std::fs::read_to_string("/proc/cgroups")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (fields.first() == Some(&"memory")).then(|| fields.get(2)?.parse().ok())?
            })
            .unwrap_or(0);
        counted - directories(v1)
    });
    (v2, v1)
}

fn directories(root: &Path) -> i64 {
    let mut count = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        count += 1;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    count
}

fn launch_median(isolator: &dyn Isolator, launches: usize, label: &str) -> Duration {
    let samples = (0..launches)
        // Each under a new id: its sandbox is made too, as for a new task.
        .map(|i| one_launch(isolator, &format!("latency-{label}-{i}")).0)
        .collect();
    stats(&format!("launch -> execve, {label}"), samples)
}

/// One round: `tasks` tasks that each write 1 MiB to their sandbox and
/// exit, then their cgroups removed (the files stay).
fn round(isolator: &dyn Isolator, round: usize, tasks: usize) {
    let script = [
        "/bin/sh",
        "-c",
        "dd if=/dev/zero of=f bs=1M count=1 2>/dev/null",
    ];
    let children: Vec<_> = (0..tasks)
        .map(|i| {
            let id = format!("round-{round}-{i}");
            let spec = spec(isolator, &id, &script, None);
            let child = spawn(&spec).unwrap_or_else(|e| panic!("spawn {id}: {e}"));
            (id, child)
        })
        .collect();
    for (id, child) in children {
        wait(&child.pidfd).unwrap_or_else(|e| panic!("wait {id}: {e}"));
        isolator
            .destroy(&id)
            .unwrap_or_else(|e| panic!("destroy {id}: {e}"));
    }
}

fn main() {
    let arg = |n: usize, default: usize| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
            .max(1)
    };
    let (rounds, tasks, launches) = (arg(1, 10), arg(2, 500), arg(3, 300));
    let isolator = detect(Path::new("/sys/fs/cgroup"), Path::new("butte/bench-rounds"))
        .unwrap_or_else(|e| panic!("cgroups (run as root): {e}"));
    let sandboxes = PathBuf::from(WORK).join("sandboxes");
    let _ = std::fs::remove_dir_all(&sandboxes);
    // Untimed: on this VM the first thousand or so launches of a run are
    // 2-3x slower (3 ms, then 1.4 ms), whatever came before.
    for i in 0..4 * launches {
        one_launch(&*isolator, &format!("warm-{i}"));
    }
    let before = dying();
    let median_before = launch_median(&*isolator, launches, "before");
    for r in 0..rounds {
        round(&*isolator, r, tasks);
    }
    let after = dying();
    let median_after = launch_median(&*isolator, launches, "after");
    // Pages still being written back at removal keep a memcg until they
    // are written and reclaimed: counted again once writeback is done.
    // SAFETY: sync(2) has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync()
    };
    std::thread::sleep(Duration::from_secs(10));
    let settled = dying();
    isolator.remove_subtree();
    let _ = std::fs::remove_dir_all(&sandboxes);
    let shown = |v1: Option<i64>| v1.map_or("no v1 memory hierarchy".into(), |n| n.to_string());
    println!(
        "dying cgroups before -> after {rounds} rounds of {tasks} tasks -> 10 s after a sync: v2 {} -> {} -> {}, v1 memcgs {} -> {} -> {}",
        before.0,
        after.0,
        settled.0,
        shown(before.1),
        shown(after.1),
        shown(settled.1)
    );
    println!(
        "launch median after / before: {:.2}x ({:.3} ms -> {:.3} ms)",
        median_after.as_secs_f64() / median_before.as_secs_f64(),
        median_before.as_secs_f64() * 1e3,
        median_after.as_secs_f64() * 1e3
    );
}
