//! Sandbox garbage collection, as Mesos's `--gc_delay` and
//! `--gc_disk_headroom`: an ended task's sandbox stays for its framework and
//! the operator to read, then goes. A sandbox may be kept at most
//! `gc_delay × max(0, 1 − headroom − used)`, `used` the fraction of the work
//! dir's filesystem in use, so a filling disk shortens the wait to nothing.
//! The age is the sandbox directory's mtime, which the agent sets when its
//! task ends; nothing else is kept, so a restart forgets no sandbox.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::agent::Agent;
use crate::checkpoint::subdirs;

/// `--gc-delay` and `--gc-disk-headroom`.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub delay: Duration,
    pub headroom: f64,
}

impl Policy {
    /// How long an ended sandbox may stay when `used` (0 to 1) of the disk is in use.
    pub fn max_age(&self, used: f64) -> Duration {
        let keep = (1.0 - self.headroom - used).clamp(0.0, 1.0);
        self.delay.mul_f64(keep)
    }
}

/// Sweeps the sandboxes every `interval`, off the runtime threads.
pub fn spawn(agent: Agent, policy: Policy, interval: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let agent = agent.clone();
            let swept = tokio::task::spawn_blocking(move || {
                let root = agent.config.work_dir.join("sandboxes");
                let trash = agent.config.work_dir.join("sandboxes-trash");
                let used = disk_used(&root).unwrap_or(0.0);
                let moved = {
                    // Books read and sandboxes moved with launches held off.
                    let _gc = agent.sandbox_gc();
                    let in_use = agent.sandboxes_in_use();
                    sweep(
                        &root,
                        &trash,
                        &in_use,
                        policy.max_age(used),
                        SystemTime::now(),
                    )
                };
                // The slow part, with launches free to go on.
                let _ = std::fs::remove_dir_all(&trash);
                moved
            })
            .await;
            for path in swept.unwrap_or_default() {
                tracing::info!(sandbox = %path.display(), "sandbox collected");
            }
        }
    });
}

/// Marks a sandbox as ended now (its age counts from here).
pub fn mark_ended(sandbox: &Path) {
    let now = SystemTime::now();
    if let Err(error) = std::fs::File::open(sandbox).and_then(|dir| dir.set_modified(now)) {
        tracing::debug!(sandbox = %sandbox.display(), %error, "cannot mark the sandbox's end");
    }
}

/// Moves every container sandbox (`ROOT/FRAMEWORK/EXECUTOR/CONTAINER`) not
/// in use and older than `max_age` into `trash` (on the same filesystem;
/// the caller empties it), then removes the directories it leaves empty;
/// the sandboxes collected.
pub fn sweep(
    root: &Path,
    trash: &Path,
    in_use: &HashSet<PathBuf>,
    max_age: Duration,
    now: SystemTime,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for framework in subdirs(root) {
        for executor in subdirs(&framework) {
            for container in subdirs(&executor) {
                if in_use.contains(&container) {
                    continue;
                }
                let age = std::fs::symlink_metadata(&container)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|modified| now.duration_since(modified).ok())
                    .unwrap_or(Duration::ZERO);
                if age < max_age {
                    continue;
                }
                let doomed = trash.join(uuid::Uuid::new_v4().simple().to_string());
                let moved = std::fs::create_dir_all(trash)
                    .and_then(|()| std::fs::rename(&container, &doomed));
                match moved {
                    Ok(()) => removed.push(container),
                    Err(error) => {
                        tracing::warn!(sandbox = %container.display(), %error, "cannot collect a sandbox")
                    }
                }
            }
            // Only once empty: rmdir refuses anything else.
            let _ = std::fs::remove_dir(&executor);
        }
        let _ = std::fs::remove_dir(&framework);
    }
    removed
}

/// The fraction of `dir`'s filesystem in use (0 to 1), as Mesos counts it:
/// blocks not free over all blocks.
fn disk_used(dir: &Path) -> Option<f64> {
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct for a valid path.
    #[allow(unsafe_code)]
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c_dir.as_ptr(), &mut stat) == 0).then_some(stat)
    }?;
    let total = stat.f_blocks as f64;
    (total > 0.0).then(|| 1.0 - stat.f_bfree as f64 / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filling_disk_shortens_the_wait_to_nothing() {
        let policy = Policy {
            delay: Duration::from_secs(1000),
            headroom: 0.1,
        };
        assert_eq!(policy.max_age(0.0), Duration::from_secs(900));
        assert_eq!(policy.max_age(0.5), Duration::from_secs(400));
        assert_eq!(policy.max_age(0.95), Duration::ZERO);
    }

    #[test]
    fn only_old_sandboxes_out_of_use_go_and_empty_parents_with_them() {
        let root = std::env::temp_dir().join(format!("butte-gc-{}", std::process::id()));
        let old = root.join("sandboxes/f/task-old/c1");
        let recent = root.join("sandboxes/f/task-recent/c2");
        let running = root.join("sandboxes/g/task-running/c3");
        for dir in [&old, &recent, &running] {
            std::fs::create_dir_all(dir.join("sub")).expect("dirs");
            std::fs::write(dir.join("stdout"), "x").expect("file");
        }
        let now = SystemTime::now();
        let hour_ago = now - Duration::from_secs(3600);
        for dir in [&old, &running] {
            std::fs::File::open(dir)
                .and_then(|d| d.set_modified(hour_ago))
                .expect("mtime");
        }
        let in_use: HashSet<PathBuf> = [running.clone()].into();
        let trash = root.join("trash");
        let removed = sweep(
            &root.join("sandboxes"),
            &trash,
            &in_use,
            Duration::from_secs(60),
            now,
        );
        assert_eq!(removed, vec![old.clone()]);
        let moved: Vec<PathBuf> = subdirs(&trash);
        assert_eq!(moved.len(), 1);
        assert!(
            moved[0].join("stdout").exists(),
            "moved whole into the trash"
        );
        assert!(
            !root.join("f/task-old").exists(),
            "its empty parent goes too"
        );
        assert!(recent.join("stdout").exists() && running.join("stdout").exists());
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
