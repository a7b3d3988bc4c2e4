//! The scheduler API end to end: a JSON scheduler and an agent on the real
//! gRPC link against a master on a free port.

mod support;

use std::time::Duration;

use butte_api::mesos::v1::TaskState;
use serde_json::json;
use support::{Scheduler, TestAgent, launch, master};

fn framework(name: &str) -> serde_json::Value {
    json!({"user": "root", "name": name, "failover_timeout": 60})
}

#[tokio::test]
async fn offers_launch_and_updates_flow_to_acknowledged_finish() {
    let master = master("flow").await;
    let agent = TestAgent::connect(&master, "cpus:4;mem:4096;ports:[31000-32000]").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("flow")).await;

    let offers = scheduler.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];
    assert_eq!(offer["agent_id"]["value"], agent.agent_id.as_str());
    let names: Vec<&str> = offer["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"cpus") && names.contains(&"mem") && names.contains(&"ports"),
        "{offer}"
    );
    assert_eq!(offer["resources"][0]["allocation_info"]["role"], "*");

    assert_eq!(
        scheduler
            .call(launch(offer, &[("t1", "echo hi", 1.0, 128.0)]))
            .await,
        202
    );
    let finished = scheduler.await_state("t1", "TASK_FINISHED", 5).await;
    assert_eq!(finished["agent_id"]["value"], agent.agent_id.as_str());
    assert!(
        finished["uuid"].is_string(),
        "agent updates carry a uuid: {finished}"
    );

    // Acknowledged all the way: the agent holds nothing unacknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        agent.unacked.lock().unwrap().is_empty(),
        "every update acknowledged back to the agent"
    );
    let state: serde_json::Value = support::get_json(&master, "/state").await;
    assert_eq!(
        state["frameworks"][0]["completed_tasks"][0]["state"], "TASK_FINISHED",
        "{state}"
    );
    master.shutdown().await;
}

#[tokio::test]
async fn invalid_tasks_get_task_error_with_the_reason() {
    let master = master("invalid").await;
    let _agent = TestAgent::connect(&master, "cpus:4;mem:4096").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("invalid")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];

    let call = launch(
        offer,
        &[
            ("empty", "  ", 1.0, 64.0),
            ("greedy", "true", 64.0, 64.0),
            ("ok", "sleep 60", 1.0, 64.0),
            ("ok", "true", 0.5, 32.0),
        ],
    );
    assert_eq!(scheduler.call(call).await, 202);
    let mut errors = std::collections::HashMap::new();
    while errors.len() < 3 {
        let status = scheduler.next("UPDATE", 5).await["update"]["status"].clone();
        scheduler.ack(&status).await;
        if status["state"] == "TASK_ERROR" {
            errors.insert(
                status["task_id"]["value"].as_str().unwrap().to_owned() + &errors.len().to_string(),
                status["message"].as_str().unwrap().to_owned(),
            );
        }
    }
    let messages: Vec<&String> = errors.values().collect();
    assert!(
        messages.iter().any(|m| m.contains("empty command")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("more than the offers hold")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("already in use")),
        "{messages:?}"
    );

    // An offer that no longer exists: the tasks are lost with the reason.
    let stale = launch(offer, &[("late", "true", 0.1, 32.0)]);
    assert_eq!(scheduler.call(stale).await, 202);
    let status = loop {
        let status = scheduler.next("UPDATE", 5).await["update"]["status"].clone();
        scheduler.ack(&status).await;
        if status["task_id"]["value"] == "late" {
            break status;
        }
    };
    assert_eq!(status["state"], "TASK_LOST");
    assert_eq!(status["reason"], "REASON_INVALID_OFFERS");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("no longer valid")
    );
    master.shutdown().await;
}

#[tokio::test]
async fn kill_reconcile_and_teardown() {
    let master = master("kill").await;
    let agent = TestAgent::connect(&master, "cpus:4;mem:4096").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("kill")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];
    assert_eq!(
        scheduler
            .call(launch(offer, &[("long", "sleep 600", 1.0, 64.0)]))
            .await,
        202
    );
    scheduler.await_state("long", "TASK_RUNNING", 5).await;

    // Explicit reconciliation of a known and an unknown task; no uuid, nothing to acknowledge.
    let reconcile = json!({"type": "RECONCILE", "reconcile": {"tasks": [{"task_id": {"value": "long"}}, {"task_id": {"value": "ghost"}}]}});
    assert_eq!(scheduler.call(reconcile).await, 202);
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let status = scheduler.next("UPDATE", 5).await["update"]["status"].clone();
        assert!(status.get("uuid").is_none(), "{status}");
        assert_eq!(status["reason"], "REASON_RECONCILIATION");
        seen.insert(
            status["task_id"]["value"].as_str().unwrap().to_owned(),
            status["state"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(seen["long"], "TASK_RUNNING");
    assert_eq!(seen["ghost"], "TASK_LOST");

    assert_eq!(
        scheduler
            .call(json!({"type": "KILL", "kill": {"task_id": {"value": "long"}}}))
            .await,
        202
    );
    scheduler.await_state("long", "TASK_KILLED", 5).await;

    assert_eq!(scheduler.call(json!({"type": "TEARDOWN"})).await, 202);
    let frameworks: serde_json::Value = support::get_json(&master, "/frameworks").await;
    assert_eq!(frameworks["frameworks"].as_array().unwrap().len(), 0);
    assert_eq!(
        frameworks["completed_frameworks"].as_array().unwrap().len(),
        1
    );
    // A torn-down framework's calls are refused.
    assert_eq!(scheduler.call(json!({"type": "REVIVE"})).await, 403);
    drop(agent);
    master.shutdown().await;
}

#[tokio::test]
async fn decline_filters_and_suppress_then_revive() {
    let master = master("decline").await;
    let _agent = TestAgent::connect(&master, "cpus:2;mem:2048").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("decline")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let decline = json!({"type": "DECLINE", "decline": {"offer_ids": [offers["offers"]["offers"][0]["id"]], "filters": {"refuse_seconds": 1.5}}});
    assert_eq!(scheduler.call(decline).await, 202);
    assert!(
        scheduler.gets_within("OFFERS", 1000).await.is_none(),
        "filtered for 1.5 s"
    );
    let again = scheduler
        .gets_within("OFFERS", 2000)
        .await
        .expect("offered again once the filter expired");

    // Suppressed, a declined offer does not come back even without a filter.
    assert_eq!(scheduler.call(json!({"type": "SUPPRESS"})).await, 202);
    let decline = json!({"type": "DECLINE", "decline": {"offer_ids": [again["offers"]["offers"][0]["id"]], "filters": {"refuse_seconds": 0}}});
    assert_eq!(scheduler.call(decline).await, 202);
    assert!(
        scheduler.gets_within("OFFERS", 1200).await.is_none(),
        "suppressed"
    );
    assert_eq!(scheduler.call(json!({"type": "REVIVE"})).await, 202);
    assert!(
        scheduler.gets_within("OFFERS", 2000).await.is_some(),
        "revived"
    );
    master.shutdown().await;
}

#[tokio::test]
async fn agent_going_away_rescinds_its_offers() {
    let master = master("rescind").await;
    let agent = TestAgent::connect(&master, "cpus:2;mem:2048").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("rescind")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer_id = offers["offers"]["offers"][0]["id"].clone();
    agent.disconnect();
    let rescind = scheduler.next("RESCIND", 5).await;
    assert_eq!(rescind["rescind"]["offer_id"], offer_id);
    master.shutdown().await;
}

#[tokio::test]
async fn resubscribing_scheduler_keeps_its_tasks_and_gets_pending_updates() {
    let master = master("failover").await;
    let agent = TestAgent::connect(&master, "cpus:2;mem:2048").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("failover")).await;
    support::run_sleeper(&mut scheduler, "keep").await;
    let framework_id = scheduler.framework_id.clone();
    scheduler.disconnect();

    // While the scheduler is away the task changes state; the update waits for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.send_update(&framework_id, "keep", TaskState::TaskFailed);

    let mut info = framework("failover");
    info["id"] = json!({"value": framework_id});
    let mut again = Scheduler::subscribe(&master, info).await;
    assert_eq!(again.framework_id, framework_id);
    let status = again.await_state("keep", "TASK_FAILED", 5).await;
    assert!(status["uuid"].is_string());
    master.shutdown().await;
}

#[tokio::test]
async fn master_restart_keeps_frameworks_agents_and_tasks() {
    let dir = support::work_dir("restart");
    let first =
        support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir.clone())).await;
    let agent = TestAgent::connect(&first, "cpus:2;mem:2048").await;
    let mut scheduler = Scheduler::subscribe(&first, framework("restart")).await;
    support::run_sleeper(&mut scheduler, "survivor").await;
    let (framework_id, agent_id) = (scheduler.framework_id.clone(), agent.agent_id.clone());
    scheduler.disconnect();
    agent.disconnect();
    first.shutdown().await;

    let second = support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir)).await;
    let tasks: serde_json::Value = support::get_json(&second, "/tasks").await;
    assert_eq!(tasks["tasks"][0]["id"], "survivor", "{tasks}");
    assert_eq!(tasks["tasks"][0]["state"], "TASK_RUNNING");
    assert_eq!(tasks["tasks"][0]["framework_id"], framework_id.as_str());

    // The agent comes back with its task; the scheduler re-subscribes with its id and can kill it.
    let running = support::running_task(&framework_id, &agent_id, "survivor");
    let back = TestAgent::connect_as(
        &second,
        "cpus:2;mem:2048",
        Some(agent_id.clone()),
        vec![running],
    )
    .await;
    assert_eq!(back.agent_id, agent_id);
    let mut info = framework("restart");
    info["id"] = json!({"value": framework_id});
    let mut scheduler = Scheduler::subscribe(&second, info).await;
    // Only what the task does not use is offered.
    let offers = scheduler.next("OFFERS", 5).await;
    let cpus = offers["offers"]["offers"][0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "cpus")
        .unwrap()["scalar"]["value"]
        .as_f64()
        .unwrap();
    assert_eq!(cpus, 1.0);
    assert_eq!(
        scheduler
            .call(json!({"type": "KILL", "kill": {"task_id": {"value": "survivor"}}}))
            .await,
        202
    );
    scheduler.await_state("survivor", "TASK_KILLED", 5).await;
    second.shutdown().await;
}

#[tokio::test]
async fn task_group_launches_whole_on_one_agent() {
    let master = master("group").await;
    let agent = TestAgent::connect(&master, "cpus:4;mem:4096").await;
    let mut scheduler = Scheduler::subscribe(&master, framework("group")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];
    let task = |id: &str| {
        json!({"name": id, "task_id": {"value": id}, "agent_id": offer["agent_id"],
        "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.5}}], "command": {"value": "true"}})
    };
    let call = json!({"type": "ACCEPT", "accept": {"offer_ids": [offer["id"]], "operations": [{"type": "LAUNCH_GROUP", "launch_group": {
        "executor": {"type": "DEFAULT", "executor_id": {"value": "ex"}, "framework_id": {"value": scheduler.framework_id},
                     "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                                   {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]},
        "task_group": {"tasks": [task("g1"), task("g2"), task("g3")]}}}]}});
    assert_eq!(scheduler.call(call).await, 202);
    for id in ["g1", "g2", "g3"] {
        let _ = id;
    }
    let mut finished = std::collections::HashSet::new();
    while finished.len() < 3 {
        let status = scheduler.next("UPDATE", 5).await["update"]["status"].clone();
        scheduler.ack(&status).await;
        if status["state"] == "TASK_FINISHED" {
            finished.insert(status["task_id"]["value"].as_str().unwrap().to_owned());
        }
    }
    let launches: Vec<_> = agent
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            butte_api::agent_link::v1::master_message::Kind::LaunchTasks(l) => Some(l.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(launches.len(), 1, "one launch message for the whole group");
    assert_eq!(launches[0].task_group.as_ref().unwrap().tasks.len(), 3);
    assert_eq!(
        launches[0].executor.as_ref().unwrap().executor_id.value,
        "ex"
    );
    master.shutdown().await;
}

#[tokio::test]
async fn protobuf_subscribers_get_protobuf_events() {
    use butte_api::mesos::v1::scheduler::{Call, Event, call, event};
    use prost::Message;
    let master = master("protobuf").await;
    let call = Call {
        r#type: Some(call::Type::Subscribe as i32),
        subscribe: Some(call::Subscribe {
            framework_info: butte_api::mesos::v1::FrameworkInfo {
                user: "root".into(),
                name: "pb".into(),
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut response = reqwest::Client::new()
        .post(format!("http://{}/master/api/v1/scheduler", master.addr))
        .header("Content-Type", "application/x-protobuf")
        .header("Accept", "application/x-protobuf")
        .body(call.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    let mut decoder = butte_api::recordio::Decoder::new(1 << 20);
    let record = loop {
        let chunk = response.chunk().await.unwrap().unwrap();
        if let Some(record) = decoder.feed(&chunk).unwrap().into_iter().next() {
            break record;
        }
    };
    let event = Event::decode(record.as_slice()).unwrap();
    assert_eq!(event.r#type(), event::Type::Subscribed);
    assert!(
        event
            .subscribed
            .unwrap()
            .framework_id
            .value
            .starts_with(&master.shared.lock().info.id)
    );
    master.shutdown().await;
}

#[tokio::test]
async fn a_task_reported_lost_stays_lost_when_its_agent_returns_and_is_killed_there() {
    let mut config = butte_master_lite::MasterConfig::for_work_dir(support::work_dir("lost-stays"));
    // Heard from every 300 ms (TestAgent's heartbeat); unreachable 1 s after the last word.
    config.agent_ping_timeout = Duration::from_secs(1);
    config.max_agent_ping_timeouts = 1;
    let master = support::master_with(config).await;
    let agent = TestAgent::connect(&master, "cpus:2;mem:2048").await;
    let agent_id = agent.agent_id.clone();
    let mut scheduler = Scheduler::subscribe(&master, framework("lost-stays")).await;
    support::run_sleeper(&mut scheduler, "held").await;
    agent.disconnect();
    // Not PARTITION_AWARE: past the re-register timeout the task is LOST.
    scheduler.await_state("held", "TASK_LOST", 10).await;

    // The agent comes back, still running it.
    let task = support::running_task(&scheduler.framework_id, &agent_id, "held");
    let back = TestAgent::connect_as(&master, "cpus:2;mem:2048", Some(agent_id), vec![task]).await;
    // The framework was told the task ended: it stays ended (no RUNNING
    // after LOST), and the agent is told to kill it, as Mesos does for a
    // framework that is not partition-aware.
    let later = scheduler.gets_within("UPDATE", 1500).await;
    assert!(later.is_none(), "nothing after LOST: {later:?}");
    let killed = back.received.lock().unwrap().iter().any(|kind| {
        matches!(kind, butte_api::agent_link::v1::master_message::Kind::KillTask(kill) if kill.task_id.value == "held")
    });
    assert!(killed, "the returning agent is told to kill the lost task");
    let tasks: serde_json::Value = support::get_json(&master, "/tasks").await;
    let held: Vec<_> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"] == "held")
        .collect();
    assert_eq!(held.len(), 1, "{tasks}");
    assert_eq!(held[0]["state"], "TASK_LOST", "{tasks}");
    master.shutdown().await;
}

#[tokio::test]
async fn after_a_master_restart_a_framework_with_failover_timeout_0_has_time_to_resubscribe() {
    let dir = support::work_dir("restart-zero");
    let first =
        support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir.clone())).await;
    let agent = TestAgent::connect(&first, "cpus:2;mem:2048").await;
    let zero = || json!({"user": "root", "name": "zero", "failover_timeout": 0});
    let mut scheduler = Scheduler::subscribe(&first, zero()).await;
    support::run_sleeper(&mut scheduler, "kept").await;
    let framework_id = scheduler.framework_id.clone();
    agent.disconnect();
    first.shutdown().await;
    drop(scheduler);

    let mut config = butte_master_lite::MasterConfig::for_work_dir(dir);
    config.agent_reregister_timeout = Duration::from_secs(3);
    let second = support::master_with(config).await;
    // Many ticks later, but within the agents' re-register window: the
    // framework is still there, though its own failover_timeout is 0.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let frameworks = reqwest::get(format!("http://{}/frameworks", second.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        frameworks.contains(&framework_id),
        "kept for its scheduler to find the new master: {frameworks}"
    );
    let mut info = zero();
    info["id"] = json!({"value": framework_id});
    let _again = Scheduler::subscribe(&second, info).await;
    let tasks: serde_json::Value = support::get_json(&second, "/tasks").await;
    assert_eq!(tasks["tasks"][0]["id"], "kept", "{tasks}");
    assert_eq!(tasks["tasks"][0]["state"], "TASK_RUNNING", "{tasks}");
    second.shutdown().await;
}

#[tokio::test]
async fn an_agent_marked_gone_ends_its_tasks_and_is_never_admitted_again() {
    let dir = support::work_dir("gone");
    let first =
        support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir.clone())).await;
    let agent = TestAgent::connect(&first, "cpus:4;mem:4096").await;
    let mut aware = Scheduler::subscribe(
        &first,
        json!({"user": "root", "name": "aware", "capabilities": [{"type": "PARTITION_AWARE"}]}),
    )
    .await;
    support::run_sleeper(&mut aware, "aware-task").await;
    let mut plain = Scheduler::subscribe(&first, framework("plain")).await;
    support::run_sleeper(&mut plain, "plain-task").await;

    let api = format!("http://{}/api/v1", first.addr);
    let mark = |id: &str| {
        let body =
            json!({"type": "MARK_AGENT_GONE", "mark_agent_gone": {"agent_id": {"value": id}}});
        let api = api.clone();
        async move {
            reqwest::Client::new()
                .post(api)
                .json(&body)
                .send()
                .await
                .expect("posted")
                .status()
        }
    };
    assert_eq!(mark("no-such-agent").await, 404);
    assert_eq!(mark(&agent.agent_id).await, 200);
    assert_eq!(
        mark(&agent.agent_id).await,
        200,
        "marking again changes nothing"
    );

    let gone = aware
        .await_state("aware-task", "TASK_GONE_BY_OPERATOR", 5)
        .await;
    assert_eq!(gone["reason"], "REASON_AGENT_REMOVED_BY_OPERATOR", "{gone}");
    let lost = plain.await_state("plain-task", "TASK_LOST", 5).await;
    assert_eq!(lost["reason"], "REASON_AGENT_REMOVED_BY_OPERATOR", "{lost}");
    let refused = support::registration_refused(&first, &agent.agent_id).await;
    assert!(
        refused.contains("marked agent") && refused.contains("gone"),
        "{refused}"
    );

    // Still gone after the master restarts.
    let agent_id = agent.agent_id.clone();
    agent.disconnect();
    aware.disconnect();
    plain.disconnect();
    first.shutdown().await;
    let second = support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir)).await;
    let refused = support::registration_refused(&second, &agent_id).await;
    assert!(refused.contains("gone"), "{refused}");
    let agents = support::get_json(&second, "/slaves").await;
    assert_eq!(
        agents["slaves"].as_array().map(Vec::len),
        Some(0),
        "{agents}"
    );
}

#[tokio::test]
async fn a_launch_lost_with_the_link_goes_again_when_the_agent_returns() {
    let master = master("relaunch").await;
    let agent = TestAgent::connect(&master, "cpus:2;mem:1024").await;
    agent.drop_launches();
    let mut scheduler = Scheduler::subscribe(&master, framework("relaunch")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let call = launch(
        &offers["offers"]["offers"][0],
        &[("drifter", "sleep 600", 1.0, 64.0)],
    );
    assert_eq!(scheduler.call(call).await, 202);
    assert!(
        scheduler.gets_within("UPDATE", 500).await.is_none(),
        "the launch never reached the agent"
    );
    let agent_id = agent.agent_id.clone();
    agent.disconnect();
    // Back on a new link, without the task: its launch goes again, and it
    // runs (it is not reported lost first: LOST would be final).
    let _back = TestAgent::connect_as(&master, "cpus:2;mem:1024", Some(agent_id), vec![]).await;
    scheduler.await_state("drifter", "TASK_RUNNING", 5).await;
}

#[tokio::test]
async fn a_launch_lost_before_a_master_restart_goes_again_from_the_registry() {
    let dir = support::work_dir("relaunch-restart");
    let first =
        support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir.clone())).await;
    let agent = TestAgent::connect(&first, "cpus:2;mem:1024").await;
    agent.drop_launches();
    let mut scheduler = Scheduler::subscribe(&first, framework("relaunch-restart")).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let call = launch(
        &offers["offers"]["offers"][0],
        &[("drifter", "sleep 600", 1.0, 64.0)],
    );
    assert_eq!(scheduler.call(call).await, 202);
    let (framework_id, agent_id) = (scheduler.framework_id.clone(), agent.agent_id.clone());
    scheduler.disconnect();
    agent.disconnect();
    first.shutdown().await;

    let second = support::master_with(butte_master_lite::MasterConfig::for_work_dir(dir)).await;
    let mut scheduler = Scheduler::subscribe_raw(
        &second,
        json!({"type": "SUBSCRIBE", "framework_id": {"value": framework_id},
               "subscribe": {"framework_info": {"user": "root", "name": "relaunch-restart",
                   "failover_timeout": 60, "id": {"value": framework_id}}}}),
    )
    .await;
    let _back = TestAgent::connect_as(&second, "cpus:2;mem:1024", Some(agent_id), vec![]).await;
    scheduler.await_state("drifter", "TASK_RUNNING", 5).await;
}
