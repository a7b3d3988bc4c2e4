//! A master and agents from this build's binaries on loopback, and a JSON
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

/// Median and p99 of `samples`, in milliseconds, printed under `name`;
/// returns the median.
pub fn stats(name: &str, mut samples: Vec<Duration>) -> Duration {
    if samples.is_empty() {
        println!("{name}: no samples");
        return Duration::ZERO;
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name}: median {:.2} ms, p99 {:.2} ms (n={})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.len()
    );
    at(0.5)
}

pub struct Cluster {
    master: Option<Child>,
    agent: Option<Child>,
    /// Agents beyond the first (`add_agent`), each on its own port, work
    /// dir and cgroup subtree.
    more_agents: Vec<Child>,
    pub master_port: u16,
    agent_port: u16,
    /// The port the agent reaches the master on (the master's, or a relay's).
    pub agent_to_master: u16,
    agent_resources: String,
    pub dir: PathBuf,
    agent_runs: u32,
    /// Flags beyond the usual ones (`start_secured`).
    master_args: Vec<String>,
    agent_args: Vec<String>,
}

/// A master that speaks HTTPS and authenticates frameworks: the files of
/// `scripts/make-test-pki` in `pki`.
pub struct Secured {
    pub pki: PathBuf,
}

impl Secured {
    /// Makes the test PKI in `pki`.
    pub fn make(pki: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-pki");
        let status = Command::new(script)
            .arg(pki)
            .status()
            .unwrap_or_else(|e| panic!("scripts/make-test-pki: {e}"));
        assert!(status.success(), "scripts/make-test-pki failed");
        Self {
            pki: pki.to_owned(),
        }
    }

    fn file(&self, name: &str) -> String {
        self.pki.join(name).display().to_string()
    }

    /// TLS with agent certificates, credentials, frameworks authenticated.
    fn master_args(&self) -> Vec<String> {
        [
            "--tls-cert",
            &self.file("master.pem"),
            "--tls-key",
            &self.file("master.key"),
            "--agent-ca",
            &self.file("ca.pem"),
            "--authenticate-agents",
            "--credentials",
            &self.file("credentials"),
            "--authenticate-frameworks",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn agent_args(&self) -> Vec<String> {
        [
            "--tls-ca",
            &self.file("ca.pem"),
            "--tls-cert",
            &self.file("agent.pem"),
            "--tls-key",
            &self.file("agent.key"),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// A client that trusts the test CA and authenticates as ops.
    pub fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.pki.join("ca.pem")).unwrap_or_else(|e| panic!("ca.pem: {e}"));
        let ca = reqwest::Certificate::from_pem(&ca).unwrap_or_else(|e| panic!("ca.pem: {e}"));
        let mut headers = reqwest::header::HeaderMap::new();
        // base64 of "ops:ops-secret"
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_static("Basic b3BzOm9wcy1zZWNyZXQ="),
        );
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .default_headers(headers)
            .build()
            .unwrap_or_else(|e| panic!("https client: {e}"))
    }
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
        Self::start_via(dir, master_port, agent_port, master_port, agent_resources).await
    }

    /// As `start`, the master on HTTPS with agent certificates and
    /// authenticated frameworks, the agent linking with its certificate.
    pub async fn start_secured(
        dir: &Path,
        master_port: u16,
        agent_port: u16,
        agent_resources: &str,
        secured: &Secured,
    ) -> Self {
        Self::start_with(
            dir,
            master_port,
            agent_port,
            master_port,
            agent_resources,
            (secured.master_args(), secured.agent_args()),
        )
        .await
    }

    /// As `start`, the agent reaching the master on `agent_to_master` (a relay).
    pub async fn start_via(
        dir: &Path,
        master_port: u16,
        agent_port: u16,
        agent_to_master: u16,
        agent_resources: &str,
    ) -> Self {
        Self::start_with(
            dir,
            master_port,
            agent_port,
            agent_to_master,
            agent_resources,
            (Vec::new(), Vec::new()),
        )
        .await
    }

    async fn start_with(
        dir: &Path,
        master_port: u16,
        agent_port: u16,
        agent_to_master: u16,
        agent_resources: &str,
        (master_args, agent_args): (Vec<String>, Vec<String>),
    ) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut cluster = Self {
            master: None,
            agent: None,
            more_agents: Vec::new(),
            master_port,
            agent_port,
            agent_to_master,
            agent_resources: agent_resources.to_owned(),
            dir: dir.to_owned(),
            agent_runs: 0,
            master_args,
            agent_args,
        };
        cluster.start_master();
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start_agent();
        cluster
    }

    /// Starts the master (again, after `kill_master`, on the same registry).
    pub fn start_master(&mut self) {
        let master = Command::new(binary("butte-master"))
            .args([
                "--port",
                &self.master_port.to_string(),
                "--allocation-interval",
                "0.05",
            ])
            .args(&self.master_args)
            .arg("--work-dir")
            .arg(self.dir.join("master"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("master: {e}"));
        self.master = Some(master);
    }

    /// kill -9 of the master.
    pub fn kill_master(&mut self) {
        if let Some(mut master) = self.master.take() {
            let _ = master.kill();
            let _ = master.wait();
        }
    }

    /// The agent's pid, while it runs.
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|a| a.id() as i32)
    }

    /// Starts the agent (again, after `kill_agent`, on the same work dir);
    /// its log is `agent-N.log` for its N-th run.
    pub fn start_agent(&mut self) {
        self.agent_runs += 1;
        let log =
            std::fs::File::create(self.agent_log()).unwrap_or_else(|e| panic!("agent log: {e}"));
        let agent = self.spawn_agent(self.agent_port, &self.dir.join("agent"), log);
        self.agent = Some(agent);
    }

    /// Starts one more agent, on `port` (its state in `agent-PORT/`, its
    /// log `agent-PORT.log`), offering the same resources.
    pub fn add_agent(&mut self, port: u16) {
        let log = std::fs::File::create(self.dir.join(format!("agent-{port}.log")))
            .unwrap_or_else(|e| panic!("agent log: {e}"));
        let agent = self.spawn_agent(port, &self.dir.join(format!("agent-{port}")), log);
        self.more_agents.push(agent);
    }

    fn spawn_agent(&self, port: u16, work_dir: &Path, log: std::fs::File) -> Child {
        Command::new(binary("butte-agent"))
            .args([
                "--master",
                &format!("127.0.0.1:{}", self.agent_to_master),
                "--port",
                &port.to_string(),
            ])
            .args([
                "--resources",
                &self.agent_resources,
                "--container-prefix",
                &format!("bench{port}-"),
                "--cgroup-subtree",
                &format!("butte/bench-{port}"),
            ])
            .args(&self.agent_args)
            .arg("--work-dir")
            .arg(work_dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("agent: {e}"))
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
        // The agents drained (SIGUSR1: their tasks killed, cgroups and
        // pins removed), then the master.
        let agents: Vec<&mut Child> = self
            .agent
            .iter_mut()
            .chain(self.more_agents.iter_mut())
            .collect();
        for agent in &agents {
            // SAFETY: kill(2) on our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(agent.id() as i32, libc::SIGUSR1);
            }
        }
        for agent in agents {
            let _ = agent.wait();
        }
        if let Some(master) = self.master.as_mut() {
            // SAFETY: kill(2) on our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(master.id() as i32, libc::SIGTERM);
            }
            let _ = master.wait();
        }
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
        let info = json!({"user": "root", "name": "bench"});
        Self::try_subscribe(master_port, info)
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"))
    }

    /// Subscribes over HTTPS as the test principal (`Secured`).
    pub async fn subscribe_secured(master_port: u16, secured: &Secured) -> Self {
        let info = json!({"user": "root", "name": "bench"});
        let url = format!("https://127.0.0.1:{master_port}/api/v1/scheduler");
        Self::subscribe_at(secured.client(), url, info)
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"))
    }

    /// Subscribes with `framework_info` (with its `id`, to re-subscribe).
    pub async fn try_subscribe(master_port: u16, framework_info: Value) -> Result<Self, String> {
        let url = format!("http://127.0.0.1:{master_port}/api/v1/scheduler");
        Self::subscribe_at(reqwest::Client::new(), url, framework_info).await
    }

    async fn subscribe_at(
        http: reqwest::Client,
        url: String,
        framework_info: Value,
    ) -> Result<Self, String> {
        let mut subscribe =
            json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info}});
        if let Some(id) = framework_info.get("id") {
            subscribe["framework_id"] = id.clone();
        }
        let response = http
            .post(&url)
            .header("Content-Type", "application/json")
            .body(subscribe.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("SUBSCRIBE answered {}", response.status()));
        }
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
        Ok(Self {
            http,
            url,
            stream_id,
            framework_id: subscribed["subscribed"]["framework_id"].clone(),
            events,
            offers: Vec::new(),
        })
    }

    /// Posts a call; whether the master took it (2xx).
    pub async fn call(&self, body: Value) -> bool {
        let sent = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", &self.stream_id)
            .body(body.to_string())
            .send()
            .await;
        sent.is_ok_and(|response| response.status().is_success())
    }

    /// The next event (Null once the subscription's stream has ended);
    /// offers are kept for later, updates acknowledged.
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

    /// Waits for TASK_RUNNING of `count` distinct tasks (STARTING passed
    /// over); any other state is a sleeper that ended: a panic.
    pub async fn until_running(&mut self, count: usize) {
        let mut running = std::collections::HashSet::new();
        while running.len() < count {
            let event = self.next().await;
            assert!(!event.is_null(), "the scheduler's stream ended");
            if event["type"] != "UPDATE" {
                continue;
            }
            let status = &event["update"]["status"];
            match status["state"].as_str() {
                Some("TASK_RUNNING") => {
                    let id = status["task_id"]["value"].as_str().unwrap_or_default();
                    running.insert(id.to_owned());
                }
                Some("TASK_STARTING") => {}
                other => panic!("a sleeper ended: {other:?} {status}"),
            }
        }
    }

    /// The oldest offer not used yet (waiting for one).
    pub async fn offer(&mut self) -> Value {
        while self.offers.is_empty() {
            self.next().await;
        }
        self.offers.remove(0)
    }

    /// Launches `tasks` on one offer; whether the master took the ACCEPT.
    pub async fn accept(&mut self, offer: &Value, tasks: Vec<Value>) -> bool {
        let accept = json!({"type": "ACCEPT", "framework_id": self.framework_id, "accept": {
            "offer_ids": [offer["id"]], "filters": {"refuse_seconds": 0},
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": tasks}}]}});
        self.call(accept).await
    }

    /// Offers taken and not used: declined.
    pub async fn decline_all(&mut self) {
        let ids: Vec<Value> = self.offers.drain(..).map(|o| o["id"].clone()).collect();
        if !ids.is_empty() {
            let decline = json!({"type": "DECLINE", "framework_id": self.framework_id,
                "decline": {"offer_ids": ids, "filters": {"refuse_seconds": 0.1}}});
            self.call(decline).await;
        }
    }

    /// Asks the master for the state of `task_ids`.
    pub async fn reconcile(&self, task_ids: &[String]) -> bool {
        let tasks: Vec<Value> = task_ids
            .iter()
            .map(|id| json!({"task_id": {"value": id}}))
            .collect();
        let reconcile = json!({"type": "RECONCILE", "framework_id": self.framework_id,
            "reconcile": {"tasks": tasks}});
        self.call(reconcile).await
    }

    pub async fn teardown(&self) {
        let teardown = json!({"type": "TEARDOWN", "framework_id": self.framework_id});
        self.call(teardown).await;
    }
}
