//! Every eBPF program the agent runs, attached at a bench subtree; `track`
//! writes a task's entries in each map as the agent's launch does.

// Each bench that includes this uses a part of it.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use butte_agent_ebpf::accounting::Accounting;
use butte_agent_ebpf::devices::{DeviceFence, default_rules};
use butte_agent_ebpf::network::{self, Network};
use butte_agent_ebpf::ports::PortFence;

pub struct Programs {
    pub accounting: Accounting,
    pub network: Network,
    pub ports: PortFence,
    pub devices: DeviceFence,
}

impl Programs {
    pub fn attach(subtree: &Path) -> Self {
        Self {
            accounting: Accounting::attach().unwrap_or_else(|e| panic!("{e}")),
            network: Network::attach(subtree).unwrap_or_else(|e| panic!("{e}")),
            ports: PortFence::attach(subtree).unwrap_or_else(|e| panic!("{e}")),
            devices: DeviceFence::attach(subtree).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// Writes the entries of the task whose v2 cgroup is `unified`; its key.
    pub fn track(&mut self, unified: &Path, egress_mbit_per_s: Option<f64>) -> u64 {
        let key = std::fs::metadata(unified)
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("{}: {e}", unified.display()));
        self.ports
            .allow(key, &[(31000, 31010)])
            .unwrap_or_else(|e| panic!("{e}"));
        self.devices
            .allow(key, &default_rules())
            .unwrap_or_else(|e| panic!("{e}"));
        let limits = network::Limits {
            egress_mbit_per_s,
            police_ingress: false,
        };
        self.network
            .track(key, limits)
            .unwrap_or_else(|e| panic!("{e}"));
        self.accounting.track(key).unwrap_or_else(|e| panic!("{e}"));
        key
    }

    pub fn forget(&mut self, key: u64) {
        self.ports.forget(key);
        self.devices.forget(key);
        self.network.forget(key);
        self.accounting.forget(key);
    }

    /// Kernel time the programs ran (run-time stats on).
    pub fn run_time(&self) -> Duration {
        self.accounting.run_time() + self.network.run_time()
    }

    pub fn run_count(&self) -> u64 {
        self.accounting.run_count() + self.network.run_count()
    }
}
