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

use butte_isolators::quota::ProjectQuotas;

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
                        let used = measure(quotas.as_deref(), &w.container_id, &w.sandbox);
                        (w, used)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(measured) = measured else {
                continue;
            };
            for (watched, used) in measured {
                agent.disk_measured(&watched.key, used.bytes());
                if let Measured::Walked(bytes) = used
                    && agent.config.enforce_container_disk_quota
                    && bytes > watched.limit_bytes
                {
                    agent.disk_exceeded(&watched.key, bytes, watched.limit_bytes);
                }
            }
        }
    });
}

/// What a sandbox holds, and who holds it to its limit.
#[derive(Debug, Clone, Copy)]
pub enum Measured {
    /// The project quota's count: the kernel refuses writes past the limit.
    HeldByKernel(u64),
    /// A du walk: the agent must act on it (disk/du).
    Walked(u64),
}

impl Measured {
    pub fn bytes(self) -> u64 {
        match self {
            Measured::HeldByKernel(bytes) | Measured::Walked(bytes) => bytes,
        }
    }
}

/// Measures `container_id`'s sandbox: the kernel's count where a project
/// quota holds it, else a walk. Blocking (the walk reads the whole tree).
pub fn measure(quotas: Option<&ProjectQuotas>, container_id: &str, sandbox: &Path) -> Measured {
    match quotas.and_then(|q| q.usage(container_id)) {
        Some(bytes) => Measured::HeldByKernel(bytes),
        None => Measured::Walked(usage(sandbox)),
    }
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
