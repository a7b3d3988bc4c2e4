//! A master and an agent started from this workspace's binaries, with their
//! logs, sandboxes and cgroups, for the tests that drive whole clusters.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

pub fn python() -> PathBuf {
    let python = std::env::var_os("BUTTE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/install-deps",
        python.display()
    );
    python
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// POSTs JSON; the status line and the body.
pub fn http_post_json(port: u16, path: &str, body: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30) * super::slowdown();
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Cluster {
    master: Child,
    master_args: Vec<String>,
    /// Master processes started so far.
    master_runs: u32,
    agent: Option<Child>,
    pub master_port: u16,
    pub agent_port: u16,
    /// Logs, the master's and the agent's work dirs, the sandboxes.
    pub dir: PathBuf,
    /// The agent's container prefix, e.g. `kt15151-`.
    pub prefix: String,
    /// The agent's cgroup subtree, e.g. `butte/kt15151`.
    pub subtree: String,
    resources: String,
    agent_args: Vec<String>,
    /// Agent processes started so far.
    agent_runs: u32,
    /// The port the agent reaches the master on.
    agent_to_master: u16,
    /// Where the master speaks HTTPS and wants credentials to read.
    https: Option<Https>,
}

/// How to read from a master that speaks HTTPS and authenticates readers.
#[derive(Clone)]
pub struct Https {
    /// The CA of the master's certificate.
    pub ca: PathBuf,
    /// `principal:secret`.
    pub credentials: String,
}

/// A cluster's ports: the master's, the agent's, and the one the agent
/// reaches the master on (the master's, or a proxy's).
pub struct Ports {
    pub master: u16,
    pub agent: u16,
    pub agent_to_master: u16,
}

impl Cluster {
    pub fn start(name: &str, master_port: u16, agent_port: u16, resources: &str) -> Cluster {
        Self::start_with(name, master_port, agent_port, resources, &[])
    }

    pub fn start_with(
        name: &str,
        master_port: u16,
        agent_port: u16,
        resources: &str,
        agent_args: &[&str],
    ) -> Cluster {
        Self::start_prepared(name, master_port, agent_port, resources, agent_args, |_| {})
    }

    /// As `start_with`, with `prepare` run on the cluster's dir before the
    /// master and agent start (the agent's work dir will be `dir/agent`).
    pub fn start_prepared(
        name: &str,
        master_port: u16,
        agent_port: u16,
        resources: &str,
        agent_args: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Cluster {
        let ports = Ports {
            master: master_port,
            agent: agent_port,
            agent_to_master: master_port,
        };
        Self::start_full(name, ports, resources, agent_args, &[], None, prepare)
    }

    /// A cluster whose master speaks HTTPS (`master_args` say how) and
    /// wants credentials to read (`https`); the agent gets `agent_args`.
    pub fn start_secure(
        name: &str,
        ports: Ports,
        resources: &str,
        agent_args: &[&str],
        master_args: &[&str],
        https: Https,
    ) -> Cluster {
        Self::start_full(
            name,
            ports,
            resources,
            agent_args,
            master_args,
            Some(https),
            |_| {},
        )
    }

    /// As `start_with`, the agent reaching the master through
    /// `via_port` (a proxy the test cuts), the master given `master_args`.
    pub fn start_via(name: &str, ports: Ports, resources: &str, master_args: &[&str]) -> Cluster {
        Self::start_full(name, ports, resources, &[], master_args, None, |_| {})
    }

    fn start_full(
        name: &str,
        ports: Ports,
        resources: &str,
        agent_args: &[&str],
        master_args: &[&str],
        https: Option<Https>,
        prepare: impl FnOnce(&Path),
    ) -> Cluster {
        let Ports {
            master: master_port,
            agent: agent_port,
            agent_to_master,
        } = ports;
        let dir = PathBuf::from(format!(
            "/var/lib/butte-kernel-tests/{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        prepare(&dir);
        let master_args: Vec<String> = master_args.iter().map(|a| a.to_string()).collect();
        let master = spawn_master(&dir, master_port, &master_args, 1);
        let prefix = format!("kt{agent_port}-");
        let subtree = format!("butte/kt{agent_port}");
        let mut cluster = Cluster {
            master,
            master_args,
            master_runs: 1,
            agent: None,
            master_port,
            agent_port,
            dir,
            prefix,
            subtree,
            resources: resources.to_owned(),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            agent_runs: 0,
            agent_to_master,
            https,
        };
        cluster.start_agent();
        wait_for("the agent to register", || {
            cluster
                .master_get("/metrics/snapshot")
                .is_some_and(|body| body.contains("\"master/slaves_active\":1.0"))
        });
        cluster
    }

    /// A GET of the master's `path`: the body, if it answered (over HTTPS,
    /// with credentials, where the master wants them).
    pub fn master_get(&self, path: &str) -> Option<String> {
        let Some(https) = &self.https else {
            return http_get(self.master_port, path);
        };
        let output = Command::new("curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(&https.ca)
            .args(["-u", &https.credentials])
            .arg(format!("https://127.0.0.1:{}{path}", self.master_port))
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the agent (again, after `kill_agent`: same flags, same work
    /// dir; its log goes to agent.log, then agent-2.log, ...).
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent runs already");
        self.agent_runs += 1;
        let log_name = match self.agent_runs {
            1 => "agent".to_owned(),
            n => format!("agent-{n}"),
        };
        let log =
            |ext: &str| std::fs::File::create(self.dir.join(format!("{log_name}.{ext}"))).unwrap();
        let agent = Command::new(binary("butte-agent"))
            .args([
                "--master",
                &format!("127.0.0.1:{}", self.agent_to_master),
                "--port",
                &self.agent_port.to_string(),
            ])
            .args([
                "--resources",
                &self.resources,
                "--container-prefix",
                &self.prefix,
                "--status-update-retry",
                "1",
                "--cgroup-subtree",
                &self.subtree,
            ])
            .args(&self.agent_args)
            .arg("--work-dir")
            .arg(self.dir.join("agent"))
            .stdout(log("log"))
            .stderr(log("err"))
            .spawn()
            .unwrap();
        self.agent = Some(agent);
    }

    /// The master's pid.
    pub fn master_pid(&self) -> i32 {
        self.master.id() as i32
    }

    /// The agent's pid, while it runs.
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|a| a.id() as i32)
    }

    /// Whether the agent process has exited by itself (reaped if so).
    pub fn agent_exited(&mut self) -> bool {
        let exited = self
            .agent
            .as_mut()
            .is_none_or(|agent| agent.try_wait().ok().flatten().is_some());
        if exited {
            self.agent = None;
        }
        exited
    }

    /// kill -9 of the agent (its tasks, launcher aside, keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().unwrap();
            agent.wait().unwrap();
        }
    }

    pub fn run_framework(&self, mode: &str) -> String {
        self.run_framework_with(mode, &[])
    }

    pub fn run_framework_with(&self, mode: &str, args: &[&str]) -> String {
        let output = self
            .framework("agent_framework.py", mode, 150)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let tail = self.agent_log_tail(30);
        assert!(
            output.status.success(),
            "framework ({mode}) failed:\n{stdout}\n{}\nagent log (last lines, newest first):\n{tail}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// `python tests/SCRIPT MASTER_URL MODE TIMEOUT`, to which the caller adds
    /// the mode's arguments.
    pub fn framework(&self, script: &str, mode: &str, timeout_s: u32) -> Command {
        let mut command = Command::new(python());
        command
            .arg(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("tests")
                    .join(script),
            )
            .arg(format!("http://127.0.0.1:{}", self.master_port))
            .args([mode, &(timeout_s * super::slowdown()).to_string()]);
        command
    }

    /// The newest lines of the agent's log, newest first.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        log.lines().rev().take(lines).collect::<Vec<_>>().join("\n")
    }

    pub fn sandbox(&self, task_id: &str) -> PathBuf {
        let frameworks = self.dir.join("agent/sandboxes");
        for framework in std::fs::read_dir(&frameworks).unwrap() {
            let task_dir = framework.unwrap().path().join(task_id);
            if let Ok(mut runs) = std::fs::read_dir(&task_dir) {
                return runs.next().unwrap().unwrap().path();
            }
        }
        panic!("no sandbox for {task_id} under {}", frameworks.display());
    }

    /// The host pids in a task's container (its cgroup, found from its
    /// sandbox, whose last component is its container id).
    pub fn container_pids(&self, task_id: &str) -> Vec<i32> {
        let sandbox = self.sandbox(task_id);
        let container = sandbox.file_name().unwrap();
        for subtree in self.subtrees() {
            let procs = subtree.join(container).join("cgroup.procs");
            if let Ok(text) = std::fs::read_to_string(&procs) {
                return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            }
        }
        Vec::new()
    }

    /// Our cgroups still present, in any hierarchy.
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for subtree in self.subtrees() {
            for entry in std::fs::read_dir(&subtree).into_iter().flatten() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    left.push(path);
                }
            }
        }
        left
    }

    /// The agent's subtree directories still present (after it stopped).
    pub fn subtree_left(&self) -> Vec<PathBuf> {
        self.subtrees().into_iter().filter(|p| p.exists()).collect()
    }

    /// Where the agent's subtree is in each hierarchy: one per v1 controller
    /// and `unified/` on a hybrid host, the root's on pure cgroup v2.
    fn subtrees(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            return vec![root.join(&self.subtree)];
        }
        std::fs::read_dir(root)
            .unwrap()
            .map(|h| h.unwrap().path().join(&self.subtree))
            .collect()
    }

    /// kill -9 of the master, then the master started again on its
    /// registry (its logs `master-N.log`/`.err` for its N-th run).
    pub fn restart_master(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        self.master_runs += 1;
        self.master = spawn_master(
            &self.dir,
            self.master_port,
            &self.master_args,
            self.master_runs,
        );
    }

    /// Drains the agent (SIGUSR1: every task killed, its cgroups, pins and
    /// checkpoints removed) and waits for it to exit.
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: kill(2) on our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(agent.id() as i32, libc::SIGUSR1);
            }
            let deadline = Instant::now() + Duration::from_secs(15) * super::slowdown();
            while agent.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "agent did not stop on SIGUSR1");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Starts the master (its `run`-th time) and waits until it answers.
fn spawn_master(dir: &Path, port: u16, args: &[String], run: u32) -> Child {
    let suffix = if run == 1 {
        String::new()
    } else {
        format!("-{run}")
    };
    let log = |ext: &str| std::fs::File::create(dir.join(format!("master{suffix}.{ext}"))).unwrap();
    let master = Command::new(binary("butte-master"))
        .args([
            "--port",
            &port.to_string(),
            "--heartbeat-interval",
            "1",
            "--allocation-interval",
            "0.2",
        ])
        .args(args)
        .arg("--work-dir")
        .arg(dir.join("master"))
        .stdout(log("log"))
        .stderr(log("err"))
        .spawn()
        .unwrap();
    wait_for("the master", || http_get(port, "/health").is_some());
    master
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = self.master.kill();
        let _ = self.master.wait();
        // Logs and sandboxes stay for a failed test to be read, not otherwise.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
