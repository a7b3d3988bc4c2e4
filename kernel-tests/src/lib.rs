//! Kernel tests live in `tests/`; they need root and a real kernel (no mocks).
//! What they share with the benchmarks is here.

pub mod link_cut;

/// The launcher process of the agent `agent` (its child named
/// butte-launcher), from /proc.
pub fn launcher_of(agent: i32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (name, rest) = stat.split_once(") ")?;
            let parent: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (name.ends_with("(butte-launcher") && parent == agent).then_some(pid)
        })
}
