//! HTTP authentication of frameworks and operators, through a real master:
//! credentials as Mesos reads them, 401 with the realm for a wrong or
//! missing secret, a framework bound to the principal that registered it,
//! and an address that keeps failing refused without slowing anyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use butte_master_lite::{MasterConfig, RunningMaster, StartError};
use serde_json::json;
use support::{Scheduler, TestAgent, basic_client, run_sleeper};

const CREDENTIALS: &str = r#"{"credentials": [
    {"principal": "alice", "secret": "alice-secret"},
    {"principal": "bob", "secret": "bob-secret"}
]}"#;

fn credentials_file(dir: &std::path::Path, mode: u32) -> PathBuf {
    let path = dir.join("credentials.json");
    std::fs::write(&path, CREDENTIALS).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

async fn authenticating_master(name: &str) -> RunningMaster {
    let dir = support::work_dir(name);
    let mut config = MasterConfig::for_work_dir(dir.clone());
    config.credentials = Some(credentials_file(&dir, 0o600));
    config.authenticate_frameworks = true;
    config.authenticate_http_readwrite = true;
    config.authenticate_http_readonly = true;
    support::master_with(config).await
}

async fn subscribe_status(client: &reqwest::Client, master: &RunningMaster) -> reqwest::Response {
    client
        .post(format!("http://{}/api/v1/scheduler", master.addr))
        .header("Content-Type", "application/json")
        .body(
            json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "nobody", "name": "x"}}})
                .to_string(),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frameworks_subscribe_with_their_secret_and_others_get_401() {
    let master = authenticating_master("auth-subscribe").await;
    let mut alice = Scheduler::subscribe_as(
        &master,
        json!({"user": "nobody", "name": "alice's"}),
        "alice",
        "alice-secret",
    )
    .await;
    // The principal it authenticated as is the framework's.
    let frameworks = support::get_json_with(
        &basic_client("alice", "alice-secret"),
        &master,
        "/frameworks",
    )
    .await;
    assert_eq!(
        frameworks["frameworks"][0]["principal"], "alice",
        "{frameworks}"
    );
    let _agent = TestAgent::connect(&master, "cpus:2;mem:1024").await;
    run_sleeper(&mut alice, "t1").await;

    let wrong = subscribe_status(&basic_client("alice", "guess"), &master).await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.headers()["WWW-Authenticate"],
        "Basic realm=\"mesos-master-scheduler\""
    );
    let anonymous = subscribe_status(&reqwest::Client::new(), &master).await;
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.text().await.unwrap().contains("HTTP Basic"),
        "says what is missing"
    );
    // A principal other than the one it authenticated as is refused.
    let claimed = basic_client("bob", "bob-secret")
        .post(format!("http://{}/api/v1/scheduler", master.addr))
        .header("Content-Type", "application/json")
        .body(json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "nobody", "name": "x", "principal": "alice"}}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(claimed.status(), 403);
    // Operator endpoints too; /health stays open.
    let state = reqwest::get(format!("http://{}/state", master.addr))
        .await
        .unwrap();
    assert_eq!(state.status(), 401);
    assert_eq!(
        state.headers()["WWW-Authenticate"],
        "Basic realm=\"mesos-master-readonly\""
    );
    let operator = reqwest::Client::new()
        .post(format!("http://{}/api/v1", master.addr))
        .header("Content-Type", "application/json")
        .body(json!({"type": "GET_HEALTH"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(operator.status(), 401);
    let health = reqwest::get(format!("http://{}/health", master.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    master.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_principal_cannot_take_a_framework_over() {
    let master = authenticating_master("auth-takeover").await;
    let mut alice = Scheduler::subscribe_as(
        &master,
        json!({"user": "nobody", "name": "alice's", "failover_timeout": 600.0}),
        "alice",
        "alice-secret",
    )
    .await;
    let agent = TestAgent::connect(&master, "cpus:2;mem:1024").await;
    run_sleeper(&mut alice, "kept").await;
    let id = json!({"value": alice.framework_id});
    let bob = basic_client("bob", "bob-secret");
    let url = format!("http://{}/api/v1/scheduler", master.addr);
    // Subscribing with alice's framework id, as bob.
    let takeover = bob
        .post(&url)
        .header("Content-Type", "application/json")
        .body(
            json!({"type": "SUBSCRIBE", "framework_id": id,
            "subscribe": {"framework_info": {"user": "nobody", "name": "alice's", "id": id}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(takeover.status(), 403);
    assert!(
        takeover.text().await.unwrap().contains("principal 'alice'"),
        "says whose it is"
    );
    // Calls for alice's framework with its stream id, as bob: TEARDOWN too.
    for call in [
        json!({"type": "TEARDOWN"}),
        json!({"type": "KILL", "kill": {"task_id": {"value": "kept"}}}),
    ] {
        let mut call = call;
        call["framework_id"] = id.clone();
        let refused = bob
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", &alice.stream_id)
            .body(call.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{call}");
    }
    // Alice's task runs on, and her own calls still work.
    assert!(
        alice.gets_within("UPDATE", 500).await.is_none(),
        "no update: the task was not killed"
    );
    let frameworks = support::get_json_with(
        &basic_client("alice", "alice-secret"),
        &master,
        "/frameworks",
    )
    .await;
    assert_eq!(
        frameworks["frameworks"][0]["tasks"][0]["state"], "TASK_RUNNING",
        "{frameworks}"
    );
    assert_eq!(
        alice
            .call(json!({"type": "RECONCILE", "reconcile": {"tasks": []}}))
            .await,
        202
    );
    drop(agent);
    master.shutdown().await;
}

#[tokio::test]
async fn a_credentials_file_others_can_read_stops_the_master_with_the_reason() {
    let dir = support::work_dir("auth-exposed");
    let mut config = MasterConfig::for_work_dir(dir.clone());
    config.credentials = Some(credentials_file(&dir, 0o644));
    config.authenticate_frameworks = true;
    let refused = butte_master_lite::start(config).await.err().unwrap();
    assert!(matches!(refused, StartError::Credentials(_)));
    let reason = refused.to_string();
    assert!(
        reason.contains("0644") && reason.contains("chmod 600"),
        "{reason}"
    );
    let mut config = MasterConfig::for_work_dir(dir);
    config.authenticate_http_readonly = true;
    let missing = butte_master_lite::start(config).await.err().unwrap();
    assert!(missing.to_string().contains("--credentials"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_wrong_secrets_from_one_address_lock_it_out_and_slow_nobody_else() {
    let master = authenticating_master("auth-flood").await;
    let url = format!("http://{}/state", master.addr);
    // The attacker: another loopback address.
    let attacker = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let flood = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::new();
            for _ in 0..10_000 {
                let status = attacker
                    .get(&url)
                    .basic_auth("alice", Some("guess"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                *statuses.entry(status).or_insert(0u32) += 1;
            }
            statuses
        })
    };
    // Meanwhile the operator, from 127.0.0.1: /health and her own reads.
    let operator = basic_client("alice", "alice-secret");
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        let started = Instant::now();
        let health = operator
            .get(format!("http://{}/health", master.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let state = operator.get(&url).send().await.unwrap();
        assert_eq!(state.status(), 200, "the operator is not locked out");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = flood.await.unwrap();
    assert_eq!(statuses.get(&401), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&9_990), "{statuses:?}");
    // Not a timing target: a bound far above a /health round trip, to
    // catch the flood stalling the master (a lock held, a queue).
    assert!(
        slowest < Duration::from_secs(2),
        "/health and /state took {slowest:?} during the flood"
    );
    master.shutdown().await;
}

const ACLS: &str = r#"{
  "permissive": true,
  "register_frameworks": [
    {"principals": {"values": ["alice"]}, "roles": {"values": ["a"]}},
    {"principals": {"values": ["alice"]}, "roles": {"type": "NONE"}}
  ],
  "run_tasks": [
    {"principals": {"values": ["alice"]}, "users": {"values": ["nobody"]}},
    {"principals": {"values": ["alice"]}, "users": {"type": "NONE"}}
  ],
  "view_frameworks": [
    {"principals": {"values": ["bob"]}, "users": {"values": ["bob-user"]}},
    {"principals": {"values": ["bob"]}, "users": {"type": "NONE"}}
  ],
  "view_tasks": [
    {"principals": {"values": ["bob"]}, "users": {"values": ["bob-user"]}},
    {"principals": {"values": ["bob"]}, "users": {"type": "NONE"}}
  ],
  "mark_agents_gone": [
    {"principals": {"values": ["ops"]}, "agents": {"type": "ANY"}},
    {"principals": {"type": "ANY"}, "agents": {"type": "NONE"}}
  ],
  "teardown_frameworks": [
    {"principals": {"values": ["ops"]}, "framework_principals": {"type": "ANY"}},
    {"principals": {"type": "ANY"}, "framework_principals": {"type": "NONE"}}
  ]
}"#;

async fn operator_call(
    master: &RunningMaster,
    principal: &str,
    call: serde_json::Value,
) -> reqwest::Response {
    basic_client(principal, &format!("{principal}-secret"))
        .post(format!("http://{}/api/v1", master.addr))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(call.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_hold_roles_users_views_and_operator_calls_to_their_principals() {
    let dir = support::work_dir("auth-acls");
    let mut config = MasterConfig::for_work_dir(dir.clone());
    let credentials = dir.join("credentials");
    std::fs::write(
        &credentials,
        "alice alice-secret\nbob bob-secret\nops ops-secret\n",
    )
    .unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
    let acls = dir.join("acls.json");
    std::fs::write(&acls, ACLS).unwrap();
    config.credentials = Some(credentials);
    config.acls = Some(acls);
    config.authenticate_frameworks = true;
    config.authenticate_http_readwrite = true;
    config.authenticate_http_readonly = true;
    let master = support::master_with(config).await;
    let agent = TestAgent::connect(&master, "cpus:4;mem:4096").await;

    // Alice may register in role a only.
    let in_b = basic_client("alice", "alice-secret")
        .post(format!("http://{}/api/v1/scheduler", master.addr))
        .header("Content-Type", "application/json")
        .body(json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "nobody", "name": "x", "roles": ["b"], "capabilities": [{"type": "MULTI_ROLE"}]}}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(in_b.status(), 403);
    let why = in_b.text().await.unwrap();
    assert!(
        why.contains("register_frameworks") && why.contains("'b'"),
        "{why}"
    );
    let mut alice = Scheduler::subscribe_as(
        &master,
        json!({"user": "nobody", "name": "alice's", "roles": ["a"], "capabilities": [{"type": "MULTI_ROLE"}]}),
        "alice",
        "alice-secret",
    )
    .await;

    // Alice's tasks run as nobody, not as root.
    let offers = alice.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];
    let mut call = support::launch(
        offer,
        &[
            ("as-root", "sleep 600", 1.0, 64.0),
            ("as-nobody", "sleep 600", 1.0, 64.0),
        ],
    );
    call["accept"]["operations"][0]["launch"]["task_infos"][0]["command"]["user"] = json!("root");
    assert_eq!(alice.call(call).await, 202);
    let refused = alice.await_state("as-root", "TASK_ERROR", 5).await;
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("run_tasks") && message.contains("'root'"),
        "{refused}"
    );
    alice.await_state("as-nobody", "TASK_RUNNING", 5).await;

    // Bob sees only frameworks and tasks of bob-user: none of alice's.
    let state = |principal: &'static str| {
        let master = &master;
        async move {
            let client = basic_client(principal, &format!("{principal}-secret"));
            support::get_json_with(&client, master, "/state").await
        }
    };
    assert_eq!(
        state("alice").await["frameworks"].as_array().unwrap().len(),
        1
    );
    assert_eq!(
        state("bob").await["frameworks"].as_array().unwrap().len(),
        0
    );
    let tasks = support::get_json_with(&basic_client("bob", "bob-secret"), &master, "/tasks").await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 0, "{tasks}");
    let get_state: serde_json::Value = operator_call(&master, "bob", json!({"type": "GET_STATE"}))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        get_state["get_state"]["get_frameworks"]["frameworks"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{get_state}"
    );
    assert!(
        get_state["get_state"]["get_tasks"]["tasks"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{get_state}"
    );

    // Only ops marks agents gone and tears frameworks down.
    let gone = operator_call(&master, "bob", json!({"type": "MARK_AGENT_GONE", "mark_agent_gone": {"agent_id": {"value": agent.agent_id}}})).await;
    assert_eq!(gone.status(), 403);
    assert!(gone.text().await.unwrap().contains("mark_agents_gone"));
    let teardown =
        json!({"type": "TEARDOWN", "teardown": {"framework_id": {"value": alice.framework_id}}});
    let refused = operator_call(&master, "bob", teardown.clone()).await;
    assert_eq!(refused.status(), 403);
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("teardown_frameworks")
    );
    assert_eq!(
        state("alice").await["frameworks"].as_array().unwrap().len(),
        1,
        "still there"
    );
    assert_eq!(operator_call(&master, "ops", teardown).await.status(), 200);
    assert_eq!(
        state("ops").await["frameworks"].as_array().unwrap().len(),
        0,
        "torn down"
    );
    master.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_report_on_another_agents_tasks() {
    let master = support::master("auth-other-agent").await;
    let mut scheduler = Scheduler::subscribe(&master, json!({"user": "nobody", "name": "x"})).await;
    let first = TestAgent::connect(&master, "cpus:2;mem:1024").await;
    run_sleeper(&mut scheduler, "kept").await;
    let second = TestAgent::connect(&master, "cpus:2;mem:1024").await;
    // The second agent says the first one's task failed.
    second.send_update(
        &scheduler.framework_id,
        "kept",
        butte_api::mesos::v1::TaskState::TaskFailed,
    );
    assert!(
        scheduler.gets_within("UPDATE", 1000).await.is_none(),
        "no update reaches the framework"
    );
    let tasks = support::get_json(&master, "/tasks").await;
    assert_eq!(tasks["tasks"][0]["state"], "TASK_RUNNING", "{tasks}");
    assert_eq!(tasks["tasks"][0]["slave_id"], first.agent_id.as_str());
    master.shutdown().await;
}
