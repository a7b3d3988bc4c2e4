//! Checkpoints under `--work-dir/meta`: one file per framework and per task,
//! written whole (write, fsync, rename) at each change, so that a later
//! agent recovers its tasks; and one record directory per container, where
//! its supervisor notes its start and its end.

use std::io::Write;
use std::path::{Path, PathBuf};

use butte_api::mesos::v1::FrameworkInfo;
use prost::Message;

use crate::workdir::beneath;

pub use butte_api::agent_checkpoint::TaskCheckpoint;

/// A task read back, with its framework.
pub struct Recovered {
    pub framework: FrameworkInfo,
    pub task: TaskCheckpoint,
}

const TASK_FILE: &str = "checkpoint.pb";
const FRAMEWORK_FILE: &str = "framework.pb";

pub struct Checkpoint {
    meta: PathBuf,
}

/// Writes `bytes` to `path` atomically and durably: a reader sees the old
/// file or the new one, also after a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replacing(path, bytes, true, true)
}

/// Writes `bytes` to `path` atomically for readers, without waiting for the
/// disk: for records that only need to outlive a process (a container's
/// start and end: after a power cut its container is gone anyway). Its
/// directory must exist: one removed on purpose meanwhile (a container's
/// records, forgotten) is not made again.
pub fn write_replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replacing(path, bytes, false, false)
}

fn write_replacing(
    path: &Path,
    bytes: &[u8],
    durable: bool,
    create_dir: bool,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("checkpoint path has no parent"))?;
    if create_dir {
        std::fs::create_dir_all(dir)?;
    }
    // A temp name of its own: two writers of one file must not share it.
    let temp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::create(&temp).and_then(|mut file| {
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&temp, path)
    });
    if let Err(error) = written {
        // A full disk must not also leave a temp file per attempt.
        let _ = std::fs::remove_file(&temp);
        return Err(error);
    }
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// An id that would take a checkpoint path outside the work dir.
fn refused(error: butte_api::ids::IdError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, error)
}

impl Checkpoint {
    pub fn new(work_dir: &Path) -> Self {
        Self {
            meta: work_dir.join("meta"),
        }
    }

    fn framework_dir(&self, framework_id: &str) -> std::io::Result<PathBuf> {
        beneath(
            &self.meta.join("frameworks"),
            &[("framework_id", framework_id)],
        )
        .map_err(refused)
    }

    fn task_dir(&self, framework_id: &str, task_id: &str) -> std::io::Result<PathBuf> {
        let tasks = self.framework_dir(framework_id)?.join("tasks");
        beneath(&tasks, &[("task_id", task_id)]).map_err(refused)
    }

    pub fn framework(&self, info: &FrameworkInfo) -> std::io::Result<()> {
        let id = info.id.as_ref().map_or("unknown", |f| f.value.as_str());
        write_atomic(
            &self.framework_dir(id)?.join(FRAMEWORK_FILE),
            &info.encode_to_vec(),
        )
    }

    pub fn task(&self, checkpoint: &TaskCheckpoint) -> std::io::Result<()> {
        let task = &checkpoint.task;
        let dir = self.task_dir(&task.framework_id.value, &task.task_id.value)?;
        write_atomic(&dir.join(TASK_FILE), &checkpoint.encode_to_vec())
    }

    /// Every task checkpointed, with its framework. A file that cannot be
    /// read or decoded is logged and skipped (its container, if any, is then
    /// a leftover and removed).
    pub fn recover(&self) -> Vec<Recovered> {
        let _ = std::fs::remove_dir_all(self.meta.join("trash"));
        let mut recovered = Vec::new();
        for framework_dir in subdirs(&self.meta.join("frameworks")) {
            let framework = match read_pb::<FrameworkInfo>(&framework_dir.join(FRAMEWORK_FILE)) {
                Ok(framework) => framework,
                Err(error) => {
                    tracing::error!(dir = %framework_dir.display(), %error, "cannot read a framework's checkpoint; its tasks are not recovered");
                    continue;
                }
            };
            for task_dir in subdirs(&framework_dir.join("tasks")) {
                match read_pb::<TaskCheckpoint>(&task_dir.join(TASK_FILE)) {
                    Ok(task) => recovered.push(Recovered {
                        framework: framework.clone(),
                        task,
                    }),
                    // Killed before its first write landed: nothing was started.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                        tracing::info!(dir = %task_dir.display(), "a task directory without a checkpoint; removed");
                        let _ = self.remove_dir(&task_dir);
                    }
                    Err(error) => {
                        tracing::error!(dir = %task_dir.display(), %error, "cannot read a task's checkpoint; it is not recovered")
                    }
                }
            }
        }
        recovered
    }

    /// Where a container's supervisor records its start and end.
    pub fn container_dir(&self, container_id: &str) -> std::io::Result<PathBuf> {
        beneath(
            &self.meta.join("containers"),
            &[("container_id", container_id)],
        )
        .map_err(refused)
    }

    /// Forgets an ended container's records.
    pub fn remove_container(&self, container_id: &str) -> std::io::Result<()> {
        self.remove_dir(&self.container_dir(container_id)?)
    }

    /// Forgets every task and container (`--recover cleanup`, or a drain).
    pub fn clear(&self) -> std::io::Result<()> {
        for dir in ["frameworks", "containers", "trash"] {
            match std::fs::remove_dir_all(self.meta.join(dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Forgets a finished task (its last update was acknowledged).
    pub fn remove_task(&self, framework_id: &str, task_id: &str) -> std::io::Result<()> {
        self.remove_dir(&self.task_dir(framework_id, task_id)?)
    }

    /// Removes a directory in one step as readers see it: renamed into
    /// `meta/trash` first, so that a kill -9 part way leaves no half-removed
    /// checkpoint behind, only trash (cleared at the next start).
    fn remove_dir(&self, dir: &Path) -> std::io::Result<()> {
        let trash = self.meta.join("trash");
        std::fs::create_dir_all(&trash)?;
        let doomed = trash.join(uuid::Uuid::new_v4().simple().to_string());
        match std::fs::rename(dir, &doomed) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        std::fs::remove_dir_all(&doomed)
    }

    pub fn agent_id(&self) -> Option<String> {
        std::fs::read_to_string(self.meta.join("agent_id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Forgets the agent's id: the next run registers as a new agent.
    pub fn forget_agent_id(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.meta.join("agent_id")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn set_agent_id(&self, id: &str) -> std::io::Result<()> {
        write_atomic(&self.meta.join("agent_id"), id.as_bytes())
    }
}

/// The directories in `dir` (links not followed); none if it is missing.
pub(crate) fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn read_pb<M: Message + Default>(path: &Path) -> std::io::Result<M> {
    let bytes = std::fs::read(path)?;
    M::decode(bytes.as_slice()).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use butte_api::mesos::v1::{FrameworkId, Task, TaskId};

    #[test]
    fn task_checkpoint_round_trips_and_is_removed() {
        let dir = std::env::temp_dir().join(format!("butte-ckpt-{}", std::process::id()));
        let checkpoint = Checkpoint::new(&dir);
        let task = Task {
            framework_id: FrameworkId { value: "f".into() },
            task_id: TaskId { value: "t".into() },
            state: 1,
            ..Default::default()
        };
        let saved = TaskCheckpoint {
            task,
            container_id: "c".into(),
            ..Default::default()
        };
        checkpoint.task(&saved).unwrap();
        checkpoint
            .framework(&FrameworkInfo {
                id: Some(FrameworkId { value: "f".into() }),
                ..Default::default()
            })
            .unwrap();
        let path = dir.join("meta/frameworks/f/tasks/t/checkpoint.pb");
        let recovered = checkpoint.recover();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].task, saved);
        checkpoint.remove_task("f", "t").unwrap();
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_behind() {
        let dir = std::env::temp_dir().join(format!("butte-ckpt-fail-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("target-is-a-dir")).expect("dirs");
        std::fs::write(dir.join("target-is-a-dir/keep"), "x").expect("file");
        // rename(2) onto a non-empty directory fails after the temp was written.
        let error = write_atomic(&dir.join("target-is-a-dir"), b"data").expect_err("rename fails");
        assert!(error.raw_os_error().is_some(), "{error}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("target-is-a-dir")],
            "no temp file"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn crafted_ids_never_reach_outside_the_work_dir() {
        let base = std::env::temp_dir().join(format!("butte-canary-{}", std::process::id()));
        let work_dir = base.join("agent");
        let canary = base.join("canary");
        std::fs::create_dir_all(canary.join("inside")).unwrap();
        let checkpoint = Checkpoint::new(&work_dir);
        // meta/frameworks/<framework>/tasks/<task>: "../../.." from the
        // tasks dir is the work dir; one more ".." is its parent.
        for (framework_id, task_id) in [
            ("../../..", ".."),
            ("f", "../../../../canary"),
            ("..", "canary"),
            ("f/../..", "x"),
            ("", "t"),
        ] {
            let removed = checkpoint.remove_task(framework_id, task_id);
            assert_eq!(
                removed.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::InvalidInput),
                "{framework_id:?}/{task_id:?}"
            );
            let task = Task {
                framework_id: FrameworkId {
                    value: framework_id.into(),
                },
                task_id: TaskId {
                    value: task_id.into(),
                },
                ..Default::default()
            };
            let saved = TaskCheckpoint {
                task,
                ..Default::default()
            };
            assert!(
                checkpoint.task(&saved).is_err(),
                "{framework_id:?}/{task_id:?}"
            );
        }
        assert!(canary.join("inside").is_dir(), "the canary survives");
        assert!(!work_dir.join("meta").exists(), "nothing was written");
        std::fs::remove_dir_all(base).unwrap();
    }
}
