//! Live figures of a GPU and of the processes on it.

use serde::{Deserialize, Serialize};

/// XIDs that mean the GPU itself is unhealthy (not that one program crashed),
/// after NVIDIA's XID catalogue: the GPU should be drained and reset.
///
/// - 48: double-bit ECC error
/// - 63: ECC page retirement or row-remapping recorded (reset pending)
/// - 64: ECC page retirement or row-remapping failed
/// - 74: NVLink error
/// - 79: GPU has fallen off the bus
/// - 94: contained ECC error
/// - 95: uncontained ECC error
///
/// Application faults such as 13 (graphics engine exception), 31 (memory page
/// fault) or 43 (GPU stopped processing) are not listed: they end a task, not a GPU.
pub const CRITICAL_XIDS: [u32; 7] = [48, 63, 64, 74, 79, 94, 95];

/// One reading of a GPU.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub utilization_percent: f64,
    pub memory_used_mib: u64,
    pub power_watts: f64,
    pub temperature_c: f64,
    /// Volatile (since driver load) uncorrectable ECC errors.
    pub ecc_uncorrectable: u64,
    /// XIDs seen, oldest first.
    pub xid_errors: Vec<u32>,
}

impl GpuSample {
    /// Why this GPU should not be given to tasks, or `None` when healthy:
    /// any uncorrectable ECC error, or any XID in [`CRITICAL_XIDS`].
    pub fn fault(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if self.ecc_uncorrectable > 0 {
            reasons.push(format!(
                "{} uncorrectable ECC error(s)",
                self.ecc_uncorrectable
            ));
        }
        let critical: Vec<String> = self
            .xid_errors
            .iter()
            .filter(|xid| CRITICAL_XIDS.contains(xid))
            .map(|xid| xid.to_string())
            .collect();
        if !critical.is_empty() {
            reasons.push(format!("critical XID {}", critical.join(", ")));
        }
        if reasons.is_empty() {
            None
        } else {
            Some(format!(
                "GPU {}: {}; drain it and reset it (nvidia-smi -r) or replace it",
                self.index,
                reasons.join("; ")
            ))
        }
    }
}

/// A process using a GPU, as NVML's per-process queries report it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub gpu_index: u32,
    pub memory_used_mib: u64,
    pub sm_utilization_percent: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_gpu_has_no_fault() {
        let sample = GpuSample {
            index: 2,
            xid_errors: vec![13, 31, 43],
            ..GpuSample::default()
        };
        assert_eq!(sample.fault(), None);
    }

    #[test]
    fn uncorrectable_ecc_and_critical_xids_are_faults() {
        let sample = GpuSample {
            index: 3,
            ecc_uncorrectable: 2,
            xid_errors: vec![13, 79],
            ..GpuSample::default()
        };
        let fault = sample.fault().unwrap();
        assert!(
            fault.starts_with("GPU 3: 2 uncorrectable ECC error(s); critical XID 79"),
            "{fault}"
        );
        for xid in CRITICAL_XIDS {
            let sample = GpuSample {
                xid_errors: vec![xid],
                ..GpuSample::default()
            };
            assert!(sample.fault().is_some(), "XID {xid}");
        }
    }
}
