//! The NVML backend. Without `BUTTE_NVML_REQUIRED` on a host with no NVIDIA
//! driver, `open("nvml")` must answer "no GPUs" rather than fail; with
//! `BUTTE_NVML_REQUIRED=1` (scripts/check-on-device) a GPU must be found and
//! described consistently, so these tests cannot pass vacuously there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;

use butte_gpu::{GpuBackend, open};

fn required() -> bool {
    std::env::var_os("BUTTE_NVML_REQUIRED").is_some_and(|v| v != "0" && !v.is_empty())
}

fn driver_present() -> bool {
    Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia/version").exists()
}

fn backend() -> Option<Box<dyn GpuBackend>> {
    let backend = open("nvml").unwrap_or_else(|err| panic!("open(\"nvml\") failed: {err}"));
    if required() {
        assert!(
            backend.is_some(),
            "BUTTE_NVML_REQUIRED is set but NVML found no driver"
        );
    }
    backend
}

#[test]
fn no_driver_means_no_gpus_not_an_error() {
    let backend = backend();
    if !required() && !driver_present() {
        assert!(
            backend.is_none(),
            "no NVIDIA driver here, yet open(\"nvml\") returned a backend"
        );
    }
}

#[test]
fn inventory_lists_gpus_with_unique_uuids_and_a_symmetric_matrix() {
    let Some(backend) = backend() else { return };
    assert_eq!(backend.name(), "nvml");
    let inv = backend.inventory().unwrap();
    if required() {
        assert!(!inv.gpus.is_empty(), "NVML reports no GPUs");
    }
    let uuids: HashSet<&str> = inv.gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert_eq!(uuids.len(), inv.gpus.len(), "uuids repeat: {:?}", inv.gpus);
    for gpu in &inv.gpus {
        assert!(!gpu.uuid.is_empty(), "GPU {} has no uuid", gpu.index);
        assert!(gpu.memory_mib > 0, "GPU {} reports no memory", gpu.index);
        assert_eq!(gpu.major, 195);
        assert_eq!(gpu.device, Path::new(&format!("/dev/nvidia{}", gpu.minor)));
    }
    let n = inv.gpus.len();
    assert_eq!(inv.links.len(), n);
    for (i, row) in inv.links.iter().enumerate() {
        assert_eq!(row.len(), n, "row {i} of the link matrix");
        assert_eq!(row[i], None, "diagonal {i}");
        for (j, link) in row.iter().enumerate() {
            if i != j {
                assert!(link.is_some(), "no link between {i} and {j}");
                assert_eq!(*link, inv.links[j][i], "links {i}-{j} and {j}-{i} differ");
            }
        }
    }
    println!("{}", inv.topology_table());
}

#[test]
fn samples_cover_every_gpu_and_processes_name_known_gpus() {
    let Some(backend) = backend() else { return };
    let inv = backend.inventory().unwrap();
    let samples = backend.samples().unwrap();
    let sampled: Vec<u32> = samples.iter().map(|s| s.index).collect();
    let listed: Vec<u32> = inv.gpus.iter().map(|g| g.index).collect();
    assert_eq!(sampled, listed);
    for sample in &samples {
        assert!(
            (0.0..=100.0).contains(&sample.utilization_percent),
            "{sample:?}"
        );
        println!("{sample:?} fault={:?}", sample.fault());
    }
    for process in backend.processes().unwrap() {
        assert!(listed.contains(&process.gpu_index), "{process:?}");
    }
}
