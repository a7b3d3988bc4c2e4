//! A task's sandbox held to its `disk` on a loop-mounted ext4 image made
//! with project quotas. Where this kernel has quotas (Debian's 6.1 and 6.12
//! do; this host's 6.18 is built without CONFIG_QFMT_V2 and XFS quotas),
//! the write past the limit fails in the task (EDQUOT) and the sandbox
//! holds no more than its limit; elsewhere the agent measures the sandbox
//! (disk/du) and fails the task with the disk reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use butte_isolators::container::{Exit, spawn, wait};
use butte_isolators::quota::ProjectQuotas;

mod common;
use common::cluster::Cluster;
use common::{isolator, limits, shell_spec, unique};

/// An ext4 image mounted on a loop device; unmounted and removed on drop.
struct LoopMount {
    dir: PathBuf,
    image: PathBuf,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A 128 MB ext4 at `dir`: with project quotas enforced if this kernel can
/// mount one (`Ok`), else a plain one (`Err`, with the plain mount in it).
fn loop_ext4(dir: &Path) -> Result<LoopMount, LoopMount> {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.with_extension("img");
    let image_arg = image.to_str().unwrap();
    let dir_arg = dir.to_str().unwrap();
    let make = |features: &[&str]| {
        let _ = std::fs::remove_file(&image);
        assert!(run("truncate", &["-s", "128M", image_arg]));
        let mut args = vec!["-q", "-F"];
        args.extend_from_slice(features);
        args.push(image_arg);
        assert!(run("mkfs.ext4", &args), "mkfs.ext4 {args:?}");
    };
    make(&["-O", "quota,project", "-E", "quotatype=prjquota"]);
    if run("mount", &["-o", "loop,prjquota", image_arg, dir_arg]) {
        return Ok(LoopMount {
            dir: dir.to_owned(),
            image,
        });
    }
    make(&[]);
    assert!(
        run("mount", &["-o", "loop", image_arg, dir_arg]),
        "a plain ext4 mounts"
    );
    Err(LoopMount {
        dir: dir.to_owned(),
        image,
    })
}

#[test]
fn a_project_quota_refuses_the_write_past_the_limit_and_counts_the_usage() {
    let dir = PathBuf::from(format!(
        "/var/lib/butte-kernel-tests/quota-{}",
        std::process::id()
    ));
    let mount = match loop_ext4(&dir) {
        Ok(mount) => mount,
        Err(plain) => {
            // No quotas in this kernel: the probe says so, and why.
            let why = ProjectQuotas::probe(&plain.dir, 5000..=5010)
                .err()
                .expect("no project quotas on a plain ext4");
            println!("no project quotas here: {why}");
            assert!(why.contains("quota"), "{why}");
            return;
        }
    };
    let quotas = ProjectQuotas::probe(&mount.dir, 5000..=5010).expect("quotas are enforced");
    let sandbox = mount.dir.join("sandbox");
    std::fs::create_dir(&sandbox).unwrap();
    let project = quotas.limit("c1", &sandbox, 10 << 20).unwrap();
    assert_eq!(project, 5000, "the first free id of the range");
    // A task (no CAP_SYS_RESOURCE, which would pass over the quota) writes 30 MB.
    let isolator = isolator();
    let id = unique("quota");
    let placement = isolator.create(&id, &limits(1.0, 128.0, 16)).unwrap();
    let spec = shell_spec(
        &id,
        &placement,
        &sandbox,
        "dd if=/dev/zero of=$MESOS_SANDBOX/fill bs=1M count=30; echo rc=$?",
    );
    let child = spawn(&spec).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    let err = std::fs::read_to_string(sandbox.join("stderr")).unwrap();
    let out = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    assert!(
        err.contains("Disk quota exceeded") || err.contains("No space left"),
        "the write past 10 MB is refused: {err}"
    );
    assert!(out.contains("rc=1"), "{out}");
    let used = quotas.usage("c1").unwrap();
    let fill = std::fs::metadata(sandbox.join("fill")).unwrap().len();
    assert!(fill <= 10 << 20, "the file holds at most the limit: {fill}");
    assert!(
        (9 << 20..=(10 << 20) + (64 << 10)).contains(&used),
        "the kernel's count is the sandbox's: {used}"
    );
    println!(
        "project quota {project}: the write past 10 MiB refused ({}), file {fill} B, the kernel counts {used} B",
        err.lines().next().unwrap_or_default()
    );
    // The next sandbox gets another id while this one still holds data.
    let other = mount.dir.join("other");
    std::fs::create_dir(&other).unwrap();
    assert_eq!(quotas.limit("c2", &other, 1 << 20).unwrap(), 5001);
    quotas.release("c1");
    quotas.release("c2");
    assert_eq!(quotas.usage("c1"), None, "released");
    isolator.destroy(&id).unwrap();
}

#[test]
fn a_task_over_its_disk_is_refused_by_the_kernel_or_failed_by_the_agent() {
    let mut mounted = None;
    let cluster = Cluster::start_prepared(
        "quota-e2e",
        15160,
        15161,
        "cpus:4;mem:2048;disk:100",
        &["--disk-watch-interval", "0.5"],
        |dir| mounted = Some(loop_ext4(&dir.join("agent"))),
    );
    let out = cluster.run_framework("disk");
    let log = std::fs::read_to_string(cluster.dir.join("agent.log")).unwrap_or_default()
        + &std::fs::read_to_string(cluster.dir.join("agent.err")).unwrap_or_default();
    let final_line = out
        .lines()
        .find(|l| l.contains("\"final\""))
        .expect("the framework reports the task's end");
    let hog: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(final_line).unwrap()["final"]["quota-hog"]
            .clone();
    let sandbox = cluster.sandbox("quota-hog");
    match mounted.expect("prepared") {
        Ok(_quota) => {
            assert!(log.contains("hard limits with project quotas"), "{log}");
            assert_eq!(hog["state"], "TASK_FINISHED", "the kernel held it: {hog}");
            let err = std::fs::read_to_string(sandbox.join("dd.err")).unwrap();
            assert!(err.contains("Disk quota exceeded"), "{err}");
            let fill = std::fs::metadata(sandbox.join("fill")).unwrap().len();
            assert!(fill <= 10 << 20, "{fill}");
            println!(
                "through the agent: {hog}, dd: {}, file {fill} B",
                err.trim()
            );
            drop(cluster);
        }
        Err(_plain) => {
            assert!(log.contains("no project quotas here"), "{log}");
            assert_eq!(hog["state"], "TASK_FAILED", "{hog}");
            assert_eq!(hog["reason"], "REASON_CONTAINER_LIMITATION_DISK", "{hog}");
            println!("no project quotas, du: {hog}");
            drop(cluster);
        }
    }
}
