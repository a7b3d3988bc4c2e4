//! Butte's wire: the Mesos v1 messages we serve (generated from our own
//! `.proto` subset, Mesos's field names and numbers), the agent<->master gRPC
//! link, Mesos's JSON mapping, RecordIO framing and resource arithmetic.

pub mod agent_checkpoint;
pub mod daemon;
pub mod duration;
pub mod fuzz;
pub mod ids;
pub mod json;
pub mod recordio;
pub mod resources;
pub mod task_state;
pub mod update_queue;

/// Mesos v1 messages, as `mesos::v1::*`, `mesos::v1::{scheduler,master,agent}::*`.
pub mod mesos {
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/mesos.v1.rs"));
        pub mod scheduler {
            include!(concat!(env!("OUT_DIR"), "/mesos.v1.scheduler.rs"));
        }
        pub mod master {
            include!(concat!(env!("OUT_DIR"), "/mesos.v1.master.rs"));
        }
        pub mod agent {
            include!(concat!(env!("OUT_DIR"), "/mesos.v1.agent.rs"));
        }
    }
}

/// Butte's own messages; modules mirror the proto packages so generated paths resolve.
pub mod butte {
    pub mod agent {
        #[allow(clippy::all, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/butte.agent.v1.rs"));
        }
    }
    pub mod telemetry {
        #[allow(clippy::all, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/butte.telemetry.v1.rs"));
        }
    }
}

/// Per-task telemetry (`butte.telemetry.v1`): samples and batches.
pub mod telemetry {
    pub use crate::butte::telemetry::v1;
}

/// The agent<->master link (`butte.agent.v1.AgentLink`).
pub mod agent_link {
    pub use crate::butte::agent::v1;
}

/// The Mesos version we answer to `GET /version` and GET_VERSION: the API
/// level our clients expect, not Butte's own version.
pub const MESOS_VERSION: &str = "1.11.0";
