#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The simulated backend, driven through the same trait and `open` the agent
//! uses, on real character-device nodes made with mknod (these tests run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use butte_gpu::{GpuBackend, GpuError, Link, choose, open};
use serde_json::{Value, json};

const EXAMPLE: &str = include_str!("../examples/sim-8gpu-nvlink.json");

/// A temp dir with /dev/nvidia0..7, nvidiactl and nvidia-uvm(-tools) nodes,
/// and the example sim file pointed at them.
struct Node {
    dir: PathBuf,
    file: PathBuf,
}

impl Node {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("butte-gpu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let node = Node {
            file: dir.join("gpus.json"),
            dir,
        };
        for i in 0..8 {
            node.mknod(&format!("nvidia{i}"), 195, i);
        }
        node.mknod("nvidiactl", 195, 255);
        node.mknod("nvidia-uvm", 510, 0);
        node.mknod("nvidia-uvm-tools", 510, 1);
        let mut doc: Value = serde_json::from_str(EXAMPLE).unwrap();
        for (i, gpu) in doc["gpus"].as_array_mut().unwrap().iter_mut().enumerate() {
            gpu["device"] = json!(node.path(&format!("nvidia{i}")));
        }
        doc["control_devices"] = json!([
            node.path("nvidiactl"),
            node.path("nvidia-uvm"),
            node.path("nvidia-uvm-tools")
        ]);
        node.write(&doc);
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn mknod(&self, name: &str, major: u32, minor: u32) -> PathBuf {
        let path = self.path(name);
        let status = Command::new("mknod")
            .arg(&path)
            .arg("c")
            .arg(major.to_string())
            .arg(minor.to_string())
            .status()
            .unwrap_or_else(|err| panic!("cannot run mknod: {err}"));
        assert!(
            status.success(),
            "mknod {} c {major} {minor} failed (are we root?)",
            path.display()
        );
        path
    }

    fn doc(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.file).unwrap()).unwrap()
    }

    /// Rewrites the file atomically, as an operator should.
    fn write(&self, doc: &Value) {
        let tmp = self.dir.join("gpus.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn edit(&self, change: impl FnOnce(&mut Value)) {
        let mut doc = self.doc();
        change(&mut doc);
        self.write(&doc);
    }

    fn backend(&self) -> Box<dyn GpuBackend> {
        open(&format!("sim:{}", self.file.display()))
            .unwrap_or_else(|err| panic!("sim file should load: {err}"))
            .unwrap()
    }

    fn open_error(&self) -> String {
        match open(&format!("sim:{}", self.file.display())) {
            Ok(_) => panic!("sim file {} should have been refused", self.file.display()),
            Err(err) => err.to_string(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error should mention `{part}`: {err}");
    }
}

#[test]
fn example_file_describes_an_eight_gpu_nvlink_node() {
    let node = Node::new("example");
    let backend = node.backend();
    assert_eq!(backend.name(), "sim");
    let inv = backend.inventory().unwrap();
    assert_eq!(inv.gpus.len(), 8);
    for (i, gpu) in inv.gpus.iter().enumerate() {
        assert_eq!((gpu.major, gpu.minor), (195, u32::try_from(i).unwrap()));
        assert_eq!(gpu.numa_node, Some(if i < 4 { 0 } else { 1 }));
        assert!(gpu.mig.is_empty());
    }
    assert_eq!(inv.link(0, 1), Some(Link::NvLink(4)));
    assert_eq!(inv.link(6, 7), Some(Link::NvLink(4)));
    assert_eq!(inv.link(0, 2), Some(Link::PcieSwitch));
    assert_eq!(inv.link(0, 3), Some(Link::SameNuma));
    assert_eq!(inv.link(3, 4), Some(Link::CrossNuma));
    assert_eq!(inv.link(2, 2), None);
    let ctl: Vec<(u32, u32)> = inv
        .control_devices
        .iter()
        .map(|c| (c.major, c.minor))
        .collect();
    assert_eq!(ctl, vec![(195, 255), (510, 0), (510, 1)]);
    assert!(
        inv.topology_table()
            .contains("GPU0  X      NV4    PIX    NODE   SYS")
    );

    let samples = backend.samples().unwrap();
    assert_eq!(samples.len(), 8);
    assert!(samples.iter().all(|s| s.fault().is_none()));
    assert_eq!(samples[0].utilization_percent, 87.0);
    let processes = backend.processes().unwrap();
    assert_eq!(processes.len(), 1);
    assert_eq!((processes[0].pid, processes[0].gpu_index), (4242, 0));

    let pair = choose(&inv, &[1, 2, 3, 4, 5, 6, 7], 2).unwrap();
    assert!(
        matches!(inv.link(pair.gpus[0], pair.gpus[1]), Some(Link::NvLink(4))),
        "{pair:?}"
    );
}

#[test]
fn rewriting_the_file_marks_gpu_3_faulty_in_the_next_samples() {
    let node = Node::new("fault");
    let backend = node.backend();
    assert!(backend.samples().unwrap()[3].fault().is_none());

    node.edit(|doc| doc["gpus"][3]["ecc_uncorrectable"] = json!(2));
    let samples = backend.samples().unwrap();
    let fault = samples[3].fault().expect("GPU 3 should be faulty");
    assert_mentions(&fault, &["GPU 3", "2 uncorrectable ECC"]);
    assert!(
        samples
            .iter()
            .filter(|s| s.index != 3)
            .all(|s| s.fault().is_none())
    );

    node.edit(|doc| doc["gpus"][5]["xid_errors"] = json!([13, 79]));
    let fault = backend.samples().unwrap()[5]
        .fault()
        .expect("XID 79 is a fault");
    assert_mentions(&fault, &["GPU 5", "critical XID 79"]);
}

#[test]
fn rewriting_the_file_adds_a_process() {
    let node = Node::new("process");
    let backend = node.backend();
    node.edit(|doc| {
        doc["processes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"pid": 777, "gpu": 6, "memory_used_mib": 2048, "sm_utilization": 40.5}))
    });
    let processes = backend.processes().unwrap();
    let added = processes
        .iter()
        .find(|p| p.pid == 777)
        .expect("pid 777 listed");
    assert_eq!(added.gpu_index, 6);
    assert_eq!(added.memory_used_mib, 2048);
    assert_eq!(added.sm_utilization_percent, 40.5);
}

#[test]
fn a_broken_rewrite_is_reported_and_a_fixed_one_recovers() {
    let node = Node::new("recover");
    let backend = node.backend();
    let good = node.doc();
    std::fs::write(&node.file, b"{\"gpus\": [").unwrap();
    let err = backend.inventory().unwrap_err().to_string();
    assert_mentions(&err, &[&node.file.display().to_string(), "EOF"]);
    node.write(&good);
    assert_eq!(backend.inventory().unwrap().gpus.len(), 8);
}

#[test]
fn an_asymmetric_matrix_names_the_row_and_column() {
    let node = Node::new("asym");
    node.edit(|doc| doc["topology"][2][5] = json!("PIX"));
    assert_mentions(
        &node.open_error(),
        &[
            &node.file.display().to_string(),
            "topology",
            "row 2 column 5 is PIX but row 5 column 2 is SYS",
        ],
    );
}

#[test]
fn a_matrix_of_the_wrong_size_or_diagonal_is_refused() {
    let node = Node::new("size");
    node.edit(|doc| {
        doc["topology"].as_array_mut().unwrap().pop();
    });
    assert_mentions(
        &node.open_error(),
        &["topology", "has 7 rows but there are 8 GPUs"],
    );
    node.edit(|doc| {
        doc["topology"]
            .as_array_mut()
            .unwrap()
            .push(json!(["SYS", "SYS", "SYS", "SYS", "NODE", "PIX", "NV4"]))
    });
    assert_mentions(
        &node.open_error(),
        &["row 7 has 7 entries but there are 8 GPUs"],
    );
    let node = Node::new("diag");
    node.edit(|doc| doc["topology"][4][4] = json!("NV4"));
    assert_mentions(
        &node.open_error(),
        &["row 4 column 4 is `NV4`", "must be \"X\""],
    );
    node.edit(|doc| {
        doc["topology"][4][4] = json!("X");
        doc["topology"][1][0] = json!("NV-4");
        doc["topology"][0][1] = json!("NV-4");
    });
    assert_mentions(
        &node.open_error(),
        &["row 0 column 1", "`NV-4` is not a link"],
    );
}

#[test]
fn a_missing_field_names_the_gpu_and_the_field() {
    let node = Node::new("missing");
    node.edit(|doc| {
        doc["gpus"][2].as_object_mut().unwrap().remove("uuid");
    });
    assert_mentions(
        &node.open_error(),
        &[
            &node.file.display().to_string(),
            "gpus[2]",
            "missing field `uuid`",
        ],
    );
}

#[test]
fn a_misspelt_field_is_refused_not_ignored() {
    let node = Node::new("typo");
    node.edit(|doc| doc["gpus"][1]["numa"] = json!(0));
    assert_mentions(&node.open_error(), &["gpus[1]", "unknown field `numa`"]);
}

#[test]
fn a_device_that_is_not_a_char_node_is_refused() {
    let node = Node::new("notchar");
    let plain = node.path("plain-file");
    std::fs::write(&plain, b"").unwrap();
    node.edit(|doc| doc["gpus"][4]["device"] = json!(plain));
    assert_mentions(
        &node.open_error(),
        &["gpus[4].device", "is not a character device"],
    );
    node.edit(|doc| doc["gpus"][4]["device"] = json!(node.path("nvidia-missing")));
    assert_mentions(
        &node.open_error(),
        &["gpus[4].device", "failed to stat device node", "mknod"],
    );
    node.edit(|doc| {
        doc["gpus"][4]["device"] = json!(node.path("nvidia4"));
        doc["control_devices"] = json!([plain]);
    });
    assert_mentions(
        &node.open_error(),
        &["control_devices[0]", "is not a character device"],
    );
}

#[test]
fn a_process_on_an_unknown_gpu_or_duplicate_gpus_are_refused() {
    let node = Node::new("badproc");
    node.edit(|doc| doc["processes"] = json!([{"pid": 1, "gpu": 9}]));
    assert_mentions(
        &node.open_error(),
        &["processes[0].gpu", "no GPU has index 9"],
    );
    node.edit(|doc| {
        doc["processes"] = json!([]);
        doc["gpus"][7]["index"] = json!(0);
    });
    assert_mentions(
        &node.open_error(),
        &["gpus[7].index", "index 0 appears twice"],
    );
    let node = Node::new("dupuuid");
    node.edit(|doc| doc["gpus"][7]["uuid"] = doc["gpus"][0]["uuid"].clone());
    assert_mentions(&node.open_error(), &["gpus[7].uuid", "unique uuid"]);
    node.edit(|doc| {
        doc["gpus"][7]["uuid"] = json!("GPU-7");
        doc["gpus"][7]["utilization_percent"] = json!(140);
    });
    assert_mentions(
        &node.open_error(),
        &["gpus[7].utilization_percent", "outside 0..=100"],
    );
}

#[test]
fn a_minimal_single_gpu_file_defaults_to_healthy_and_idle() {
    let node = Node::new("minimal");
    node.write(&json!({
        "gpus": [{
            "index": 0,
            "uuid": "GPU-only",
            "model": "NVIDIA L4",
            "memory_mib": 23034,
            "pci_bus_id": "00000000:01:00.0",
            "device": node.path("nvidia0"),
        }]
    }));
    let backend = node.backend();
    let inv = backend.inventory().unwrap();
    assert_eq!(inv.gpus[0].numa_node, None);
    assert!(inv.control_devices.is_empty());
    let sample = &backend.samples().unwrap()[0];
    assert_eq!(
        (sample.utilization_percent, sample.ecc_uncorrectable),
        (0.0, 0)
    );
    assert!(sample.fault().is_none());
    assert!(backend.processes().unwrap().is_empty());
    assert_eq!(choose(&inv, &[0], 1).unwrap().interconnect, "single");
}

#[test]
fn a_two_gpu_file_without_topology_is_refused() {
    let node = Node::new("notopo");
    node.edit(|doc| {
        let gpus = doc["gpus"].as_array_mut().unwrap();
        gpus.truncate(2);
        doc.as_object_mut().unwrap().remove("topology");
        doc["processes"] = json!([]);
    });
    assert_mentions(&node.open_error(), &["topology", "missing"]);
}

#[test]
fn mig_instances_carry_their_capability_nodes() {
    let node = Node::new("mig");
    let ci_a = node.mknod("nvidia-cap22", 511, 22);
    let gi_a = node.mknod("nvidia-cap21", 511, 21);
    let ci_b = node.mknod("nvidia-cap31", 511, 31);
    let gi_b = node.mknod("nvidia-cap30", 511, 30);
    node.edit(|doc| {
        doc["gpus"][7]["mig"] = json!([
            {"profile": "3g.40gb", "uuid": "MIG-aaaa", "gi_id": 2, "ci_id": 0, "device": ci_a, "gi_device": gi_a},
            {"profile": "3g.40gb", "uuid": "MIG-bbbb", "gi_id": 3, "ci_id": 0, "device": ci_b, "gi_device": gi_b},
        ]);
    });
    assert_mentions(&node.open_error(), &["gpus[7].mig", "mig_enabled is false"]);
    node.edit(|doc| doc["gpus"][7]["mig_enabled"] = json!(true));
    let inv = node.backend().inventory().unwrap();
    let mig = &inv.gpus[7].mig;
    assert_eq!(mig.len(), 2);
    assert_eq!(
        (mig[0].gpu_index, mig[0].gi_id, mig[0].major, mig[0].minor),
        (7, 2, 511, 22)
    );
    assert_eq!(mig[1].gi_device.as_ref().map(|d| d.minor), Some(30));
    assert_eq!(mig[1].profile, "3g.40gb");
}

#[test]
fn a_missing_file_names_the_path_and_the_flag() {
    let path = Path::new("/nonexistent/butte/gpus.json");
    let err = open(&format!("sim:{}", path.display())).err().unwrap();
    assert!(matches!(err, GpuError::SimRead { .. }), "{err}");
    assert_mentions(
        &err.to_string(),
        &["/nonexistent/butte/gpus.json", "--gpu-backend sim:FILE"],
    );
}
