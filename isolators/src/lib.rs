//! What fences a task in: its cgroups (`cgroups`), and the namespaces,
//! mounts and hostname it is spawned into (`container`).

pub mod cgroups;
pub mod container;
