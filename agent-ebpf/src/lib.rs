//! Butte's eBPF programs and typed handles over them. Programs are attached
//! once, at the agent's cgroup subtree, and act on every task below it; a
//! launch only writes the task's map entries, keyed by its v2 cgroup id (the
//! inode number of its v2 directory).

pub mod ports;
