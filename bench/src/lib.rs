//! What the benchmarks share.

pub mod cluster;
