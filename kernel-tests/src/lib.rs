//! Kernel tests live in `tests/`; they need root and a real kernel (no mocks).
//! What they share with the benchmarks is here.

pub mod link_cut;
