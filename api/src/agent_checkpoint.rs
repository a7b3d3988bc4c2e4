//! The agent's task checkpoint (`--work-dir/meta/frameworks/F/tasks/T/checkpoint.pb`),
//! here so that the fuzz targets read it as the agent does.

use crate::agent_link::v1::StatusUpdate;
use crate::mesos::v1::Task;

/// What the agent keeps of a task: the task as the master sees it, where it
/// runs, and its updates not yet acknowledged, oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskCheckpoint {
    #[prost(message, required, tag = "1")]
    pub task: Task,
    #[prost(string, tag = "2")]
    pub container_id: String,
    #[prost(string, tag = "3")]
    pub cgroup_id: String,
    #[prost(string, optional, tag = "4")]
    pub group: Option<String>,
    #[prost(string, tag = "5")]
    pub executor_id: String,
    #[prost(string, tag = "6")]
    pub sandbox: String,
    /// The GPUs its container holds, as JSON (empty: none).
    #[prost(string, tag = "7")]
    pub gpus_json: String,
    /// A kill was asked for.
    #[prost(bool, tag = "8")]
    pub killing: bool,
    #[prost(message, repeated, tag = "9")]
    pub pending: Vec<StatusUpdate>,
}
