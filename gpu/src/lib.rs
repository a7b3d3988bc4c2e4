//! GPU discovery, topology, placement and telemetry for Butte's agent.
//!
//! One trait, [`GpuBackend`], over NVML (real GPUs) and a simulated backend
//! (a JSON file, for machines without GPUs); the agent picks one with
//! `--gpu-backend nvml|sim:FILE|none` through [`open`].

mod error;
pub mod inventory;
pub mod nvml;
pub mod placement;
pub mod sample;
pub mod sim;
pub mod topology;

pub use error::GpuError;
pub use inventory::{ControlDevice, Gpu, Inventory, MigInstance};
pub use placement::{Choice, choose};
pub use sample::{CRITICAL_XIDS, GpuProcess, GpuSample};
pub use topology::Link;

/// A source of GPU facts: what is installed, how it is doing, who uses it.
pub trait GpuBackend: Send + Sync {
    /// `nvml` or `sim`.
    fn name(&self) -> &'static str;
    /// The GPUs, their links and the control device nodes.
    fn inventory(&self) -> Result<Inventory, GpuError>;
    /// One reading per GPU, in inventory order.
    fn samples(&self) -> Result<Vec<GpuSample>, GpuError>;
    /// The processes using GPUs now.
    fn processes(&self) -> Result<Vec<GpuProcess>, GpuError>;
}

/// Opens the backend named by the agent's `--gpu-backend` value: `none` and
/// `nvml` on a host without an NVIDIA driver give `Ok(None)` (no GPUs);
/// `sim:FILE` reads and validates FILE now.
pub fn open(spec: &str) -> Result<Option<Box<dyn GpuBackend>>, GpuError> {
    match spec.trim() {
        "none" => Ok(None),
        "nvml" => Ok(nvml::NvmlBackend::open()?.map(|b| Box::new(b) as Box<dyn GpuBackend>)),
        other => match other.strip_prefix("sim:") {
            Some(path) if !path.is_empty() => Ok(Some(Box::new(sim::SimBackend::open(path)?))),
            _ => Err(GpuError::BadSpec {
                spec: spec.to_owned(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_means_no_backend_and_bad_specs_name_the_accepted_forms() {
        assert!(open("none").unwrap().is_none());
        for bad in ["", "sim:", "cuda", "NVML", "sim"] {
            let err = open(bad).err().unwrap().to_string();
            assert!(err.contains("use `nvml`, `sim:FILE`"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_sim_file_is_an_error_naming_it() {
        let err = open("sim:/nonexistent/gpus.json")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/gpus.json"), "{err}");
    }
}
