//! The simulated backend: a JSON file that describes GPUs the way NVML
//! reports them, re-read on every call so that editing it acts like live NVML.
//! The format is documented in `gpu/README.md`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::GpuBackend;
use crate::error::GpuError;
use crate::inventory::{ControlDevice, Gpu, Inventory, MigInstance, char_device};
use crate::sample::{GpuProcess, GpuSample};
use crate::topology::parse_matrix;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimFile {
    gpus: Vec<Value>,
    #[serde(default)]
    topology: Option<Vec<Vec<String>>>,
    #[serde(default)]
    control_devices: Vec<PathBuf>,
    #[serde(default)]
    processes: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimGpu {
    index: u32,
    uuid: String,
    model: String,
    memory_mib: u64,
    #[serde(default)]
    numa_node: Option<u32>,
    pci_bus_id: String,
    device: PathBuf,
    #[serde(default)]
    mig_enabled: bool,
    #[serde(default)]
    mig: Vec<Value>,
    #[serde(default)]
    utilization_percent: f64,
    #[serde(default)]
    memory_used_mib: u64,
    #[serde(default)]
    power_watts: f64,
    #[serde(default)]
    temperature_c: f64,
    #[serde(default)]
    ecc_uncorrectable: u64,
    #[serde(default)]
    xid_errors: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimMig {
    profile: String,
    uuid: String,
    gi_id: u32,
    ci_id: u32,
    device: PathBuf,
    #[serde(default)]
    gi_device: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimProcess {
    pid: u32,
    gpu: u32,
    #[serde(default)]
    memory_used_mib: u64,
    #[serde(default)]
    sm_utilization: f64,
}

/// What one version of the file says.
struct Snapshot {
    inventory: Inventory,
    samples: Vec<GpuSample>,
    processes: Vec<GpuProcess>,
}

/// The backend for `--gpu-backend sim:FILE`.
pub struct SimBackend {
    path: PathBuf,
    /// The bytes last parsed and what they said. The content, not the mtime,
    /// decides a re-parse: file times tick once per jiffy, too coarse for
    /// two quick edits of equal size.
    cache: Mutex<Option<(Vec<u8>, Arc<Snapshot>)>>,
}

impl SimBackend {
    /// Opens and validates the file now, so that a bad file fails at start-up.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, GpuError> {
        let backend = SimBackend {
            path: path.into(),
            cache: Mutex::new(None),
        };
        backend.snapshot()?;
        Ok(backend)
    }

    /// Parses a sim file's bytes as `open` would, without a file (the fuzz
    /// target's entry point).
    pub fn validate(bytes: &[u8]) -> Result<(), GpuError> {
        let backend = SimBackend {
            path: PathBuf::from("(bytes)"),
            cache: Mutex::new(None),
        };
        backend.parse(bytes).map(|_| ())
    }

    /// The file this backend reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, GpuError> {
        let bytes = std::fs::read(&self.path).map_err(|source| GpuError::SimRead {
            path: self.path.clone(),
            source,
        })?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, snapshot)) = cache.as_ref()
            && *cached == bytes
        {
            return Ok(Arc::clone(snapshot));
        }
        let snapshot = Arc::new(self.parse(&bytes)?);
        tracing::debug!(path = %self.path.display(), gpus = snapshot.inventory.gpus.len(), "GPU sim file loaded");
        *cache = Some((bytes, Arc::clone(&snapshot)));
        Ok(snapshot)
    }

    fn invalid(&self, field: impl Into<String>, problem: impl Into<String>) -> GpuError {
        GpuError::SimInvalid {
            path: self.path.clone(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn field<T: DeserializeOwned>(&self, field: &str, value: Value) -> Result<T, GpuError> {
        serde_json::from_value(value)
            .map_err(|err| self.invalid(field, format!("{err}; see gpu/README.md for the format")))
    }

    fn device(&self, field: &str, path: &Path) -> Result<(u32, u32), GpuError> {
        char_device(path).map_err(|err| self.invalid(field, err.to_string()))
    }

    fn parse(&self, bytes: &[u8]) -> Result<Snapshot, GpuError> {
        let file: SimFile = serde_json::from_slice(bytes).map_err(|err| {
            self.invalid(
                "(file)",
                format!("{err}; the file must be a JSON object with `gpus`, `topology`, `control_devices` and `processes` (see gpu/README.md)"),
            )
        })?;
        let mut gpus = Vec::with_capacity(file.gpus.len());
        let mut samples = Vec::with_capacity(file.gpus.len());
        let mut indices = HashSet::new();
        let mut uuids = HashSet::new();
        for (i, value) in file.gpus.into_iter().enumerate() {
            let at = format!("gpus[{i}]");
            let sim: SimGpu = self.field(&at, value)?;
            if !indices.insert(sim.index) {
                return Err(self.invalid(
                    format!("{at}.index"),
                    format!(
                        "index {} appears twice: give each GPU its own index",
                        sim.index
                    ),
                ));
            }
            if sim.uuid.trim().is_empty() || !uuids.insert(sim.uuid.clone()) {
                return Err(self.invalid(
                    format!("{at}.uuid"),
                    format!("`{}` is empty or used twice: give each GPU a unique uuid such as GPU-<hex>", sim.uuid),
                ));
            }
            let (gpu, sample) = self.gpu(&at, sim)?;
            gpus.push(gpu);
            samples.push(sample);
        }
        let rows = match file.topology {
            Some(rows) => rows,
            None if gpus.len() <= 1 => gpus.iter().map(|_| vec!["X".to_owned()]).collect(),
            None => {
                return Err(self.invalid(
                    "topology",
                    "missing: give the GPU link matrix as `nvidia-smi topo -m` prints it, one row per GPU",
                ));
            }
        };
        let links = parse_matrix(&rows, gpus.len())
            .map_err(|err| self.invalid("topology", err.to_string()))?;
        let control_devices = file
            .control_devices
            .iter()
            .enumerate()
            .map(|(i, path)| {
                ControlDevice::stat(path)
                    .map_err(|err| self.invalid(format!("control_devices[{i}]"), err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let processes = file
            .processes
            .into_iter()
            .enumerate()
            .map(|(i, value)| self.process(&format!("processes[{i}]"), value, &indices))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            inventory: Inventory {
                gpus,
                links,
                control_devices,
            },
            samples,
            processes,
        })
    }

    /// One GPU of the file (at `at`), its figures checked and its device nodes read.
    fn gpu(&self, at: &str, sim: SimGpu) -> Result<(Gpu, GpuSample), GpuError> {
        if !(0.0..=100.0).contains(&sim.utilization_percent) {
            return Err(self.invalid(
                format!("{at}.utilization_percent"),
                format!("{} is outside 0..=100", sim.utilization_percent),
            ));
        }
        for (name, value) in [
            ("power_watts", sim.power_watts),
            ("temperature_c", sim.temperature_c),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(self.invalid(
                    format!("{at}.{name}"),
                    format!("{value} is not a finite number >= 0"),
                ));
            }
        }
        if !sim.mig.is_empty() && !sim.mig_enabled {
            return Err(self.invalid(
                format!("{at}.mig"),
                "instances are listed but mig_enabled is false: set \"mig_enabled\": true or remove them",
            ));
        }
        let (major, minor) = self.device(&format!("{at}.device"), &sim.device)?;
        let mig = sim
            .mig
            .into_iter()
            .enumerate()
            .map(|(j, value)| self.mig(&format!("{at}.mig[{j}]"), sim.index, value))
            .collect::<Result<Vec<_>, _>>()?;
        let sample = GpuSample {
            index: sim.index,
            utilization_percent: sim.utilization_percent,
            memory_used_mib: sim.memory_used_mib,
            power_watts: sim.power_watts,
            temperature_c: sim.temperature_c,
            ecc_uncorrectable: sim.ecc_uncorrectable,
            xid_errors: sim.xid_errors,
        };
        let gpu = Gpu {
            index: sim.index,
            uuid: sim.uuid,
            model: sim.model,
            memory_mib: sim.memory_mib,
            numa_node: sim.numa_node,
            pci_bus_id: sim.pci_bus_id,
            device: sim.device,
            major,
            minor,
            mig,
        };
        Ok((gpu, sample))
    }

    /// One MIG instance of GPU `gpu_index` (at `at`), with its device nodes read.
    fn mig(&self, at: &str, gpu_index: u32, value: Value) -> Result<MigInstance, GpuError> {
        let inst: SimMig = self.field(at, value)?;
        let (major, minor) = self.device(&format!("{at}.device"), &inst.device)?;
        let gi_device = match inst.gi_device {
            Some(path) => Some(
                ControlDevice::stat(&path)
                    .map_err(|err| self.invalid(format!("{at}.gi_device"), err.to_string()))?,
            ),
            None => None,
        };
        Ok(MigInstance {
            gpu_index,
            profile: inst.profile,
            uuid: inst.uuid,
            gi_id: inst.gi_id,
            ci_id: inst.ci_id,
            device: inst.device,
            major,
            minor,
            gi_device,
        })
    }

    /// One process on a GPU (at `at`), which must be one of `indices`.
    fn process(
        &self,
        at: &str,
        value: Value,
        indices: &HashSet<u32>,
    ) -> Result<GpuProcess, GpuError> {
        let sim: SimProcess = self.field(at, value)?;
        if !indices.contains(&sim.gpu) {
            return Err(self.invalid(
                format!("{at}.gpu"),
                format!(
                    "no GPU has index {}: use the index of one of `gpus`",
                    sim.gpu
                ),
            ));
        }
        if !(0.0..=100.0).contains(&sim.sm_utilization) {
            return Err(self.invalid(
                format!("{at}.sm_utilization"),
                format!("{} is outside 0..=100", sim.sm_utilization),
            ));
        }
        Ok(GpuProcess {
            pid: sim.pid,
            gpu_index: sim.gpu,
            memory_used_mib: sim.memory_used_mib,
            sm_utilization_percent: sim.sm_utilization,
        })
    }
}

impl GpuBackend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn inventory(&self) -> Result<Inventory, GpuError> {
        Ok(self.snapshot()?.inventory.clone())
    }

    fn samples(&self) -> Result<Vec<GpuSample>, GpuError> {
        Ok(self.snapshot()?.samples.clone())
    }

    fn processes(&self) -> Result<Vec<GpuProcess>, GpuError> {
        Ok(self.snapshot()?.processes.clone())
    }
}
