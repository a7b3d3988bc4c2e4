//! Checkpoints under `--work-dir/meta`: one file per framework and per task,
//! written whole (write, fsync, rename) at each state change, so a later
//! agent can recover its tasks.

use std::io::Write;
use std::path::{Path, PathBuf};

use butte_api::mesos::v1::{FrameworkInfo, Task};
use prost::Message;

use crate::workdir::beneath;

pub struct Checkpoint {
    meta: PathBuf,
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("checkpoint path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    // A temp name of its own: two writers of one file must not share it.
    let temp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::create(&temp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    });
    if let Err(error) = written {
        // A full disk must not also leave a temp file per attempt.
        let _ = std::fs::remove_file(&temp);
        return Err(error);
    }
    std::fs::File::open(dir)?.sync_all()
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
            &self.framework_dir(id)?.join("framework.pb"),
            &info.encode_to_vec(),
        )
    }

    pub fn task(&self, task: &Task) -> std::io::Result<()> {
        let dir = self.task_dir(&task.framework_id.value, &task.task_id.value)?;
        write_atomic(&dir.join("task.pb"), &task.encode_to_vec())
    }

    /// Forgets a finished task (its last update was acknowledged).
    pub fn remove_task(&self, framework_id: &str, task_id: &str) -> std::io::Result<()> {
        let dir = self.task_dir(framework_id, task_id)?;
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn agent_id(&self) -> Option<String> {
        std::fs::read_to_string(self.meta.join("agent_id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    pub fn set_agent_id(&self, id: &str) -> std::io::Result<()> {
        write_atomic(&self.meta.join("agent_id"), id.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use butte_api::mesos::v1::{FrameworkId, TaskId};

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
        checkpoint.task(&task).unwrap();
        let path = dir.join("meta/frameworks/f/tasks/t/task.pb");
        assert_eq!(
            Task::decode(std::fs::read(&path).unwrap().as_slice()).unwrap(),
            task
        );
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
            assert!(
                checkpoint.task(&task).is_err(),
                "{framework_id:?}/{task_id:?}"
            );
        }
        assert!(canary.join("inside").is_dir(), "the canary survives");
        assert!(!work_dir.join("meta").exists(), "nothing was written");
        std::fs::remove_dir_all(base).unwrap();
    }
}
