//! GPUs on a real master and agent, from the simulated backend
//! (`--gpu-backend sim:FILE`) over device nodes without a driver, and a real
//! Mesos client library (mesoshttp) as the framework: only GPU-aware
//! frameworks get `gpus`, tasks get NVLink-connected sets and can open only
//! their own GPUs, a faulty GPU leaves the offers, and a task's GPU memory
//! comes from the backend's process figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Lines, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::cluster::{Cluster, http_get, wait_for};

/// The NVLink bridges of `gpu/examples/sim-8gpu-nvlink.json` (4 links each).
const NVLINK_PAIRS: [[u32; 2]; 4] = [[0, 1], [2, 3], [4, 5], [6, 7]];

/// Eight fake GPUs: NVIDIA device nodes (major 195) under a fresh directory
/// of /dev, which tasks see, and the sim file describing them, rewritten
/// atomically on each edit. Both go when dropped, after a failure too.
struct FakeGpus {
    dev_dir: PathBuf,
    sim_dir: PathBuf,
    spec: Value,
}

impl FakeGpus {
    /// The example 8-GPU NVLink node, its devices replaced by our nodes and
    /// its busy process removed.
    fn create(name: &str) -> FakeGpus {
        let dev_dir = PathBuf::from(format!("/dev/butte-kt-gpu-{name}-{}", std::process::id()));
        let sim_dir = PathBuf::from(format!(
            "/var/lib/butte-kernel-tests/gpu-sim-{name}-{}",
            std::process::id()
        ));
        for dir in [&dev_dir, &sim_dir] {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).unwrap();
        }
        let example =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gpu/examples/sim-8gpu-nvlink.json");
        let mut spec: Value =
            serde_json::from_str(&std::fs::read_to_string(&example).unwrap()).unwrap();
        let mut gpus = FakeGpus {
            dev_dir,
            sim_dir,
            spec: Value::Null,
        };
        for (index, gpu) in spec["gpus"].as_array_mut().unwrap().iter_mut().enumerate() {
            gpu["device"] = json!(gpus.node(&format!("nvidia{index}"), index as u32));
        }
        spec["control_devices"] = json!([gpus.node("nvidiactl", 255)]);
        spec["processes"] = json!([]);
        gpus.spec = spec;
        gpus.write();
        gpus
    }

    /// `mknod DIR/NAME c 195 MINOR`; with no driver, opening it on the host is ENXIO.
    fn node(&self, name: &str, minor: u32) -> String {
        let path = self.dev_dir.join(name);
        common::fake_nvidia_node(&path, minor);
        path.display().to_string()
    }

    fn sim_file(&self) -> PathBuf {
        self.sim_dir.join("sim.json")
    }

    /// The agent's `--gpu-backend`.
    fn backend(&self) -> String {
        format!("sim:{}", self.sim_file().display())
    }

    fn uuid(&self, index: u32) -> String {
        self.spec["gpus"][index as usize]["uuid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn numa_node(&self, index: u32) -> u64 {
        self.spec["gpus"][index as usize]["numa_node"]
            .as_u64()
            .unwrap()
    }

    /// Changes the file the way live NVML figures change: the backend re-reads it.
    fn edit(&mut self, change: impl FnOnce(&mut Value)) {
        change(&mut self.spec);
        self.write();
    }

    fn write(&self) {
        // A rename, so the agent never reads a half-written file.
        let partial = self.sim_dir.join("sim.json.partial");
        std::fs::write(&partial, serde_json::to_string_pretty(&self.spec).unwrap()).unwrap();
        std::fs::rename(&partial, self.sim_file()).unwrap();
    }
}

impl Drop for FakeGpus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dev_dir);
        let _ = std::fs::remove_dir_all(&self.sim_dir);
    }
}

/// `tests/gpu_framework.py` in one mode: its JSON facts as they come, and a
/// line on its stdin when it waits for the test.
struct Framework<'a> {
    cluster: &'a Cluster,
    mode: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    transcript: Vec<String>,
}

impl<'a> Framework<'a> {
    fn start(cluster: &'a Cluster, mode: &str, args: &[&str]) -> Framework<'a> {
        let stderr =
            std::fs::File::create(cluster.dir.join(format!("framework-{mode}.err"))).unwrap();
        let mut child = cluster
            .framework("gpu_framework.py", mode, 90)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Framework {
            cluster,
            mode: mode.to_owned(),
            child,
            stdin,
            stdout,
            transcript: Vec::new(),
        }
    }

    /// The framework's next fact that has `key`; it must not end first.
    fn until(&mut self, key: &str) -> Value {
        for line in self.stdout.by_ref() {
            let line = line.unwrap();
            self.transcript.push(line.clone());
            if let Ok(fact) = serde_json::from_str::<Value>(&line)
                && fact.get(key).is_some()
            {
                return fact;
            }
        }
        panic!(
            "{}",
            self.failure(&format!("the framework ended before `{key}`"))
        );
    }

    /// Lets a waiting framework go on.
    fn answer(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Every fact the framework printed, once it exited 0.
    fn finish(mut self) -> Vec<Value> {
        self.stdin = None;
        for line in self.stdout.by_ref() {
            self.transcript.push(line.unwrap());
        }
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{}",
            self.failure(&format!("it exited {status}"))
        );
        println!("{}", self.transcript.join("\n"));
        self.transcript
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn failure(&self, why: &str) -> String {
        let stderr = std::fs::read_to_string(
            self.cluster
                .dir
                .join(format!("framework-{}.err", self.mode)),
        )
        .unwrap_or_default();
        format!(
            "framework ({}): {why}:\n{}\nstderr:\n{stderr}\nagent log (last lines, newest first):\n{}",
            self.mode,
            self.transcript.join("\n"),
            self.cluster.agent_log_tail(30)
        )
    }
}

impl Drop for Framework<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first fact with `key`, its value.
fn fact<'v>(facts: &'v [Value], key: &str) -> &'v Value {
    facts
        .iter()
        .find_map(|f| f.get(key))
        .unwrap_or_else(|| panic!("no `{key}` among the framework's facts: {facts:?}"))
}

/// Where in `facts` the status `state` of `task` is, and that status.
fn status<'v>(facts: &'v [Value], task: &str, state: &str) -> (usize, &'v Value) {
    facts
        .iter()
        .enumerate()
        .filter_map(|(at, f)| Some((at, f.get("status")?)))
        .find(|(_, s)| s["task"] == task && s["state"] == state)
        .unwrap_or_else(|| panic!("no {state} for {task} among: {facts:?}"))
}

/// The GPUs a task got, from its TASK_RUNNING labels.
fn gpu_indices(running: &Value) -> Vec<u32> {
    let indices = label(running, "butte.gpu.indices");
    indices
        .split(',')
        .map(|i| {
            i.trim()
                .parse()
                .unwrap_or_else(|_| panic!("indices {indices:?}"))
        })
        .collect()
}

fn label<'v>(running: &'v Value, key: &str) -> &'v str {
    running["labels"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} label: {running}"))
}

/// Whether `gpus` is made of whole NVLink pairs (and nothing else).
fn whole_nvlink_pairs(gpus: &[u32]) -> bool {
    let set: BTreeSet<u32> = gpus.iter().copied().collect();
    set.len() == gpus.len()
        && set.iter().all(|g| {
            NVLINK_PAIRS
                .iter()
                .any(|pair| pair.contains(g) && pair.iter().all(|p| set.contains(p)))
        })
}

fn disjoint(a: &[u32], b: &[u32]) -> bool {
    a.iter().all(|g| !b.contains(g))
}

/// The values of the Prometheus series `name` whose labels include all of `labels`.
fn series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (names, value) = rest.rsplit_once("} ")?;
            let wanted = labels
                .iter()
                .all(|(k, v)| names.split(',').any(|l| l == format!("{k}=\"{v}\"")));
            wanted.then(|| value.trim().parse().ok()).flatten()
        })
        .collect()
}

fn gpu_agent(name: &str, master_port: u16, agent_port: u16, gpus: &FakeGpus) -> Cluster {
    Cluster::start_with(
        name,
        master_port,
        agent_port,
        "cpus:8;mem:4096",
        &[
            "--gpu-backend",
            &gpus.backend(),
            "--telemetry-interval",
            "0.2",
        ],
    )
}

#[test]
fn gpu_frameworks_get_gpus_and_linked_pairs_and_other_gpus_are_fenced() {
    let gpus = FakeGpus::create("fenced");
    let cluster = gpu_agent("gpu-fenced", 15200, 15201, &gpus);
    let dev_dir = gpus.dev_dir.display().to_string();
    let facts = Framework::start(&cluster, "fenced", &[&dev_dir]).finish();

    let unaware = fact(&facts, "unaware_offers").as_array().unwrap();
    assert!(
        unaware.iter().all(|o| o["gpus"] == 0.0),
        "a framework without GPU_RESOURCES is offered no gpus: {unaware:?}"
    );

    let offer = fact(&facts, "offer");
    assert_eq!(offer["gpus"], 8.0, "all eight GPUs are offered: {offer}");
    let attributes = &offer["attributes"];
    assert_eq!(attributes["gpu_model"], "NVIDIA A100 80GB PCIe", "{offer}");
    assert_eq!(attributes["gpu_memory_mib"], 81920.0, "{offer}");
    assert_eq!(attributes["gpu_interconnect"], "NV4", "{offer}");

    let (_, running) = status(&facts, "fenced", "TASK_RUNNING");
    let chosen = gpu_indices(running);
    assert!(
        chosen.len() == 2 && whole_nvlink_pairs(&chosen),
        "gpus:2 is an NVLink pair: {running}"
    );
    let uuids: Vec<String> = chosen.iter().map(|&g| gpus.uuid(g)).collect();
    assert_eq!(
        label(running, "butte.gpu.uuids"),
        uuids.join(","),
        "{running}"
    );
    assert_eq!(label(running, "butte.gpu.interconnect"), "NV4", "{running}");
    assert_eq!(
        label(running, "butte.gpu.numa_node"),
        gpus.numa_node(chosen[0]).to_string(),
        "{running}"
    );

    // Its own GPUs and the control node reach the (absent) driver; the others are fenced.
    let sandbox = cluster.sandbox("fenced");
    let opens = std::fs::read_to_string(sandbox.join("opens")).unwrap();
    for gpu in 0..8u32 {
        let expected = if chosen.contains(&gpu) {
            "ENXIO"
        } else {
            "EPERM"
        };
        let line = format!("nvidia{gpu} {expected}");
        assert!(
            opens.lines().any(|l| l == line),
            "expected `{line}` in:\n{opens}"
        );
    }
    assert!(opens.lines().any(|l| l == "nvidiactl ENXIO"), "{opens}");

    // The environment names the same GPUs, in the same order for both lists.
    let env = std::fs::read_to_string(sandbox.join("gpu_env")).unwrap();
    let variable = |name: &str| -> Vec<String> {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in the task's environment:\n{env}"))
            .split(',')
            .map(str::to_owned)
            .collect()
    };
    let indices: Vec<u32> = variable("BUTTE_GPU_INDICES")
        .iter()
        .map(|i| i.parse().unwrap())
        .collect();
    assert_eq!(
        indices.iter().collect::<BTreeSet<_>>(),
        chosen.iter().collect::<BTreeSet<_>>(),
        "{env}"
    );
    let in_order: Vec<String> = indices.iter().map(|&g| gpus.uuid(g)).collect();
    assert_eq!(variable("NVIDIA_VISIBLE_DEVICES"), in_order, "{env}");
    assert_eq!(variable("CUDA_VISIBLE_DEVICES"), in_order, "{env}");
}

#[test]
fn two_four_gpu_tasks_get_disjoint_linked_sets_and_a_third_waits() {
    let gpus = FakeGpus::create("quads");
    let cluster = gpu_agent("gpu-quads", 15202, 15203, &gpus);
    let facts = Framework::start(&cluster, "quads", &[]).finish();

    let (_, a) = status(&facts, "quad-a", "TASK_RUNNING");
    let (_, b) = status(&facts, "quad-b", "TASK_RUNNING");
    let (a_gpus, b_gpus) = (gpu_indices(a), gpu_indices(b));
    for (task, set) in [(a, &a_gpus), (b, &b_gpus)] {
        assert!(
            set.len() == 4 && whole_nvlink_pairs(set),
            "gpus:4 is two NVLink pairs: {task}"
        );
        // Within a board of four the weakest link crosses host bridges.
        assert_eq!(label(task, "butte.gpu.interconnect"), "NODE", "{task}");
        assert_eq!(
            label(task, "butte.gpu.numa_node"),
            gpus.numa_node(set[0]).to_string(),
            "{task}"
        );
    }
    assert!(disjoint(&a_gpus, &b_gpus), "{a_gpus:?} and {b_gpus:?}");

    let offered = fact(&facts, "offered_while_both_ran").as_array().unwrap();
    assert!(
        offered.iter().all(|gpus| *gpus == 0.0),
        "no gpus are offered while both quads hold all eight: {offered:?}"
    );
    assert!(fact(&facts, "third_from_offer_with").as_f64().unwrap() >= 4.0);

    let (c_at, c) = status(&facts, "quad-c", "TASK_RUNNING");
    let c_gpus = gpu_indices(c);
    assert!(
        c_gpus.len() == 4 && whole_nvlink_pairs(&c_gpus),
        "the third gets a linked set too: {c}"
    );
    for (name, set) in [("quad-a", &a_gpus), ("quad-b", &b_gpus)] {
        let (ended_at, _) = status(&facts, name, "TASK_FINISHED");
        if ended_at > c_at {
            assert!(
                disjoint(&c_gpus, set),
                "quad-c {c_gpus:?} overlaps {name} {set:?}, which still ran"
            );
        }
    }
}

#[test]
fn a_faulty_gpu_disappears_from_the_next_offers() {
    let mut gpus = FakeGpus::create("faulty");
    let cluster = gpu_agent("gpu-faulty", 15204, 15205, &gpus);
    let mut framework = Framework::start(&cluster, "faulty", &[]);
    framework.until("wait");
    gpus.edit(|spec| spec["gpus"][3]["ecc_uncorrectable"] = json!(1));
    framework.answer("gpu 3 is faulty");
    let facts = framework.finish();

    let rescinded = fact(&facts, "rescinded_after").as_f64().unwrap();
    let seven = fact(&facts, "seven_after").as_f64().unwrap();
    assert!(
        rescinded <= 10.0 && seven <= 10.0,
        "the held offer is rescinded ({rescinded} s) and 7 gpus offered ({seven} s) within 10 s"
    );
    let (_, running) = status(&facts, "seven", "TASK_RUNNING");
    let chosen = gpu_indices(running);
    assert!(
        chosen.len() == 7 && !chosen.contains(&3),
        "gpus:7 is every GPU but the faulty one: {running}"
    );

    let metrics = http_get(cluster.agent_port, "/metrics").unwrap();
    assert_eq!(
        series(&metrics, "butte_gpu_faulty", &[("gpu", "3")]),
        [1.0],
        "GPU 3 is faulty in the agent's /metrics:\n{metrics}"
    );
    for gpu in [0, 1, 2, 4, 5, 6, 7] {
        let healthy = series(&metrics, "butte_gpu_faulty", &[("gpu", &gpu.to_string())]);
        assert!(
            healthy.iter().all(|v| *v == 0.0),
            "GPU {gpu} is not faulty: {healthy:?}"
        );
    }
}

#[test]
fn per_task_gpu_memory_comes_from_the_backends_process_figures() {
    let mut gpus = FakeGpus::create("memory");
    let cluster = gpu_agent("gpu-memory", 15206, 15207, &gpus);
    let mut framework = Framework::start(&cluster, "memory", &[]);
    let waiting = framework.until("wait");
    let framework_id = waiting["framework_id"].as_str().unwrap().to_owned();
    let gpu = gpu_indices(&waiting)[0];

    // The task's processes on the host: its cgroup's, as NVML would list them.
    let mut pid = None;
    wait_for("the task's processes in its cgroup", || {
        pid = task_pids(&cluster).into_iter().next();
        pid.is_some()
    });
    let pid = pid.unwrap();
    gpus.edit(|spec| {
        spec["processes"] = json!([{
            "pid": pid, "gpu": gpu, "memory_used_mib": 512, "sm_utilization": 40.0
        }]);
        spec["gpus"][gpu as usize]["memory_used_mib"] = json!(512);
        spec["gpus"][gpu as usize]["utilization_percent"] = json!(40.0);
    });

    let task = [
        ("framework_id", framework_id.as_str()),
        ("task_id", "holder"),
    ];
    let gpu_label = gpu.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = http_get(cluster.agent_port, "/metrics").unwrap_or_default();
        let memory = series(&metrics, "butte_task_gpu_memory_used_bytes", &task);
        let utilization = series(
            &metrics,
            "butte_gpu_utilization_ratio",
            &[("gpu", &gpu_label)],
        );
        if memory == [536870912.0] && utilization == [0.4] {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "within 10 s the agent's /metrics has holder's 512 MiB on GPU {gpu} (pid {pid}) \
             and GPU {gpu} at 40 %; it has memory {memory:?}, utilization {utilization:?}:\n{}",
            gpu_lines(&metrics)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("{}", gpu_lines(&metrics));
    framework.answer("seen");
    framework.finish();
}

/// Host pids in the cgroups of the cluster's running tasks.
fn task_pids(cluster: &Cluster) -> Vec<u32> {
    cluster
        .cgroups_left()
        .iter()
        .filter_map(|cgroup| std::fs::read_to_string(cgroup.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The GPU lines of a /metrics page.
fn gpu_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains("gpu") && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}
