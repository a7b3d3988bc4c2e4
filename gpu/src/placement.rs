//! Choosing which free GPUs to give a task so that they talk fastest.
//!
//! A set is judged by its weakest pairwise link (the bottleneck of a ring
//! all-reduce), then by the sum of its pairwise link ranks, then by how well
//! GPUs on the fewest NUMA nodes, then by how well the GPUs left free stay
//! connected (each one's best remaining partner, then all remaining pairs),
//! then by the lowest indices. Small searches try every
//! combination; large ones grow a set greedily from every seed.

use std::cmp::Reverse;

use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;

/// Above this many combinations, placement grows sets greedily instead.
pub const EXHAUSTIVE_LIMIT: u128 = 20_000;

/// The GPUs chosen for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// NVML indices, ascending.
    pub gpus: Vec<u32>,
    /// The NUMA node, when every chosen GPU is on the same one.
    pub numa_node: Option<u32>,
    /// The weakest link in the set as nvidia-smi prints it (`NV2`, `PIX`,
    /// `SYS`), `single` for one GPU, `unknown` if the inventory lacks a link.
    pub interconnect: String,
}

/// The `count` best-connected GPUs among `free` (NVML indices; unknown or
/// repeated indices are ignored), or `None` if fewer are free or `count` is 0.
pub fn choose(inventory: &Inventory, free: &[u32], count: usize) -> Option<Choice> {
    let mut pool: Vec<(u32, usize)> = free
        .iter()
        .filter_map(|&index| inventory.position(index).map(|pos| (index, pos)))
        .collect();
    pool.sort_unstable();
    pool.dedup();
    if count == 0 || pool.len() < count {
        return None;
    }
    let ranks: Vec<Vec<u32>> = pool
        .iter()
        .map(|&(_, a)| {
            pool.iter()
                .map(|&(_, b)| {
                    inventory
                        .links
                        .get(a)
                        .and_then(|row| row.get(b))
                        .copied()
                        .flatten()
                        .map_or(0, |link| link.rank())
                })
                .collect()
        })
        .collect();
    let numa: Vec<Option<u32>> = pool
        .iter()
        .map(|&(_, pos)| inventory.gpus[pos].numa_node)
        .collect();
    let search = Search {
        ranks: &ranks,
        numa: &numa,
    };
    let candidates = if combinations(pool.len(), count) <= EXHAUSTIVE_LIMIT {
        search.every_combination(count)
    } else {
        search.greedy_from_every_seed(count)
    };
    let best = candidates
        .into_iter()
        .max_by_key(|set| search.score(set, &pool))?;
    Some(describe(inventory, &pool, &best))
}

/// C(n, k), saturating just above the limit.
fn combinations(n: usize, k: usize) -> u128 {
    let mut total: u128 = 1;
    for i in 0..k {
        total = total * (n - i) as u128 / (i as u128 + 1);
        if total > EXHAUSTIVE_LIMIT {
            return EXHAUSTIVE_LIMIT + 1;
        }
    }
    total
}

/// Sets are vectors of positions in the pool, ascending.
struct Search<'a> {
    ranks: &'a [Vec<u32>],
    numa: &'a [Option<u32>],
}

/// Compared lexicographically; larger is better.
type Score = (u32, u32, Reverse<usize>, u32, u32, Reverse<Vec<u32>>);

impl Search<'_> {
    fn every_combination(&self, count: usize) -> Vec<Vec<usize>> {
        let n = self.ranks.len();
        let mut sets = Vec::new();
        let mut set: Vec<usize> = (0..count).collect();
        loop {
            sets.push(set.clone());
            // Advance the rightmost position that can still move.
            let Some(i) = (0..count).rev().find(|&i| set[i] < n - count + i) else {
                return sets;
            };
            set[i] += 1;
            for j in (i + 1)..count {
                set[j] = set[j - 1] + 1;
            }
        }
    }

    fn greedy_from_every_seed(&self, count: usize) -> Vec<Vec<usize>> {
        let n = self.ranks.len();
        let mut sets: Vec<Vec<usize>> = (0..n)
            .map(|seed| {
                let mut set = vec![seed];
                while set.len() < count {
                    let next = (0..n).filter(|c| !set.contains(c)).max_by_key(|&c| {
                        let to_set = set.iter().map(|&m| self.ranks[c][m]);
                        (
                            to_set.clone().min().unwrap_or(0),
                            to_set.sum::<u32>(),
                            Reverse(c),
                        )
                    });
                    match next {
                        Some(c) => set.push(c),
                        None => break,
                    }
                }
                set.sort_unstable();
                set
            })
            .collect();
        sets.sort();
        sets.dedup();
        sets
    }

    fn score(&self, set: &[usize], pool: &[(u32, usize)]) -> Score {
        let mut weakest = u32::MAX;
        let mut total = 0;
        for (i, &a) in set.iter().enumerate() {
            for &b in &set[i + 1..] {
                weakest = weakest.min(self.ranks[a][b]);
                total += self.ranks[a][b];
            }
        }
        let mut nodes: Vec<Option<u32>> = set.iter().map(|&p| self.numa[p]).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let left: Vec<usize> = (0..self.ranks.len()).filter(|p| !set.contains(p)).collect();
        let mut best_partners = 0;
        let mut left_pairs = 0;
        for (i, &a) in left.iter().enumerate() {
            best_partners += left
                .iter()
                .filter(|&&b| b != a)
                .map(|&b| self.ranks[a][b])
                .max()
                .unwrap_or(0);
            for &b in &left[i + 1..] {
                left_pairs += self.ranks[a][b];
            }
        }
        let indices = set.iter().map(|&p| pool[p].0).collect();
        (
            weakest,
            total,
            Reverse(nodes.len()),
            best_partners,
            left_pairs,
            Reverse(indices),
        )
    }
}

fn describe(inventory: &Inventory, pool: &[(u32, usize)], set: &[usize]) -> Choice {
    let gpus: Vec<u32> = set.iter().map(|&p| pool[p].0).collect();
    let numas: Vec<Option<u32>> = set
        .iter()
        .map(|&p| inventory.gpus[pool[p].1].numa_node)
        .collect();
    let numa_node = match numas.first() {
        Some(&Some(first)) if numas.iter().all(|n| *n == Some(first)) => Some(first),
        _ => None,
    };
    let mut weakest = None;
    let mut missing = false;
    for (i, &a) in gpus.iter().enumerate() {
        for &b in &gpus[i + 1..] {
            match inventory.link(a, b) {
                Some(link) if weakest.is_none_or(|w: crate::Link| link.rank() < w.rank()) => {
                    weakest = Some(link)
                }
                Some(_) => {}
                None => missing = true,
            }
        }
    }
    let interconnect = if gpus.len() == 1 {
        "single".to_owned()
    } else if missing {
        "unknown".to_owned()
    } else {
        weakest.map_or_else(|| "unknown".to_owned(), |link| link.to_string())
    };
    Choice {
        gpus,
        numa_node,
        interconnect,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::inventory::Gpu;
    use crate::topology::parse_matrix;

    fn node(numa: &[u32], rows: &[&[&str]]) -> Inventory {
        let gpus = numa
            .iter()
            .enumerate()
            .map(|(i, &numa)| {
                let index = u32::try_from(i).unwrap();
                Gpu {
                    index,
                    uuid: format!("GPU-{i}"),
                    model: "test".into(),
                    memory_mib: 81_920,
                    numa_node: Some(numa),
                    pci_bus_id: format!("00000000:{:02x}:00.0", i + 1),
                    device: PathBuf::from(format!("/dev/nvidia{i}")),
                    major: 195,
                    minor: index,
                    mig: vec![],
                }
            })
            .collect();
        let rows: Vec<Vec<&str>> = rows.iter().map(|r| r.to_vec()).collect();
        Inventory {
            gpus,
            links: parse_matrix(&rows, numa.len()).unwrap(),
            control_devices: vec![],
        }
    }

    /// NV4 pairs (0,1) (2,3) (4,5) (6,7); PIX between GPUs on one switch
    /// (0,2) (1,3) (4,6) (5,7); NODE inside a NUMA node; SYS across.
    fn nvlink_pairs() -> Inventory {
        node(
            &[0, 0, 0, 0, 1, 1, 1, 1],
            &[
                &["X", "NV4", "PIX", "NODE", "SYS", "SYS", "SYS", "SYS"],
                &["NV4", "X", "NODE", "PIX", "SYS", "SYS", "SYS", "SYS"],
                &["PIX", "NODE", "X", "NV4", "SYS", "SYS", "SYS", "SYS"],
                &["NODE", "PIX", "NV4", "X", "SYS", "SYS", "SYS", "SYS"],
                &["SYS", "SYS", "SYS", "SYS", "X", "NV4", "PIX", "NODE"],
                &["SYS", "SYS", "SYS", "SYS", "NV4", "X", "NODE", "PIX"],
                &["SYS", "SYS", "SYS", "SYS", "PIX", "NODE", "X", "NV4"],
                &["SYS", "SYS", "SYS", "SYS", "NODE", "PIX", "NV4", "X"],
            ],
        )
    }

    fn is_nvlink_pair(inv: &Inventory, a: u32, b: u32) -> bool {
        matches!(inv.link(a, b), Some(crate::Link::NvLink(_)))
    }

    #[test]
    fn two_gpus_come_as_an_nvlink_pair() {
        let inv = nvlink_pairs();
        let choice = choose(&inv, &[0, 1, 2, 3, 4, 5, 6, 7], 2).unwrap();
        assert_eq!(choice.gpus, vec![0, 1]);
        assert_eq!(choice.interconnect, "NV4");
        assert_eq!(choice.numa_node, Some(0));
    }

    #[test]
    fn with_gpu_0_taken_two_gpus_come_as_another_intact_pair() {
        let inv = nvlink_pairs();
        let choice = choose(&inv, &[1, 2, 3, 4, 5, 6, 7], 2).unwrap();
        assert!(
            is_nvlink_pair(&inv, choice.gpus[0], choice.gpus[1]),
            "{choice:?}"
        );
        assert!(
            !choice.gpus.contains(&1),
            "{choice:?} broke GPU 1 off nothing"
        );
        assert_eq!(choice.interconnect, "NV4");
    }

    #[test]
    fn one_gpu_takes_the_orphan_of_a_broken_pair() {
        let inv = nvlink_pairs();
        let choice = choose(&inv, &[1, 2, 3, 4, 5, 6, 7], 1).unwrap();
        assert_eq!(choice.gpus, vec![1]);
        assert_eq!(choice.interconnect, "single");
    }

    #[test]
    fn two_asks_of_four_give_disjoint_numa_local_pairs_of_pairs() {
        let inv = nvlink_pairs();
        let mut free: Vec<u32> = (0..8).collect();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let choice = choose(&inv, &free, 4).unwrap();
            assert!(choice.numa_node.is_some(), "{choice:?}");
            let linked = choice
                .gpus
                .iter()
                .filter(|&&a| choice.gpus.iter().any(|&b| is_nvlink_pair(&inv, a, b)))
                .count();
            assert_eq!(linked, 4, "{choice:?} is not two NVLink pairs");
            assert_eq!(choice.interconnect, "NODE");
            free.retain(|g| !choice.gpus.contains(g));
            seen.extend(choice.gpus);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn asking_for_more_than_free_gives_none() {
        let inv = nvlink_pairs();
        assert_eq!(choose(&inv, &[0, 1, 2], 4), None);
        assert_eq!(choose(&inv, &[0, 0, 0, 1], 3), None, "repeats count once");
        assert_eq!(
            choose(&inv, &[0, 1, 42], 3),
            None,
            "unknown GPUs are ignored"
        );
        assert_eq!(choose(&inv, &[0, 1], 0), None);
    }

    #[test]
    fn an_all_nvlink_dgx_node_prefers_one_numa_node_then_lowest_indices() {
        let row = |i: usize| -> Vec<&'static str> {
            (0..8).map(|j| if i == j { "X" } else { "NV12" }).collect()
        };
        let rows: Vec<Vec<&str>> = (0..8).map(row).collect();
        let rows: Vec<&[&str]> = rows.iter().map(Vec::as_slice).collect();
        let inv = node(&[0, 0, 0, 0, 1, 1, 1, 1], &rows);
        let choice = choose(&inv, &[0, 1, 2, 3, 4, 5, 6, 7], 4).unwrap();
        assert_eq!(choice.interconnect, "NV12");
        assert_eq!(choice.gpus, vec![0, 1, 2, 3]);
        assert_eq!(choice.numa_node, Some(0));
        let choice = choose(&inv, &[3, 5, 6], 2).unwrap();
        assert_eq!(choice.gpus, vec![5, 6], "one NUMA node beats lower indices");
        let all = choose(&inv, &(0..8).collect::<Vec<_>>(), 8).unwrap();
        assert_eq!(all.numa_node, None);
    }

    #[test]
    fn large_nodes_are_searched_greedily_and_stay_on_one_board() {
        // Three boards of eight all-NVLink GPUs, SYS between boards:
        // C(24, 6) = 134,596 combinations, past the exhaustive limit.
        let n = 24;
        let rows: Vec<Vec<&str>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| match (i == j, i / 8 == j / 8) {
                        (true, _) => "X",
                        (false, true) => "NV8",
                        (false, false) => "SYS",
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<&[&str]> = rows.iter().map(Vec::as_slice).collect();
        let numa: Vec<u32> = (0..n).map(|i| u32::try_from(i / 8).unwrap()).collect();
        let inv = node(&numa, &rows);
        assert!(combinations(n, 6) > EXHAUSTIVE_LIMIT);
        let free: Vec<u32> = (2..24).collect();
        let choice = choose(&inv, &free, 6).unwrap();
        assert_eq!(choice.interconnect, "NV8");
        assert_eq!(
            choice.gpus,
            vec![2, 3, 4, 5, 6, 7],
            "uses up the partly taken board and leaves two whole ones"
        );
    }
}
