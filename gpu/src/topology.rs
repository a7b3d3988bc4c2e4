//! How two GPUs are connected, in the terms of `nvidia-smi topo -m`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The path between two distinct GPUs, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Link {
    /// `NV#`: direct NVLink (or through NVSwitch) with this many links.
    NvLink(u32),
    /// `PIX`: at most one PCIe switch between them.
    PcieSwitch,
    /// `PXB`: several PCIe switches, no host bridge.
    PcieMultiSwitch,
    /// `PHB`: through one PCIe host bridge (a CPU).
    HostBridge,
    /// `NODE`: across host bridges inside one NUMA node.
    SameNuma,
    /// `SYS`: across NUMA nodes (the SMP interconnect).
    CrossNuma,
}

impl Link {
    /// A score where higher is better connected: NVLink (more links higher) >
    /// PIX > PXB > PHB > NODE > SYS. Every NVLink outranks every PCIe path.
    pub fn rank(self) -> u32 {
        match self {
            Link::NvLink(links) => 100 + links.min(1_000),
            Link::PcieSwitch => 50,
            Link::PcieMultiSwitch => 40,
            Link::HostBridge => 30,
            Link::SameNuma => 20,
            Link::CrossNuma => 10,
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::NvLink(links) => write!(f, "NV{links}"),
            Link::PcieSwitch => f.write_str("PIX"),
            Link::PcieMultiSwitch => f.write_str("PXB"),
            Link::HostBridge => f.write_str("PHB"),
            Link::SameNuma => f.write_str("NODE"),
            Link::CrossNuma => f.write_str("SYS"),
        }
    }
}

/// A string that is not one of nvidia-smi's link names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a link: use NV<n> (n >= 1), PIX, PXB, PHB, NODE or SYS")]
pub struct BadLink(pub String);

impl FromStr for Link {
    type Err = BadLink;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PIX" => Ok(Link::PcieSwitch),
            "PXB" => Ok(Link::PcieMultiSwitch),
            "PHB" => Ok(Link::HostBridge),
            "NODE" => Ok(Link::SameNuma),
            "SYS" => Ok(Link::CrossNuma),
            _ => s
                .strip_prefix("NV")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .map(Link::NvLink)
                .ok_or_else(|| BadLink(s.to_owned())),
        }
    }
}

impl TryFrom<String> for Link {
    type Error = BadLink;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Link> for String {
    fn from(link: Link) -> Self {
        link.to_string()
    }
}

/// GPU-to-GPU links by position in the inventory; `None` on the diagonal.
pub type LinkMatrix = Vec<Vec<Option<Link>>>;

/// Why a topology matrix (rows of nvidia-smi strings) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    /// The number of rows is not the number of GPUs.
    #[error(
        "has {rows} rows but there are {gpus} GPUs: give one row per GPU, in the order of `gpus`"
    )]
    RowCount { rows: usize, gpus: usize },
    /// A row has the wrong length.
    #[error("row {row} has {len} entries but there are {gpus} GPUs: make the matrix square")]
    RowLength { row: usize, len: usize, gpus: usize },
    /// The diagonal must be "X".
    #[error("row {row} column {row} is `{found}`: a GPU's link to itself must be \"X\"")]
    Diagonal { row: usize, found: String },
    /// "X" is only for the diagonal.
    #[error("row {row} column {col} is \"X\": use \"X\" only on the diagonal")]
    OffDiagonalX { row: usize, col: usize },
    /// An entry is not a link name.
    #[error("row {row} column {col}: {source}")]
    Entry {
        row: usize,
        col: usize,
        source: BadLink,
    },
    /// The matrix is not symmetric.
    #[error(
        "row {row} column {col} is {ab} but row {col} column {row} is {ba}: links are symmetric, make them equal"
    )]
    Asymmetric {
        row: usize,
        col: usize,
        ab: Link,
        ba: Link,
    },
}

/// Parses and validates a matrix printed like `nvidia-smi topo -m` (GPU
/// columns only): square, sized to `gpus`, "X" on the diagonal, symmetric.
pub fn parse_matrix<S: AsRef<str>>(
    rows: &[Vec<S>],
    gpus: usize,
) -> Result<LinkMatrix, MatrixError> {
    if rows.len() != gpus {
        return Err(MatrixError::RowCount {
            rows: rows.len(),
            gpus,
        });
    }
    let mut matrix = Vec::with_capacity(gpus);
    for (row, entries) in rows.iter().enumerate() {
        if entries.len() != gpus {
            return Err(MatrixError::RowLength {
                row,
                len: entries.len(),
                gpus,
            });
        }
        let mut parsed = Vec::with_capacity(gpus);
        for (col, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref().trim();
            if row == col {
                if entry != "X" {
                    return Err(MatrixError::Diagonal {
                        row,
                        found: entry.to_owned(),
                    });
                }
                parsed.push(None);
            } else if entry == "X" {
                return Err(MatrixError::OffDiagonalX { row, col });
            } else {
                let link =
                    entry
                        .parse()
                        .map_err(|source| MatrixError::Entry { row, col, source })?;
                parsed.push(Some(link));
            }
        }
        matrix.push(parsed);
    }
    for (row, entries) in matrix.iter().enumerate() {
        for (col, &ab) in entries.iter().enumerate().skip(row + 1) {
            if let (Some(ab), Some(ba)) = (ab, matrix[col][row])
                && ab != ba
            {
                return Err(MatrixError::Asymmetric { row, col, ab, ba });
            }
        }
    }
    Ok(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip_as_nvidia_smi_prints_them() {
        for name in ["NV1", "NV12", "PIX", "PXB", "PHB", "NODE", "SYS"] {
            let link: Link = name.parse().unwrap();
            assert_eq!(link.to_string(), name);
        }
        assert!("NV0".parse::<Link>().is_err());
        assert!("NVX".parse::<Link>().is_err());
        assert!("pix".parse::<Link>().is_err());
    }

    #[test]
    fn ranks_order_nvlink_then_pcie_then_numa() {
        let order = [
            Link::NvLink(4),
            Link::NvLink(2),
            Link::PcieSwitch,
            Link::PcieMultiSwitch,
            Link::HostBridge,
            Link::SameNuma,
            Link::CrossNuma,
        ];
        for pair in order.windows(2) {
            assert!(
                pair[0].rank() > pair[1].rank(),
                "{} vs {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn matrix_errors_name_the_row_and_column() {
        let bad_diagonal = vec![vec!["NV1", "NV1"], vec!["NV1", "X"]];
        assert_eq!(
            parse_matrix(&bad_diagonal, 2).unwrap_err(),
            MatrixError::Diagonal {
                row: 0,
                found: "NV1".into()
            }
        );
        let asymmetric = vec![vec!["X", "PIX"], vec!["SYS", "X"]];
        let err = parse_matrix(&asymmetric, 2).unwrap_err();
        assert!(
            err.to_string()
                .contains("row 0 column 1 is PIX but row 1 column 0 is SYS"),
            "{err}"
        );
        let ragged = vec![vec!["X", "PIX"], vec!["PIX"]];
        assert!(matches!(
            parse_matrix(&ragged, 2),
            Err(MatrixError::RowLength {
                row: 1,
                len: 1,
                gpus: 2
            })
        ));
        let short = vec![vec!["X"]];
        assert!(matches!(
            parse_matrix(&short, 2),
            Err(MatrixError::RowCount { rows: 1, gpus: 2 })
        ));
        let unknown = vec![vec!["X", "NVL"], vec!["NVL", "X"]];
        let err = parse_matrix(&unknown, 2).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("row 0 column 1: `NVL` is not a link"),
            "{err}"
        );
    }
}
