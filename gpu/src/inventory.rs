//! What GPUs a node has, their device nodes, and how they are linked.

use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::GpuError;
use crate::topology::{Link, LinkMatrix};

/// The character-device major of `/dev/nvidia*` (GPUs and nvidiactl).
pub const NVIDIA_MAJOR: u32 = 195;

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML's index (what `nvidia-smi -i` takes).
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    pub numa_node: Option<u32>,
    /// As NVML prints it, e.g. `00000000:07:00.0`.
    pub pci_bus_id: String,
    /// The device node, e.g. `/dev/nvidia3`.
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// MIG instances; empty unless the GPU is in MIG mode.
    pub mig: Vec<MigInstance>,
}

/// One MIG instance (a GPU instance with one compute instance) of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    pub gpu_index: u32,
    /// The profile, e.g. `1g.10gb`.
    pub profile: String,
    pub uuid: String,
    pub gi_id: u32,
    pub ci_id: u32,
    /// The compute instance's access capability, `/dev/nvidia-caps/nvidia-capN`.
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The GPU instance's access capability, which a task also needs.
    pub gi_device: Option<ControlDevice>,
}

/// A device node every GPU task needs besides its GPUs (nvidiactl, nvidia-uvm, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

impl ControlDevice {
    /// Reads the numbers of a character device node.
    pub fn stat(path: &Path) -> Result<Self, GpuError> {
        let (major, minor) = char_device(path)?;
        Ok(ControlDevice {
            path: path.to_owned(),
            major,
            minor,
        })
    }
}

/// The control nodes a driver install creates, probed by the NVML backend.
pub const CONTROL_DEVICE_PATHS: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// The (major, minor) of a character device node; an error if the path is
/// missing or is not a character device.
pub fn char_device(path: &Path) -> Result<(u32, u32), GpuError> {
    let meta = std::fs::metadata(path).map_err(|source| GpuError::DeviceNode {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_char_device() {
        return Err(GpuError::NotCharDevice {
            path: path.to_owned(),
        });
    }
    Ok(split_dev(meta.rdev()))
}

/// Splits a Linux `dev_t` as glibc's `major()`/`minor()` do.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    // Both fit in 32 bits by construction of the masks.
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

/// Everything a backend knows about a node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    /// `links[i][j]` joins `gpus[i]` and `gpus[j]` (positions, not indices);
    /// `None` on the diagonal.
    pub links: LinkMatrix,
    /// The control nodes that exist.
    pub control_devices: Vec<ControlDevice>,
}

impl Inventory {
    /// The position in `gpus` of the GPU with this NVML index.
    pub fn position(&self, index: u32) -> Option<usize> {
        self.gpus.iter().position(|gpu| gpu.index == index)
    }

    /// The GPU with this NVML index.
    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|gpu| gpu.index == index)
    }

    /// The link between two GPUs by NVML index; `None` for a GPU with itself
    /// or an unknown index.
    pub fn link(&self, a: u32, b: u32) -> Option<Link> {
        let (a, b) = (self.position(a)?, self.position(b)?);
        self.links.get(a)?.get(b).copied().flatten()
    }

    /// The GPU-to-GPU part of `nvidia-smi topo -m`, plus NUMA affinity.
    pub fn topology_table(&self) -> String {
        let mut out = String::from("      ");
        for gpu in &self.gpus {
            let _ = write!(out, "{:<7}", format!("GPU{}", gpu.index));
        }
        out.push_str("NUMA Affinity\n");
        for (row, gpu) in self.gpus.iter().enumerate() {
            let _ = write!(out, "{:<6}", format!("GPU{}", gpu.index));
            for col in 0..self.gpus.len() {
                let cell = match self.links.get(row).and_then(|r| r.get(col)).copied() {
                    Some(Some(link)) => link.to_string(),
                    Some(None) => "X".to_owned(),
                    None => "?".to_owned(),
                };
                let _ = write!(out, "{cell:<7}");
            }
            match gpu.numa_node {
                Some(node) => {
                    let _ = writeln!(out, "{node}");
                }
                None => out.push_str("N/A\n"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_splits_like_glibc() {
        // makedev(195, 3) and makedev(511, 70000) in glibc's encoding.
        assert_eq!(split_dev((195 << 8) | 3), (195, 3));
        let dev = ((511u64 & 0xfff) << 8) | ((70000u64 & 0xff) | ((70000u64 & !0xff) << 12));
        assert_eq!(split_dev(dev), (511, 70000));
    }

    #[test]
    fn a_regular_file_is_not_a_device_node() {
        let path = std::env::temp_dir().join(format!("butte-gpu-notdev-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let err = char_device(&path).unwrap_err();
        assert!(matches!(err, GpuError::NotCharDevice { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            char_device(&path),
            Err(GpuError::DeviceNode { .. })
        ));
    }
}
