//! What the benchmarks share.

pub mod cluster;
pub mod launch;
