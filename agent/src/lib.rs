//! Butte's node agent: registers with the master over the gRPC link and runs
//! each task in its own container (cgroups and namespaces), launched by a
//! single-threaded launcher process.

pub mod agent;
pub mod cgroup_reader;
pub mod checkpoint;
pub mod config;
pub mod containers;
pub mod disk;
pub mod gc;
pub mod gpu_telemetry;
pub mod gpus;
pub mod http;
pub mod launcher;
pub mod launcher_client;
pub mod link;
pub mod metrics;
pub mod resources;
pub mod seccomp_profiles;
pub mod telemetry;
pub mod users;
pub mod workdir;

pub use config::AgentConfig;
