//! A destroyed task leaves no dying v1 memory cgroup behind, though its
//! page cache outlives it (its sandbox keeps the file it wrote): the
//! isolator empties a v1 memcg (`memory.force_empty`) before removing it.
//! Without that, each such task left a dying memcg, and the memcg code
//! slows for every task as they pile up. (On pure v2 the isolator asks
//! `memory.reclaim` the same, best effort; cgroups there also stay dying
//! for other holders, such as writeback, so this test is for v1.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use butte_isolators::container::{Exit, spawn, wait};

mod common;
use common::{isolator_at, limits, sandbox, shell_spec, unique};

/// v1 memory cgroups that are removed but not yet freed, machine-wide:
/// the hierarchy's count (/proc/cgroups) less the directories there.
fn dying_memcgs(v1: &Path) -> i64 {
    let counted: i64 = std::fs::read_to_string("/proc/cgroups")
        .unwrap()
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.first() == Some(&"memory")).then(|| fields[2].parse().unwrap())
        })
        .unwrap();
    let mut dirs = 0;
    let mut stack = vec![v1.to_owned()];
    while let Some(dir) = stack.pop() {
        dirs += 1;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    counted - dirs
}

#[test]
fn destroyed_tasks_leave_no_dying_memory_cgroups_behind() {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if !v1.join("cgroup.procs").exists() {
        println!("skipped: no v1 memory hierarchy (pure cgroup v2)");
        return;
    }
    let subtree = format!("butte/kt-dying-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let before = dying_memcgs(v1);
    let mut sandboxes = Vec::new();
    for round in 0..10 {
        let id = unique(&format!("dying-{round}"));
        let placement = isolator.create(&id, &limits(1.0, 64.0, 16)).unwrap();
        let sandbox = sandbox(&id);
        // 4 MiB of page cache charged to the task, left on disk.
        let script = "dd if=/dev/zero of=$MESOS_SANDBOX/f bs=1M count=4 2>/dev/null";
        let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
        assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
        isolator.destroy(&id).unwrap();
        sandboxes.push(sandbox);
    }
    // The kernel frees a reclaimed memcg after an RCU grace period.
    std::thread::sleep(Duration::from_millis(500));
    let after = dying_memcgs(v1);
    isolator.remove_subtree();
    for sandbox in sandboxes {
        std::fs::remove_dir_all(sandbox).unwrap();
    }
    assert!(
        after - before <= 2,
        "ten tasks with page cache destroyed: {before} dying memcgs before, {after} after"
    );
}
