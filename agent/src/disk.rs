//! Each task's sandbox held to its `disk`. Where the work dir's filesystem
//! enforces project quotas, the kernel refuses the write past the limit
//! (`butte_isolators::quota`, as Mesos's disk/xfs) and the usage is its
//! count. Elsewhere, as Mesos's disk/du: the sandbox is measured every
//! --disk-watch-interval, and a task over its `disk` is killed and reported
//! TASK_FAILED with REASON_CONTAINER_LIMITATION_DISK. Either way the figure
//! is the task's `disk_used_bytes` (telemetry, /metrics).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::{Agent, TaskKey};

/// A sandbox to measure: its task, where it is, and its limit in bytes.
pub struct Watched {
    pub key: TaskKey,
    pub container_id: String,
    pub sandbox: PathBuf,
    pub limit_bytes: u64,
}

/// Measures every watched sandbox each `interval`, off the runtime threads.
pub fn spawn(agent: Agent, interval: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let watched = agent.disk_watched();
            if watched.is_empty() {
                continue;
            }
            let quotas = agent.quotas.clone();
            let measured = tokio::task::spawn_blocking(move || {
                watched
                    .into_iter()
                    .map(|w| {
                        // The kernel's count where it holds the limit itself.
                        let held = quotas.as_ref().and_then(|q| q.usage(&w.container_id));
                        let used = held.unwrap_or_else(|| usage(&w.sandbox));
                        (w, used, held.is_some())
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(measured) = measured else {
                continue;
            };
            for (watched, used, held_by_kernel) in measured {
                agent.disk_measured(&watched.key, used);
                if !held_by_kernel
                    && agent.config.enforce_container_disk_quota
                    && used > watched.limit_bytes
                {
                    agent.disk_exceeded(&watched.key, used, watched.limit_bytes);
                }
            }
        }
    });
}

/// Bytes a directory tree holds on disk, as `du` counts them: allocated
/// blocks, each hard-linked file once, symbolic links not followed.
pub fn usage(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut seen = HashSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.path().symlink_metadata() else {
                continue;
            };
            if metadata.nlink() > 1 && !seen.insert((metadata.dev(), metadata.ino())) {
                continue;
            }
            total = total.saturating_add(metadata.blocks().saturating_mul(512));
            if metadata.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_once_per_file_and_does_not_follow_links() {
        let dir = std::env::temp_dir().join(format!("butte-du-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        std::fs::write(dir.join("sub/a"), vec![1u8; 1 << 20]).expect("write");
        std::fs::hard_link(dir.join("sub/a"), dir.join("b")).expect("link");
        std::os::unix::fs::symlink("/usr", dir.join("usr")).expect("symlink");
        let used = usage(&dir);
        assert!(
            (1 << 20..(1 << 20) + (64 << 10)).contains(&used),
            "one MiB once, not twice and not /usr: {used}"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
