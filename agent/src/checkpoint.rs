//! Checkpoints under `--work-dir/meta`: one file per framework and per task,
//! written whole (write, fsync, rename) at each state change, so a later
//! agent can recover its tasks.

use std::io::Write;
use std::path::{Path, PathBuf};

use butte_api::mesos::v1::{FrameworkInfo, Task};
use prost::Message;

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
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Checkpoint {
    pub fn new(work_dir: &Path) -> Self {
        Self {
            meta: work_dir.join("meta"),
        }
    }

    fn framework_dir(&self, framework_id: &str) -> PathBuf {
        self.meta.join("frameworks").join(framework_id)
    }

    pub fn framework(&self, info: &FrameworkInfo) -> std::io::Result<()> {
        let id = info.id.as_ref().map_or("unknown", |f| f.value.as_str());
        write_atomic(
            &self.framework_dir(id).join("framework.pb"),
            &info.encode_to_vec(),
        )
    }

    pub fn task(&self, task: &Task) -> std::io::Result<()> {
        let path = self
            .framework_dir(&task.framework_id.value)
            .join("tasks")
            .join(&task.task_id.value)
            .join("task.pb");
        write_atomic(&path, &task.encode_to_vec())
    }

    /// Forgets a finished task (its last update was acknowledged).
    pub fn remove_task(&self, framework_id: &str, task_id: &str) -> std::io::Result<()> {
        let dir = self.framework_dir(framework_id).join("tasks").join(task_id);
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
}
