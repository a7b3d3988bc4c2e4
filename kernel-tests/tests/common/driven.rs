//! A mesoshttp framework (tests/driven_framework.py) that a test drives
//! line by line: the tasks it launches, the updates it sees, its commands.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::Cluster;

/// A running driven_framework.py: its updates as they come, its stdin.
pub struct Driven {
    child: Child,
    stdin: ChildStdin,
    pub lines: mpsc::Receiver<Value>,
    /// Every update received so far: (task, state, reason).
    pub seen: Vec<(String, String, String)>,
    /// Where `until` starts looking in `seen`.
    mark: usize,
    /// Each task's latest update's message.
    pub messages: HashMap<String, String>,
}

impl Driven {
    pub fn start(cluster: &Cluster, name: &str, aware: bool, tasks: &[(&str, &str)]) -> Driven {
        let tasks = serde_json::to_string(tasks).unwrap();
        let mut child = cluster
            .framework("driven_framework.py", name, 600)
            .args([if aware { "1" } else { "0" }, &tasks])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(cluster.dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str(&line) {
                    let _ = sender.send(value);
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        Driven {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            mark: 0,
            messages: HashMap::new(),
        }
    }

    /// From here on, `until` looks only at updates received later.
    pub fn mark(&mut self) {
        self.mark = self.seen.len();
    }

    /// Updates until `task` reaches `state` (since the mark, received or
    /// to come); whether it did, and its reason.
    pub fn until(&mut self, task: &str, state: &str, limit: Duration) -> String {
        let found = |seen: &[(String, String, String)]| {
            seen.iter()
                .find(|(t, s, _)| t == task && s == state)
                .map(|(_, _, reason)| reason.clone())
        };
        if let Some(reason) = found(&self.seen[self.mark..]) {
            return reason;
        }
        let deadline = Instant::now() + limit * super::slowdown();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("{task} never reached {state}; seen: {:?}", self.seen);
            };
            self.record(&line);
            if let Some(reason) = found(&self.seen[self.seen.len().saturating_sub(1)..]) {
                return reason;
            }
        }
    }

    /// Keeps an update line in `seen`; a subscription as ("", "SUBSCRIBED",
    /// framework id).
    pub fn record(&mut self, line: &Value) {
        if let Some(id) = line.get("subscribed") {
            let id = id.as_str().unwrap_or_default().to_owned();
            self.seen.push((String::new(), "SUBSCRIBED".into(), id));
        }
        if let Some(update) = line.get("update") {
            let field = |name: &str| update[name].as_str().unwrap_or_default().to_owned();
            self.seen
                .push((field("task"), field("state"), field("reason")));
            self.messages.insert(field("task"), field("message"));
        }
    }

    pub fn states_of(&self, task: &str) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|(t, _, _)| t == task)
            .map(|(_, s, _)| s.as_str())
            .collect()
    }

    /// Takes in what has arrived by now.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.record(&line);
        }
    }

    /// `task`'s states from its first terminal one on.
    pub fn states_since_end(&self, task: &str) -> Vec<&str> {
        let states = self.states_of(task);
        let first = states.iter().position(|s| {
            !matches!(
                *s,
                "TASK_STAGING" | "TASK_STARTING" | "TASK_RUNNING" | "TASK_UNREACHABLE"
            )
        });
        first.map_or_else(Vec::new, |at| states[at..].to_vec())
    }

    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
