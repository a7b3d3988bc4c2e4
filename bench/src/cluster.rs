//! A master and an agent from this build's binaries on loopback, and a JSON
//! scheduler that subscribes, launches and acknowledges: what the benchmarks
//! that go through the whole path share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use butte_api::recordio;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A binary next to the running one (target/release).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let path = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    assert!(
        path.exists(),
        "{} not built: cargo build --release --workspace --bins",
        path.display()
    );
    path
}

/// Median and p99 of `samples`, in milliseconds, printed under `name`.
pub fn stats(name: &str, mut samples: Vec<Duration>) {
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

pub struct Cluster {
    master: Child,
    agent: Option<Child>,
    pub master_port: u16,
    agent_port: u16,
    agent_resources: String,
    pub dir: PathBuf,
    agent_runs: u32,
}

impl Cluster {
    /// Starts the master, then the agent offering `agent_resources`; state
    /// and logs under `dir` (emptied first).
    pub async fn start(
        dir: &Path,
        master_port: u16,
        agent_port: u16,
        agent_resources: &str,
    ) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let master = Command::new(binary("butte-master"))
            .args([
                "--port",
                &master_port.to_string(),
                "--allocation-interval",
                "0.05",
            ])
            .arg("--work-dir")
            .arg(dir.join("master"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("master: {e}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cluster = Self {
            master,
            agent: None,
            master_port,
            agent_port,
            agent_resources: agent_resources.to_owned(),
            dir: dir.to_owned(),
            agent_runs: 0,
        };
        cluster.start_agent();
        cluster
    }

    /// Starts the agent (again, after `kill_agent`, on the same work dir);
    /// its log is `agent-N.log` for its N-th run.
    pub fn start_agent(&mut self) {
        self.agent_runs += 1;
        let log =
            std::fs::File::create(self.agent_log()).unwrap_or_else(|e| panic!("agent log: {e}"));
        let agent = Command::new(binary("butte-agent"))
            .args([
                "--master",
                &format!("127.0.0.1:{}", self.master_port),
                "--port",
                &self.agent_port.to_string(),
            ])
            .args([
                "--resources",
                &self.agent_resources,
                "--container-prefix",
                "bench-",
                "--cgroup-subtree",
                &format!("butte/bench-{}", self.agent_port),
            ])
            .arg("--work-dir")
            .arg(self.dir.join("agent"))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("agent: {e}"));
        self.agent = Some(agent);
    }

    /// The current agent run's log.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join(format!("agent-{}.log", self.agent_runs))
    }

    /// kill -9 of the agent: its containers keep running.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// Waits (up to `limit`) for a line containing `text` in the current
    /// agent run's log; the line.
    pub async fn agent_logged(&self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(self.agent_log()).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return Some(line.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agent drained (SIGUSR1: its tasks killed, cgroups and pins
        // removed), then the master.
        if let Some(agent) = self.agent.as_mut() {
            // SAFETY: kill(2) on our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(agent.id() as i32, libc::SIGUSR1);
            }
            let _ = agent.wait();
        }
        // SAFETY: kill(2) on our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.master.id() as i32, libc::SIGTERM);
        }
        let _ = self.master.wait();
    }
}

/// A subscribed JSON scheduler: its calls and its events.
pub struct Scheduler {
    http: reqwest::Client,
    url: String,
    stream_id: String,
    pub framework_id: Value,
    events: mpsc::UnboundedReceiver<Value>,
    /// Offers received and not used yet, oldest first.
    offers: Vec<Value>,
}

/// A `TaskInfo` running `argv` (no shell) with a small share of CPU and memory.
pub fn task(task_id: &str, agent_id: &Value, argv: &[&str]) -> Value {
    json!({
        "name": task_id, "task_id": {"value": task_id}, "agent_id": agent_id,
        "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.01}},
                      {"name": "mem", "type": "SCALAR", "scalar": {"value": 16}}],
        "command": {"shell": false, "value": argv[0], "arguments": argv}})
}

impl Scheduler {
    pub async fn subscribe(master_port: u16) -> Self {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{master_port}/api/v1/scheduler");
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

    pub async fn call(&self, body: Value) {
        self.http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", &self.stream_id)
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("call: {e}"));
    }

    /// The next event; offers are kept for later, updates acknowledged.
    pub async fn next(&mut self) -> Value {
        let event = self.events.recv().await.unwrap_or_default();
        if event["type"] == "OFFERS" {
            self.offers.extend(
                event["offers"]["offers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        if event["type"] == "UPDATE" {
            let status = &event["update"]["status"];
            if status.get("uuid").is_some() {
                self.call(json!({"type": "ACKNOWLEDGE", "framework_id": self.framework_id, "acknowledge": {
                    "agent_id": status["agent_id"], "task_id": status["task_id"], "uuid": status["uuid"]}}))
                .await;
            }
        }
        event
    }

    /// The oldest offer not used yet (waiting for one).
    pub async fn offer(&mut self) -> Value {
        while self.offers.is_empty() {
            self.next().await;
        }
        self.offers.remove(0)
    }

    /// Launches `tasks` (built by `make` from the offer's agent id) on one
    /// offer; returns when ACCEPT is answered.
    pub async fn accept(&mut self, offer: &Value, tasks: Vec<Value>) {
        let accept = json!({"type": "ACCEPT", "framework_id": self.framework_id, "accept": {
            "offer_ids": [offer["id"]], "filters": {"refuse_seconds": 0},
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": tasks}}]}});
        self.call(accept).await;
    }

    pub async fn teardown(&self) {
        let teardown = json!({"type": "TEARDOWN", "framework_id": self.framework_id});
        self.call(teardown).await;
    }
}
