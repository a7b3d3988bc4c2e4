//! What fences a task in: its cgroups (`cgroups`), the namespaces, mounts
//! and hostname it is spawned into (`container`), and the eBPF fences over
//! its ports, devices and network, with its accounting (`fences`).

pub mod cgroups;
pub mod container;
pub mod fences;
pub mod process;
pub mod quota;
