//! ACCEPT to TASK_RUNNING through the master: the master and agent binaries
//! on loopback, a JSON scheduler that launches one task per offer, acknowledges
//! every update, and times each ACCEPT until the task's TASK_RUNNING arrives.
//! This includes the agent's hop to its launcher and the status update
//! stream's acknowledgement of TASK_STARTING before TASK_RUNNING (as in Mesos).
//!
//! `cargo build --release --workspace --bins && sudo target/release/accept-to-running [LAUNCHES]`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use butte_api::recordio;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MASTER_PORT: u16 = 15250;
const AGENT_PORT: u16 = 15251;

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            // SAFETY: kill(2) on our own children.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }
}

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let path = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    assert!(
        path.exists(),
        "{} not built: cargo build --release --workspace --bins",
        path.display()
    );
    path
}

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at =
        |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{name}: median {:.2} ms, p99 {:.2} ms (n={})",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

/// The master and agent binaries on loopback, their state under `dir`.
async fn start_cluster(dir: &std::path::Path) -> Processes {
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(binary("butte-master"))
            .args([
                "--port",
                &MASTER_PORT.to_string(),
                "--allocation-interval",
                "0.05",
            ])
            .arg("--work-dir")
            .arg(dir.join("master"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("master: {e}")),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    processes.0.push(
        Command::new(binary("butte-agent"))
            .args([
                "--master",
                &format!("127.0.0.1:{MASTER_PORT}"),
                "--port",
                &AGENT_PORT.to_string(),
            ])
            .args([
                "--resources",
                "cpus:8;mem:8192",
                "--container-prefix",
                "bench-",
            ])
            .arg("--work-dir")
            .arg(dir.join("agent"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("agent: {e}")),
    );
    processes
}

/// A subscribed JSON scheduler: its calls and its events.
struct Scheduler {
    http: reqwest::Client,
    url: String,
    stream_id: String,
    framework_id: Value,
    events: mpsc::UnboundedReceiver<Value>,
    /// Offers received and not used yet, oldest first.
    offers: Vec<Value>,
}

impl Scheduler {
    async fn subscribe() -> Self {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{MASTER_PORT}/api/v1/scheduler");
        let subscribe = json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "root", "name": "bench"}}});
        let response = http
            .post(&url)
            .header("Content-Type", "application/json")
            .body(subscribe.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        let stream_id = response.headers()["Mesos-Stream-Id"]
            .to_str()
            .unwrap_or_default()
            .to_owned();
        let (events_tx, mut events) = mpsc::unbounded_channel::<Value>();
        tokio::spawn(async move {
            let mut response = response;
            let mut decoder = recordio::Decoder::new(64 << 20);
            while let Ok(Some(chunk)) = response.chunk().await {
                for record in decoder.feed(&chunk).unwrap_or_default() {
                    if let Ok(event) = serde_json::from_slice::<Value>(&record) {
                        let _ = events_tx.send(event);
                    }
                }
            }
        });
        let subscribed = events.recv().await.unwrap_or_default();
        Self {
            http,
            url,
            stream_id,
            framework_id: subscribed["subscribed"]["framework_id"].clone(),
            events,
            offers: Vec::new(),
        }
    }

    async fn call(&self, body: Value) {
        self.http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", &self.stream_id)
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("call: {e}"));
    }

    /// The next event; offers are kept for later.
    async fn next(&mut self) -> Value {
        let event = self.events.recv().await.unwrap_or_default();
        if event["type"] == "OFFERS" {
            self.offers.extend(
                event["offers"]["offers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        event
    }

    /// Launches `task_id` (`/bin/true`) on the oldest offer; the time from
    /// ACCEPT to its TASK_RUNNING, or None when it ended without one.
    async fn launch(&mut self, task_id: &str) -> Option<Duration> {
        while self.offers.is_empty() {
            self.next().await;
        }
        let offer = self.offers.remove(0);
        let accept = json!({"type": "ACCEPT", "framework_id": self.framework_id, "accept": {
            "offer_ids": [offer["id"]], "filters": {"refuse_seconds": 0},
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": [{
                "name": task_id, "task_id": {"value": task_id}, "agent_id": offer["agent_id"],
                "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.01}},
                              {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}],
                "command": {"shell": false, "value": "/bin/true"}}]}}]}});
        let started = Instant::now();
        self.call(accept).await;
        loop {
            let event = self.next().await;
            if event["type"] != "UPDATE" {
                continue;
            }
            let status = &event["update"]["status"];
            if status.get("uuid").is_some() {
                self.call(json!({"type": "ACKNOWLEDGE", "framework_id": self.framework_id, "acknowledge": {
                    "agent_id": status["agent_id"], "task_id": status["task_id"], "uuid": status["uuid"]}}))
                .await;
            }
            if status["task_id"]["value"] != task_id {
                continue;
            }
            match status["state"].as_str() {
                Some("TASK_RUNNING") => return Some(started.elapsed()),
                Some("TASK_STARTING") => {}
                // Ended without ever being reported RUNNING.
                _ => return None,
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let launches: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500)
        .max(1);
    let dir = PathBuf::from("/var/lib/butte-bench/accept-to-running");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let processes = start_cluster(&dir).await;
    let mut scheduler = Scheduler::subscribe().await;
    let mut samples = Vec::with_capacity(launches);
    let mut no_running = Vec::new();
    for i in 0..launches {
        let task_id = format!("bench-{i}");
        match scheduler.launch(&task_id).await {
            Some(took) => samples.push(took),
            None => no_running.push(task_id),
        }
    }
    stats("ACCEPT -> TASK_RUNNING through master and agent", samples);
    if !no_running.is_empty() {
        println!(
            "{} of {launches} tasks ended without TASK_RUNNING: {}",
            no_running.len(),
            no_running.join(", ")
        );
    }
    let teardown = json!({"type": "TEARDOWN", "framework_id": scheduler.framework_id});
    scheduler.call(teardown).await;
    drop(processes);
}
