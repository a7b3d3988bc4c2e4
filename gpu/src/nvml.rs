//! The NVML backend: the NVIDIA driver's management library, loaded at run
//! time by nvml-wrapper so that this crate builds and runs without a driver.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, TemperatureSensor, TopologyLevel,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, Nvml};

use crate::GpuBackend;
use crate::error::GpuError;
use crate::inventory::{
    CONTROL_DEVICE_PATHS, ControlDevice, Gpu, Inventory, MigInstance, NVIDIA_MAJOR,
};
use crate::sample::{GpuProcess, GpuSample};
use crate::topology::{Link, LinkMatrix};

const MIB: u64 = 1024 * 1024;
/// NVML_NVLINK_MAX_LINKS of the NVML headers nvml-wrapper 0.13 binds.
const MAX_NVLINKS: u32 = 18;
/// NVML_DEVICE_MIG_ENABLE.
const MIG_ENABLED: u32 = 1;
const MIG_MINORS: &str = "/proc/driver/nvidia-caps/mig-minors";

/// The backend for `--gpu-backend nvml`.
pub struct NvmlBackend {
    nvml: Nvml,
}

impl NvmlBackend {
    /// Loads and initialises NVML; `Ok(None)` when there is no NVIDIA driver.
    pub fn open() -> Result<Option<Self>, GpuError> {
        match Nvml::init() {
            Ok(nvml) => Ok(Some(NvmlBackend { nvml })),
            Err(NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound) => {
                tracing::info!("no NVIDIA driver (libnvidia-ml.so.1 not loadable): no NVIDIA GPUs");
                Ok(None)
            }
            Err(NvmlError::DriverNotLoaded) => {
                tracing::info!(
                    "NVIDIA kernel driver not loaded (libnvidia-ml.so.1 is present): no NVIDIA GPUs"
                );
                Ok(None)
            }
            Err(source) => Err(GpuError::Nvml {
                call: "nvmlInit_v2",
                source,
            }),
        }
    }

    fn devices(&self) -> Result<Vec<Device<'_>>, GpuError> {
        let count = call("nvmlDeviceGetCount", self.nvml.device_count())?;
        (0..count)
            .map(|i| call("nvmlDeviceGetHandleByIndex", self.nvml.device_by_index(i)))
            .collect()
    }

    fn gpu(&self, device: &Device<'_>, caps: &mut Option<MigCaps>) -> Result<Gpu, GpuError> {
        let index = call("nvmlDeviceGetIndex", device.index())?;
        let pci = call("nvmlDeviceGetPciInfo", device.pci_info())?;
        let numa_node = match device.numa_node_id() {
            Ok(node) => Some(node),
            // Older drivers lack the call; the kernel knows too.
            Err(err) => {
                tracing::debug!(index, error = %err, "nvmlDeviceGetNumaNodeId failed, reading sysfs");
                sysfs_numa_node(&pci.bus_id)
            }
        };
        let minor = call("nvmlDeviceGetMinorNumber", device.minor_number())?;
        let mig = match optional("nvmlDeviceGetMigMode", device.mig_mode())? {
            Some(mode) if mode.current == MIG_ENABLED => {
                self.mig_instances(device, index, minor, caps)?
            }
            _ => Vec::new(),
        };
        Ok(Gpu {
            index,
            uuid: call("nvmlDeviceGetUUID", device.uuid())?,
            model: call("nvmlDeviceGetName", device.name())?,
            memory_mib: call("nvmlDeviceGetMemoryInfo", device.memory_info())?.total / MIB,
            numa_node,
            pci_bus_id: pci.bus_id,
            device: PathBuf::from(format!("/dev/nvidia{minor}")),
            major: NVIDIA_MAJOR,
            minor,
            mig,
        })
    }

    fn mig_instances(
        &self,
        device: &Device<'_>,
        gpu_index: u32,
        gpu_minor: u32,
        caps: &mut Option<MigCaps>,
    ) -> Result<Vec<MigInstance>, GpuError> {
        let slots = call("nvmlDeviceGetMaxMigDeviceCount", device.mig_device_count())?;
        let mut instances = Vec::new();
        for slot in 0..slots {
            let mig = match device.mig_device_by_index(slot) {
                Ok(mig) => mig,
                // Empty slots answer NotFound.
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(source) => {
                    return Err(GpuError::Nvml {
                        call: "nvmlDeviceGetMigDeviceHandleByIndex",
                        source,
                    });
                }
            };
            let name = call("nvmlDeviceGetName", mig.name())?;
            // MIG names read "NVIDIA A100-SXM4-40GB MIG 1g.5gb".
            let profile = name
                .rsplit_once("MIG ")
                .map_or(name.as_str(), |(_, profile)| profile)
                .trim()
                .to_owned();
            let (gi_id, ci_id) = instance_ids(&self.nvml, &mig)?;
            if caps.is_none() {
                *caps = Some(MigCaps::read()?);
            }
            let Some(caps) = caps.as_ref() else {
                continue;
            };
            let ci = caps.node(&format!("gpu{gpu_minor}/gi{gi_id}/ci{ci_id}/access"))?;
            let gi = caps.node(&format!("gpu{gpu_minor}/gi{gi_id}/access"))?;
            instances.push(MigInstance {
                gpu_index,
                profile,
                uuid: call("nvmlDeviceGetUUID", mig.uuid())?,
                gi_id,
                ci_id,
                device: ci.path,
                major: ci.major,
                minor: ci.minor,
                gi_device: Some(gi),
            });
        }
        Ok(instances)
    }

    fn links(&self, devices: &[Device<'_>]) -> Result<LinkMatrix, GpuError> {
        let n = devices.len();
        let mut buses = Vec::with_capacity(n);
        for device in devices {
            let pci = call("nvmlDeviceGetPciInfo", device.pci_info())?;
            buses.push((pci.domain, pci.bus, pci.device));
        }
        // Active NVLinks per pair, and per GPU those that end at an NVSwitch
        // (any remote that is not one of our GPUs).
        let mut direct = vec![vec![0u32; n]; n];
        let mut to_switch = vec![0u32; n];
        for (i, device) in devices.iter().enumerate() {
            for number in 0..MAX_NVLINKS {
                let link = device.link_wrapper_for(number);
                if !absent_is_none("nvmlDeviceGetNvLinkState", link.is_active())?.unwrap_or(false) {
                    continue;
                }
                let Some(remote) =
                    absent_is_none("nvmlDeviceGetNvLinkRemotePciInfo", link.remote_pci_info())?
                else {
                    continue;
                };
                match buses
                    .iter()
                    .position(|b| *b == (remote.domain, remote.bus, remote.device))
                {
                    Some(j) if j != i => direct[i][j] += 1,
                    Some(_) => {}
                    None => to_switch[i] += 1,
                }
            }
        }
        let mut matrix = vec![vec![None; n]; n];
        for i in 0..n {
            for j in (i + 1)..n {
                let links = direct[i][j].max(direct[j][i]) + to_switch[i].min(to_switch[j]);
                let link = if links > 0 {
                    Link::NvLink(links)
                } else {
                    match optional(
                        "nvmlDeviceGetTopologyCommonAncestor",
                        self.nvml.topology_common_ancestor(&devices[i], &devices[j]),
                    )? {
                        Some(TopologyLevel::Internal | TopologyLevel::Single) => Link::PcieSwitch,
                        Some(TopologyLevel::Multiple) => Link::PcieMultiSwitch,
                        Some(TopologyLevel::HostBridge) => Link::HostBridge,
                        Some(TopologyLevel::Node) => Link::SameNuma,
                        Some(TopologyLevel::System) | None => Link::CrossNuma,
                    }
                };
                matrix[i][j] = Some(link);
                matrix[j][i] = Some(link);
            }
        }
        Ok(matrix)
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<Inventory, GpuError> {
        let devices = self.devices()?;
        let mut caps = None;
        let gpus = devices
            .iter()
            .map(|device| self.gpu(device, &mut caps))
            .collect::<Result<Vec<_>, _>>()?;
        let links = self.links(&devices)?;
        let control_devices = CONTROL_DEVICE_PATHS
            .iter()
            .filter_map(|path| match ControlDevice::stat(Path::new(path)) {
                Ok(node) => Some(node),
                Err(err) => {
                    tracing::debug!(error = %err, "NVIDIA control device absent");
                    None
                }
            })
            .collect();
        Ok(Inventory {
            gpus,
            links,
            control_devices,
        })
    }

    fn samples(&self) -> Result<Vec<GpuSample>, GpuError> {
        self.devices()?
            .iter()
            .map(|device| {
                // A MIG-mode GPU answers NotSupported for utilization; a
                // consumer board for ECC: both read as 0.
                Ok(GpuSample {
                    index: call("nvmlDeviceGetIndex", device.index())?,
                    utilization_percent: optional(
                        "nvmlDeviceGetUtilizationRates",
                        device.utilization_rates(),
                    )?
                    .map_or(0.0, |u| f64::from(u.gpu)),
                    memory_used_mib: optional("nvmlDeviceGetMemoryInfo", device.memory_info())?
                        .map_or(0, |m| m.used / MIB),
                    power_watts: optional("nvmlDeviceGetPowerUsage", device.power_usage())?
                        .map_or(0.0, |mw| f64::from(mw) / 1000.0),
                    temperature_c: optional(
                        "nvmlDeviceGetTemperature",
                        device.temperature(TemperatureSensor::Gpu),
                    )?
                    .map_or(0.0, f64::from),
                    ecc_uncorrectable: optional(
                        "nvmlDeviceGetTotalEccErrors",
                        device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                    )?
                    .unwrap_or(0),
                    // NVML delivers XIDs only as events to a registered
                    // event set; this backend does not watch them yet.
                    xid_errors: Vec::new(),
                })
            })
            .collect()
    }

    fn processes(&self) -> Result<Vec<GpuProcess>, GpuError> {
        let mut processes = Vec::new();
        for device in self.devices()? {
            let gpu_index = call("nvmlDeviceGetIndex", device.index())?;
            let running = absent_is_none(
                "nvmlDeviceGetComputeRunningProcesses",
                device.running_compute_processes(),
            )?
            .unwrap_or_default();
            // Latest SM sample per pid; NotFound means no samples buffered.
            let mut sm: HashMap<u32, (u64, u32)> = HashMap::new();
            let samples = absent_is_none(
                "nvmlDeviceGetProcessUtilization",
                device.process_utilization_stats(None),
            )?
            .unwrap_or_default();
            for sample in samples {
                let entry = sm.entry(sample.pid).or_insert((0, 0));
                if sample.timestamp >= entry.0 {
                    *entry = (sample.timestamp, sample.sm_util);
                }
            }
            for process in running {
                processes.push(GpuProcess {
                    pid: process.pid,
                    gpu_index,
                    memory_used_mib: match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes / MIB,
                        UsedGpuMemory::Unavailable => 0,
                    },
                    sm_utilization_percent: sm
                        .get(&process.pid)
                        .map_or(0.0, |(_, util)| f64::from(*util)),
                });
            }
        }
        Ok(processes)
    }
}

fn call<T>(call: &'static str, result: Result<T, NvmlError>) -> Result<T, GpuError> {
    result.map_err(|source| GpuError::Nvml { call, source })
}

/// `None` for a figure this GPU or driver does not provide.
fn optional<T>(call: &'static str, result: Result<T, NvmlError>) -> Result<Option<T>, GpuError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_) | NvmlError::NoData) => {
            Ok(None)
        }
        Err(source) => Err(GpuError::Nvml { call, source }),
    }
}

/// Like [`optional`], also reading NotFound and InvalidArg (a link number
/// past the GPU's links, no samples buffered) as absent.
fn absent_is_none<T>(
    call: &'static str,
    result: Result<T, NvmlError>,
) -> Result<Option<T>, GpuError> {
    match result {
        Err(NvmlError::NotFound | NvmlError::InvalidArg) => Ok(None),
        other => optional(call, other),
    }
}

/// The GPU and compute instance ids of a MIG device. nvml-wrapper 0.13 binds
/// these calls but offers no safe method, so they are called through its
/// loaded symbol table.
#[allow(unsafe_code)]
fn instance_ids(nvml: &Nvml, mig: &Device<'_>) -> Result<(u32, u32), GpuError> {
    let symbol = |call: &'static str, err: String| GpuError::Nvml {
        call,
        source: NvmlError::FailedToLoadSymbol(err),
    };
    let lib = nvml.lib();
    let gi_call = lib
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .map_err(|err| symbol("nvmlDeviceGetGpuInstanceId", err.to_string()))?;
    let ci_call = lib
        .nvmlDeviceGetComputeInstanceId
        .as_ref()
        .map_err(|err| symbol("nvmlDeviceGetComputeInstanceId", err.to_string()))?;
    let (mut gi, mut ci) = (0u32, 0u32);
    // SAFETY: `mig` is a live MIG device handle from this `nvml`, whose
    // library stays loaded while `nvml` lives; both out pointers are valid.
    let (gi_rc, ci_rc) = unsafe {
        (
            gi_call(mig.handle(), &mut gi),
            ci_call(mig.handle(), &mut ci),
        )
    };
    call("nvmlDeviceGetGpuInstanceId", nvml_try(gi_rc))?;
    call("nvmlDeviceGetComputeInstanceId", nvml_try(ci_rc))?;
    Ok((gi, ci))
}

/// MIG capability minors (`/proc/driver/nvidia-caps/mig-minors`) and the
/// `nvidia-caps` character major from `/proc/devices`.
struct MigCaps {
    major: u32,
    minors: HashMap<String, u32>,
}

impl MigCaps {
    fn read() -> Result<Self, GpuError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| GpuError::Read {
                path: PathBuf::from(path),
                source,
            })
        };
        let devices = read("/proc/devices")?;
        let major = devices
            .lines()
            .filter_map(|line| line.trim().split_once(' '))
            .find(|(_, name)| name.trim() == "nvidia-caps")
            .and_then(|(major, _)| major.parse().ok())
            .ok_or_else(|| GpuError::Read {
                path: PathBuf::from("/proc/devices"),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no nvidia-caps entry: load the driver with MIG support (nvidia-modprobe -f)",
                ),
            })?;
        let minors = read(MIG_MINORS)?
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter_map(|(name, minor)| Some((name.to_owned(), minor.trim().parse().ok()?)))
            .collect();
        Ok(MigCaps { major, minors })
    }

    fn node(&self, name: &str) -> Result<ControlDevice, GpuError> {
        let minor = self
            .minors
            .get(name)
            .copied()
            .ok_or_else(|| GpuError::Read {
                path: PathBuf::from(MIG_MINORS),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no entry {name}: the driver did not publish this MIG capability"),
                ),
            })?;
        Ok(ControlDevice {
            path: PathBuf::from(format!("/dev/nvidia-caps/nvidia-cap{minor}")),
            major: self.major,
            minor,
        })
    }
}

/// The NUMA node sysfs gives a PCI device; NVML prints the bus id with an
/// 8-digit domain (`00000000:07:00.0`), sysfs with 4 (`0000:07:00.0`).
fn sysfs_numa_node(bus_id: &str) -> Option<u32> {
    let (domain, rest) = bus_id.split_once(':')?;
    let domain = &domain[domain.len().saturating_sub(4)..];
    let path = format!(
        "/sys/bus/pci/devices/{}:{}/numa_node",
        domain.to_ascii_lowercase(),
        rest.to_ascii_lowercase()
    );
    // -1 means the platform has no NUMA information.
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_numa_lookup_tolerates_missing_devices() {
        assert_eq!(sysfs_numa_node("00000000:FF:1F.7"), None);
        assert_eq!(sysfs_numa_node("garbage"), None);
    }
}
