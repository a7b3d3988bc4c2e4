//! Every id rule held by the agent itself, with no master in front of it: a
//! fake master on the agent link sends launches whose framework, task and
//! executor ids break each rule, acknowledges every update (acknowledging
//! once removed a directory outside the work dir), and the agent must answer
//! each with TASK_ERROR naming the field, while a canary directory where a
//! traversal would land survives and nothing appears outside the work dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use butte_api::agent_link::v1::agent_link_server::AgentLink;
use butte_api::agent_link::v1::{
    AgentMessage, LaunchTasks, MasterMessage, Registered, StatusAck, agent_message, master_message,
};
use butte_api::mesos::v1::{
    AgentId, CommandInfo, ExecutorId, ExecutorInfo, FrameworkId, FrameworkInfo, MasterInfo,
    Resource, TaskGroupInfo, TaskId, TaskInfo, TaskState, TaskStatus, executor_info, value,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod common;
use common::fake_master;

const PORT: u16 = 15_176;
const AGENT_PORT: u16 = 15_177;

/// Each id a client could send that the agent must refuse, and why.
fn bad_ids() -> Vec<(&'static str, String)> {
    vec![
        ("dot-dot", "..".to_owned()),
        ("dot", ".".to_owned()),
        ("empty", String::new()),
        ("slash", "../../../../var/tmp/butte-kt-canary".to_owned()),
        ("backslash", "a\\b".to_owned()),
        ("nul", "a\0b".to_owned()),
        ("control", "a\nb".to_owned()),
        ("long", "x".repeat(256)),
    ]
}

struct FakeMaster {
    updates: mpsc::UnboundedSender<(FrameworkId, TaskStatus)>,
    launches: std::sync::Mutex<Option<Vec<LaunchTasks>>>,
}

type MasterStream = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for FakeMaster {
    type SessionStream = MasterStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<MasterStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(64);
        let updates = self.updates.clone();
        let launches = self.launches.lock().unwrap().take().unwrap_or_default();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                match message.kind {
                    Some(agent_message::Kind::Register(_)) => {
                        let registered = Registered {
                            agent_id: AgentId {
                                value: "fake-S0".into(),
                            },
                            heartbeat_interval_seconds: 1.0,
                            master_info: MasterInfo {
                                id: "fake".into(),
                                ip: 0x7f00_0001,
                                port: u32::from(PORT),
                                ..Default::default()
                            },
                        };
                        let _ = out
                            .send(Ok(kind(master_message::Kind::Registered(registered))))
                            .await;
                        for launch in &launches {
                            let launch = kind(master_message::Kind::LaunchTasks(launch.clone()));
                            let _ = out.send(Ok(launch)).await;
                        }
                    }
                    Some(agent_message::Kind::StatusUpdate(update)) => {
                        // Acknowledge everything, as a master would.
                        let ack = StatusAck {
                            framework_id: update.framework_id.clone(),
                            task_id: update.status.task_id.clone(),
                            uuid: update.status.uuid.clone().unwrap_or_default(),
                        };
                        let _ = out
                            .send(Ok(kind(master_message::Kind::StatusAck(ack))))
                            .await;
                        let _ = updates.send((update.framework_id, update.status));
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn kind(kind: master_message::Kind) -> MasterMessage {
    MasterMessage { kind: Some(kind) }
}

fn scalar(name: &str, value: f64) -> Resource {
    Resource {
        name: name.into(),
        r#type: value::Type::Scalar as i32,
        scalar: Some(value::Scalar { value }),
        ..Default::default()
    }
}

fn task(task_id: &str) -> TaskInfo {
    TaskInfo {
        name: "t".into(),
        task_id: TaskId {
            value: task_id.into(),
        },
        agent_id: AgentId {
            value: "fake-S0".into(),
        },
        resources: vec![scalar("cpus", 0.01), scalar("mem", 8.0)],
        command: Some(CommandInfo {
            value: Some("true".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn framework(id: &str) -> FrameworkInfo {
    FrameworkInfo {
        id: Some(FrameworkId { value: id.into() }),
        name: "ids".into(),
        user: "root".into(),
        ..Default::default()
    }
}

/// One launch per bad id per field; the key is (framework id, task id) of
/// the update each must bring.
fn launches() -> (Vec<LaunchTasks>, HashMap<(String, String), &'static str>) {
    let mut launches = Vec::new();
    let mut expected = HashMap::new();
    for (name, bad) in bad_ids() {
        launches.push(LaunchTasks {
            framework_info: framework(&bad),
            tasks: vec![task(&format!("fw-{name}"))],
            ..Default::default()
        });
        expected.insert((bad.clone(), format!("fw-{name}")), "framework");
        launches.push(LaunchTasks {
            framework_info: framework("good-fw"),
            tasks: vec![task(&bad)],
            ..Default::default()
        });
        expected.insert(("good-fw".to_owned(), bad.clone()), "task");
        if bad.is_empty() {
            // A group's executor without an id is named after the group's
            // container by the agent (the master refuses it before that).
            continue;
        }
        let group_task = format!("exec-{name}");
        launches.push(LaunchTasks {
            framework_info: framework("good-fw"),
            executor: Some(ExecutorInfo {
                r#type: Some(executor_info::Type::Default as i32),
                executor_id: ExecutorId { value: bad.clone() },
                framework_id: Some(FrameworkId {
                    value: "good-fw".into(),
                }),
                resources: vec![scalar("cpus", 0.01), scalar("mem", 8.0)],
                ..Default::default()
            }),
            task_group: Some(TaskGroupInfo {
                tasks: vec![task(&group_task)],
            }),
            ..Default::default()
        });
        expected.insert(("good-fw".to_owned(), group_task), "executor");
    }
    (launches, expected)
}

#[test]
fn the_agent_refuses_every_bad_id_itself_and_nothing_outside_its_work_dir_moves() {
    let base = Path::new("/var/lib/butte-kernel-tests").join(format!("ids-{}", std::process::id()));
    // Where a traversal through the framework id would land, and a canary in it.
    let canary = Path::new("/var/tmp/butte-kt-canary");
    std::fs::create_dir_all(canary.join("inside")).unwrap();
    std::fs::write(canary.join("inside/keep"), "keep").unwrap();
    let before: Vec<_> = std::fs::read_dir("/var/tmp")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let (launches, expected) = launches();
    let master = FakeMaster {
        updates: updates_tx,
        launches: std::sync::Mutex::new(Some(launches)),
    };
    fake_master::serve(&runtime, PORT, master);
    let _agent = fake_master::start_agent(&base, PORT, AGENT_PORT, "ktids", "cpus:2;mem:1024");

    let mut seen: HashMap<(String, String), TaskStatus> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60) * common::slowdown();
    while seen.len() < expected.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let next = runtime.block_on(async { tokio::time::timeout(left, updates.recv()).await });
        let Ok(Some((framework_id, status))) = next else {
            let log = std::fs::read_to_string(base.join("agent.log")).unwrap_or_default();
            panic!(
                "{} of {} launches answered; missing {:?}\nagent log:\n{log}",
                seen.len(),
                expected.len(),
                expected
                    .keys()
                    .filter(|k| !seen.contains_key(*k))
                    .collect::<Vec<_>>()
            );
        };
        seen.insert((framework_id.value, status.task_id.value.clone()), status);
    }
    // Give every acknowledgement time to be acted on (once, it removed a dir).
    std::thread::sleep(Duration::from_secs(2));

    for (key, field) in &expected {
        let status = &seen[key];
        assert_eq!(status.state(), TaskState::TaskError, "{key:?}: {status:?}");
        let message = status.message.clone().unwrap_or_default();
        assert!(
            message.contains(field) || message.contains(&format!("{field}_id")),
            "{key:?}: the message names the {field} id: {message}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(canary.join("inside/keep")).unwrap(),
        "keep",
        "the canary outside the work dir survived"
    );
    let after: Vec<_> = std::fs::read_dir("/var/tmp")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(
        new.is_empty(),
        "nothing appeared next to the canary: {new:?}"
    );
    let escaped: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n != "agent" && n != "agent.log")
        .collect();
    assert!(
        escaped.is_empty(),
        "nothing beside the work dir: {escaped:?}"
    );
    std::fs::remove_dir_all(canary).unwrap();
    drop(_agent);
    std::fs::remove_dir_all(&base).unwrap();
}
