//! A full disk under the agent's checkpoints refuses launches, it does not
//! start tasks it could not recover: with the agent's `meta/` on a small
//! tmpfs filled to the last byte, a new framework's task (its framework
//! checkpoint cannot be written) and a known framework's task (its task
//! checkpoint cannot be written) both end TASK_FAILED with the reason, no
//! temp file is left, the task already running runs on, and once space
//! returns the next launch runs, with no restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::cluster::Cluster;
use common::driven::Driven;
use common::{fill, mount_tmpfs};

/// Files under `dir` whose name says they are a checkpoint's temp copy.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.to_string_lossy().starts_with("tmp-"))
            {
                found.push(path);
            }
        }
    }
    found
}

/// Unmounts the tmpfs when the test ends, passed or not.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_checkpoint_disk_refuses_launches_with_the_reason_and_they_resume() {
    let mut cluster = Cluster::start_prepared(
        "agent-checkpoint-full",
        15_232,
        15_233,
        "cpus:2;mem:1024",
        &[],
        |dir| mount_tmpfs(&dir.join("agent/meta"), "2m"),
    );
    let meta = cluster.dir.join("agent/meta");
    let _unmount = Mounted(meta.clone());
    let minute = Duration::from_secs(60);

    let mut known = Driven::start(&cluster, "known", false, &[("first", "sleep 600")]);
    known.until("first", "TASK_RUNNING", minute);

    let cgroups = cluster.cgroups_left().len();
    let filler = fill(&meta);
    let mut new = Driven::start(&cluster, "new", false, &[("refused-new", "sleep 600")]);
    let reason = new.until("refused-new", "TASK_FAILED", minute);
    assert_eq!(reason, "REASON_CONTAINER_LAUNCH_FAILED", "{:?}", new.seen);
    let says = &new.messages["refused-new"];
    assert!(says.contains("No space left"), "the reason: {says}");
    known.send("launch refused-known sleep 600");
    let reason = known.until("refused-known", "TASK_FAILED", minute);
    assert_eq!(reason, "REASON_CONTAINER_LAUNCH_FAILED", "{:?}", known.seen);
    let says = &known.messages["refused-known"];
    assert!(says.contains("checkpoint"), "the reason: {says}");
    let sandboxes = cluster.dir.join("agent/sandboxes");
    for task in ["refused-new", "refused-known"] {
        let made = std::fs::read_dir(&sandboxes)
            .unwrap()
            .any(|framework| framework.unwrap().path().join(task).exists());
        assert!(!made, "{task} was not started: no sandbox");
    }
    assert_eq!(cluster.cgroups_left().len(), cgroups, "no container made");
    assert_eq!(
        temp_files(&meta),
        Vec::<PathBuf>::new(),
        "no temp file left"
    );
    assert!(
        !cluster.container_pids("first").is_empty(),
        "the running task runs on"
    );

    std::fs::remove_file(&filler).unwrap();
    known.send("launch later sleep 600");
    known.until("later", "TASK_RUNNING", minute);
    drop(new);
    drop(known);
    cluster.stop_agent();
}
