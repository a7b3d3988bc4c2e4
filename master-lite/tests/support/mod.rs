//! Test doubles that speak the real wire: an agent on the gRPC link and a
//! scheduler on the HTTP API, plus a master started on a free port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use butte_api::agent_link::v1::agent_link_client::AgentLinkClient;
use butte_api::agent_link::v1::{self as link, agent_message, master_message};
use butte_api::mesos::v1::{AgentInfo, FrameworkId, TaskId, TaskState, TaskStatus};
use butte_api::recordio;
use butte_api::resources::Resources;
use butte_master_lite::{MasterConfig, RunningMaster, start};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub fn work_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "butte-test-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn master(name: &str) -> RunningMaster {
    master_with(MasterConfig::for_work_dir(work_dir(name))).await
}

pub async fn master_with(mut config: MasterConfig) -> RunningMaster {
    config.allocation_interval = Duration::from_millis(100);
    start(config).await.expect("master starts")
}

/// What the fake agent does with a launched command task.
fn runs_forever(command: &str) -> bool {
    command.starts_with("sleep")
}

/// An agent on the real gRPC link. Command tasks report STARTING and
/// RUNNING, then FINISHED unless their command starts with `sleep` (those
/// run until killed). Updates are resent every 300 ms until acknowledged.
pub struct TestAgent {
    pub agent_id: String,
    outbound: mpsc::UnboundedSender<link::AgentMessage>,
    pub unacked: Arc<Mutex<HashMap<Vec<u8>, link::StatusUpdate>>>,
    pub received: Arc<Mutex<Vec<master_message::Kind>>>,
    /// Launches dropped unanswered, as if lost on the way.
    drop_launches: Arc<std::sync::atomic::AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    pub async fn connect(master: &RunningMaster, resources: &str) -> TestAgent {
        Self::connect_as(master, resources, None, Vec::new()).await
    }

    pub async fn connect_as(
        master: &RunningMaster,
        resources: &str,
        agent_id: Option<String>,
        running_tasks: Vec<butte_api::mesos::v1::Task>,
    ) -> TestAgent {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", master.addr))
            .unwrap()
            .connect()
            .await
            .expect("grpc connects");
        Self::register_over(channel, resources, agent_id, running_tasks)
            .await
            .expect("registered")
    }

    /// Registers on `channel` (plain or TLS); the master's refusal as its status.
    pub async fn register_over(
        channel: tonic::transport::Channel,
        resources: &str,
        agent_id: Option<String>,
        running_tasks: Vec<butte_api::mesos::v1::Task>,
    ) -> Result<TestAgent, tonic::Status> {
        let mut client = AgentLinkClient::new(channel);
        let (outbound, receiver) = mpsc::unbounded_channel();
        outbound
            .send(link::AgentMessage {
                kind: Some(agent_message::Kind::Register(link::Register {
                    agent_info: AgentInfo {
                        hostname: "127.0.0.1".into(),
                        port: Some(5051),
                        id: agent_id.map(|value| butte_api::mesos::v1::AgentId { value }),
                        ..Default::default()
                    },
                    total_resources: Resources::parse(resources).unwrap().to_proto(None),
                    running_tasks,
                    frameworks: vec![],
                    version: Some("test".into()),
                })),
            })
            .unwrap();
        let mut inbound = client
            .session(UnboundedReceiverStream::new(receiver))
            .await?
            .into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unknown("the link closed before Registered"))?;
        let Some(master_message::Kind::Registered(registered)) = first.kind else {
            panic!("expected Registered, got {first:?}");
        };
        let unacked: Arc<Mutex<HashMap<Vec<u8>, link::StatusUpdate>>> = Arc::default();
        let received: Arc<Mutex<Vec<master_message::Kind>>> = Arc::default();
        let (out, pending, seen) = (outbound.clone(), unacked.clone(), received.clone());
        let drop_launches: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let dropping = drop_launches.clone();
        let reader = tokio::spawn(async move {
            let mut resend = tokio::time::interval(Duration::from_millis(300));
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let Ok(Some(message)) = message else { break };
                        let Some(kind) = message.kind else { continue };
                        seen.lock().unwrap().push(kind.clone());
                        let lost = dropping.load(std::sync::atomic::Ordering::SeqCst)
                            && matches!(kind, master_message::Kind::LaunchTasks(_));
                        if !lost {
                            handle(kind, &out, &pending);
                        }
                    }
                    _ = resend.tick() => {
                        let _ = out.send(link::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(link::Heartbeat {})) });
                        for update in pending.lock().unwrap().values() {
                            let _ = out.send(link::AgentMessage { kind: Some(agent_message::Kind::StatusUpdate(update.clone())) });
                        }
                    }
                }
            }
        });
        Ok(TestAgent {
            agent_id: registered.agent_id.value,
            outbound,
            unacked,
            received,
            drop_launches,
            reader,
        })
    }

    /// From now on, launches are lost on the way (never answered).
    pub fn drop_launches(&self) {
        self.drop_launches
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops the link as a crashed agent would.
    pub fn disconnect(self) {
        self.reader.abort();
    }

    pub fn send_update(&self, framework_id: &str, task_id: &str, state: TaskState) {
        send_update(
            &self.outbound,
            &self.unacked,
            framework_id,
            task_id,
            state,
            None,
        );
    }
}

fn send_update(
    out: &mpsc::UnboundedSender<link::AgentMessage>,
    pending: &Mutex<HashMap<Vec<u8>, link::StatusUpdate>>,
    framework_id: &str,
    task_id: &str,
    state: TaskState,
    message: Option<String>,
) {
    let uuid = uuid::Uuid::new_v4().as_bytes().to_vec();
    let update = link::StatusUpdate {
        framework_id: FrameworkId {
            value: framework_id.to_owned(),
        },
        status: TaskStatus {
            task_id: TaskId {
                value: task_id.to_owned(),
            },
            state: state as i32,
            message,
            source: Some(butte_api::mesos::v1::task_status::Source::Executor as i32),
            uuid: Some(uuid.clone()),
            ..Default::default()
        },
    };
    pending.lock().unwrap().insert(uuid, update.clone());
    let _ = out.send(link::AgentMessage {
        kind: Some(agent_message::Kind::StatusUpdate(update)),
    });
}

fn handle(
    kind: master_message::Kind,
    out: &mpsc::UnboundedSender<link::AgentMessage>,
    pending: &Mutex<HashMap<Vec<u8>, link::StatusUpdate>>,
) {
    match kind {
        master_message::Kind::LaunchTasks(launch) => {
            let framework_id = launch.framework_info.id.clone().unwrap_or_default().value;
            let mut tasks = launch.tasks;
            tasks.extend(launch.task_group.map(|g| g.tasks).unwrap_or_default());
            for task in tasks {
                let id = task.task_id.value.clone();
                send_update(
                    out,
                    pending,
                    &framework_id,
                    &id,
                    TaskState::TaskStarting,
                    None,
                );
                send_update(
                    out,
                    pending,
                    &framework_id,
                    &id,
                    TaskState::TaskRunning,
                    None,
                );
                let command = task.command.and_then(|c| c.value).unwrap_or_default();
                if !runs_forever(&command) {
                    send_update(
                        out,
                        pending,
                        &framework_id,
                        &id,
                        TaskState::TaskFinished,
                        Some("exited with status 0".into()),
                    );
                }
            }
        }
        master_message::Kind::KillTask(kill) => {
            send_update(
                out,
                pending,
                &kill.framework_id.value,
                &kill.task_id.value,
                TaskState::TaskKilled,
                Some("killed".into()),
            );
        }
        master_message::Kind::StatusAck(ack) => {
            pending.lock().unwrap().remove(&ack.uuid);
        }
        _ => {}
    }
}

/// A client that sends HTTP Basic credentials with every request.
pub fn basic_client(principal: &str, secret: &str) -> reqwest::Client {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{principal}:{secret}"));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A scheduler speaking JSON to `/api/v1/scheduler`, as Mesos frameworks do.
pub struct Scheduler {
    http: reqwest::Client,
    url: String,
    pub framework_id: String,
    pub stream_id: String,
    events: mpsc::UnboundedReceiver<Value>,
    reader: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    pub async fn subscribe(master: &RunningMaster, framework_info: Value) -> Scheduler {
        let mut call =
            json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info}});
        if let Some(id) = framework_info.get("id") {
            call["framework_id"] = id.clone();
        }
        Self::subscribe_raw(master, call).await
    }

    pub async fn subscribe_raw(master: &RunningMaster, call: Value) -> Scheduler {
        Self::subscribe_with(master, call, reqwest::Client::new()).await
    }

    /// As `subscribe`, authenticated as `principal` with `secret` (HTTP
    /// Basic on every call).
    pub async fn subscribe_as(
        master: &RunningMaster,
        framework_info: Value,
        principal: &str,
        secret: &str,
    ) -> Scheduler {
        let mut call =
            json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info}});
        if let Some(id) = framework_info.get("id") {
            call["framework_id"] = id.clone();
        }
        Self::subscribe_with(master, call, basic_client(principal, secret)).await
    }

    async fn subscribe_with(
        master: &RunningMaster,
        call: Value,
        http: reqwest::Client,
    ) -> Scheduler {
        let url = format!("http://{}/api/v1/scheduler", master.addr);
        let response = http
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .body(call.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "subscribe answered {}",
            response.status()
        );
        let stream_id = response.headers()["Mesos-Stream-Id"]
            .to_str()
            .unwrap()
            .to_owned();
        let (sender, mut events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut response = response;
            let mut decoder = recordio::Decoder::new(16 << 20);
            while let Ok(Some(chunk)) = response.chunk().await {
                for record in decoder.feed(&chunk).unwrap() {
                    let event: Value = serde_json::from_slice(&record).unwrap();
                    if sender.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        let first: Value = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first["type"], "SUBSCRIBED", "first event: {first}");
        let framework_id = first["subscribed"]["framework_id"]["value"]
            .as_str()
            .unwrap()
            .to_owned();
        Scheduler {
            http,
            url,
            framework_id,
            stream_id,
            events,
            reader,
        }
    }

    /// Closes the stream as a crashed scheduler would.
    pub fn disconnect(self) {
        self.reader.abort();
    }

    pub async fn call(&self, mut call: Value) -> reqwest::StatusCode {
        call["framework_id"] = json!({"value": self.framework_id});
        self.http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", &self.stream_id)
            .body(call.to_string())
            .send()
            .await
            .unwrap()
            .status()
    }

    /// The next event of `kind`, skipping others; panics after `secs`.
    pub async fn next(&mut self, kind: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {kind} event within {secs} s"))
                .unwrap_or_else(|| panic!("stream ended while waiting for {kind}"));
            if event["type"] == kind {
                return event;
            }
        }
    }

    /// Whether an event of `kind` arrives within `millis`.
    pub async fn gets_within(&mut self, kind: &str, millis: u64) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if event["type"] == kind => return Some(event),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Waits for updates, acknowledging each, until `task_id` reaches `state`; returns that status.
    pub async fn await_state(&mut self, task_id: &str, state: &str, secs: u64) -> Value {
        loop {
            let event = self.next("UPDATE", secs).await;
            let status = event["update"]["status"].clone();
            self.ack(&status).await;
            if status["task_id"]["value"] == task_id && status["state"] == state {
                return status;
            }
        }
    }

    pub async fn ack(&self, status: &Value) {
        if let Some(uuid) = status.get("uuid") {
            let code = self
                .call(json!({"type": "ACKNOWLEDGE", "acknowledge": {
                    "agent_id": status["agent_id"], "task_id": status["task_id"], "uuid": uuid}}))
                .await;
            assert_eq!(code, 202);
        }
    }
}

/// Launches `task_id` (`sleep 600`, 1 cpu, 64 MB: the fake agent runs it
/// until killed) on the next offer and waits until it runs.
pub async fn run_sleeper(scheduler: &mut Scheduler, task_id: &str) {
    let offers = scheduler.next("OFFERS", 5).await;
    let call = launch(
        &offers["offers"]["offers"][0],
        &[(task_id, "sleep 600", 1.0, 64.0)],
    );
    assert_eq!(scheduler.call(call).await, 202);
    scheduler.await_state(task_id, "TASK_RUNNING", 5).await;
}

/// A task as an agent reports it running at (re-)registration: one that
/// `run_sleeper` launched (1 cpu, 64 MB).
pub fn running_task(
    framework_id: &str,
    agent_id: &str,
    task_id: &str,
) -> butte_api::mesos::v1::Task {
    use butte_api::mesos::v1::{AgentId, Task};
    Task {
        name: task_id.into(),
        task_id: TaskId {
            value: task_id.into(),
        },
        framework_id: FrameworkId {
            value: framework_id.into(),
        },
        agent_id: AgentId {
            value: agent_id.into(),
        },
        state: TaskState::TaskRunning as i32,
        resources: Resources::parse("cpus:1;mem:64")
            .unwrap()
            .to_proto(Some("*")),
        ..Default::default()
    }
}

/// The master's JSON at `path` (a v0 view).
pub async fn get_json(master: &RunningMaster, path: &str) -> Value {
    get_json_with(&reqwest::Client::new(), master, path).await
}

/// As `get_json`, with `client` (credentials, say).
pub async fn get_json_with(client: &reqwest::Client, master: &RunningMaster, path: &str) -> Value {
    client
        .get(format!("http://{}{path}", master.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A LAUNCH of command tasks on one offer.
pub fn launch(offer: &Value, tasks: &[(&str, &str, f64, f64)]) -> Value {
    let task_infos: Vec<Value> = tasks
        .iter()
        .map(|(id, command, cpus, mem)| {
            json!({
                "name": id,
                "task_id": {"value": id},
                "agent_id": offer["agent_id"],
                "resources": [
                    {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
                    {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}}
                ],
                "command": {"value": command}
            })
        })
        .collect();
    json!({"type": "ACCEPT", "accept": {
        "offer_ids": [offer["id"]],
        "operations": [{"type": "LAUNCH", "launch": {"task_infos": task_infos}}],
        "filters": {"refuse_seconds": 0.1}
    }})
}

/// The reason an agent registering as `agent_id` is refused (it must be).
pub async fn registration_refused(
    master: &butte_master_lite::RunningMaster,
    agent_id: &str,
) -> String {
    use butte_api::agent_link::v1::agent_link_client::AgentLinkClient;
    use butte_api::agent_link::v1::{AgentMessage, Register, agent_message};
    use butte_api::mesos::v1::{AgentId, AgentInfo};
    let mut client = AgentLinkClient::connect(format!("http://{}", master.addr))
        .await
        .expect("grpc connects");
    let register = AgentMessage {
        kind: Some(agent_message::Kind::Register(Register {
            agent_info: AgentInfo {
                hostname: "127.0.0.1".into(),
                id: Some(AgentId {
                    value: agent_id.into(),
                }),
                ..Default::default()
            },
            total_resources: butte_api::resources::Resources::parse("cpus:1;mem:64")
                .expect("resources")
                .to_proto(None),
            ..Default::default()
        })),
    };
    let opened = client.session(tokio_stream::iter(vec![register])).await;
    let status = match opened {
        Err(status) => status,
        Ok(stream) => match stream.into_inner().message().await {
            Err(status) => status,
            Ok(first) => panic!("registration answered: {first:?}"),
        },
    };
    status.message().to_owned()
}
