//! Malformed and hostile input gets a clear 4xx, never a panic, and the
//! master keeps serving afterwards.

#![allow(clippy::unwrap_used)]

mod support;

/// What is sent, and what must come back: (case, content type, body, status, words in the message).
type Case = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    StatusCode,
    &'static str,
);

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Scheduler, TestAgent};

async fn post(
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    stream_id: Option<&str>,
) -> (StatusCode, String) {
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    if let Some(stream_id) = stream_id {
        request = request.header("Mesos-Stream-Id", stream_id);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn hostile_scheduler_calls_get_clear_4xx_and_the_master_keeps_serving() {
    let mut config = butte_master_lite::MasterConfig::for_work_dir(support::work_dir("hostile"));
    config.max_request_bytes = 64 * 1024;
    let master = support::master_with(config).await;
    let _agent = TestAgent::connect(&master, "cpus:2;mem:2048;ports:[31000-31010]").await;
    let url = format!("http://{}/api/v1/scheduler", master.addr);
    let json = Some("application/json");

    let cases: Vec<Case> = vec![
        ("bad JSON", json, b"{\"type\": SUBSCRIBE".to_vec(), StatusCode::BAD_REQUEST, "Failed to parse"),
        ("not an object", json, b"[1,2,3]".to_vec(), StatusCode::BAD_REQUEST, "Failed to parse"),
        ("deep nesting", json, "[".repeat(100_000).into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, "exceeds the limit"),
        ("deep nesting within limit", json, format!("{{\"subscribe\":{}", "[".repeat(10_000)).into_bytes(), StatusCode::BAD_REQUEST, "Failed to parse"),
        ("wrong content type", Some("text/plain"), b"{}".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type"),
        ("no content type", None, b"{}".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type"),
        ("unknown call type", json, br#"{"type": "FROBNICATE"}"#.to_vec(), StatusCode::BAD_REQUEST, "FROBNICATE"),
        ("no call type", json, b"{}".to_vec(), StatusCode::BAD_REQUEST, "'type'"),
        ("missing required field", json, br#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"name":"x"}}}"#.to_vec(), StatusCode::BAD_REQUEST, "'subscribe.framework_info.user'"),
        ("subscribe without body", json, br#"{"type":"SUBSCRIBE"}"#.to_vec(), StatusCode::BAD_REQUEST, "'subscribe'"),
        ("garbage protobuf", Some("application/x-protobuf"), vec![0xff, 0xff, 0xff, 0x0f, 0x01], StatusCode::BAD_REQUEST, "Failed to parse"),
        ("oversized body", json, vec![b' '; 65 * 1024], StatusCode::PAYLOAD_TOO_LARGE, "exceeds the limit"),
        ("invalid role", json, br#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"u","name":"n","role":".."}}}"#.to_vec(), StatusCode::BAD_REQUEST, "role"),
    ];
    for (what, content_type, body, status, needle) in cases {
        let (got, message) = post(&url, content_type, body, None).await;
        assert_eq!(got, status, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} should mention {needle:?}"
        );
    }

    let get = reqwest::get(&url).await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    let html = reqwest::Client::new()
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Accept", "text/html")
        .body(json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "u", "name": "n"}}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), StatusCode::NOT_ACCEPTABLE);

    // Calls of a subscribed framework: stream id and resources are checked.
    let mut scheduler =
        Scheduler::subscribe(&master, json!({"user": "root", "name": "hostile"})).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = offers["offers"]["offers"][0].clone();
    let revive =
        json!({"type": "REVIVE", "framework_id": {"value": scheduler.framework_id}}).to_string();
    let (status, message) = post(&url, json, revive.clone(), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{message}");
    assert!(message.contains("Mesos-Stream-Id"));
    let (status, message) = post(&url, json, revive.clone(), Some("not-the-stream")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{message}");
    let stranger = json!({"type": "REVIVE", "framework_id": {"value": "nobody"}}).to_string();
    assert_eq!(
        post(&url, json, stranger, Some(&scheduler.stream_id))
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    let with_resources = |resources: serde_json::Value| {
        json!({"type": "ACCEPT", "framework_id": {"value": scheduler.framework_id}, "accept": {
            "offer_ids": [offer["id"]],
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": [{
                "name": "t", "task_id": {"value": "t"}, "agent_id": offer["agent_id"],
                "resources": resources, "command": {"value": "true"}}]}}]}})
        .to_string()
    };
    let bad_resources = [
        (
            json!([{"name": "cpus", "type": "SCALAR", "scalar": {"value": -1}}]),
            "negative",
        ),
        (
            json!([{"name": "cpus", "type": "SCALAR", "scalar": {"value": "NaN"}}]),
            "non-finite",
        ),
        (
            json!([{"name": "cpus", "type": "SCALAR", "scalar": {"value": "Infinity"}}]),
            "non-finite",
        ),
        (
            json!([{"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 31000, "end": 31005}, {"begin": 31003, "end": 31008}]}}]),
            "overlapping",
        ),
        (
            json!([{"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 31005, "end": 31000}]}}]),
            "end is before its begin",
        ),
        (
            json!([{"name": "cpus", "type": "SCALAR"}]),
            "carries no SCALAR",
        ),
        (
            json!([{"name": "", "type": "SCALAR", "scalar": {"value": 1}}]),
            "empty name",
        ),
    ];
    for (resources, needle) in bad_resources {
        let (status, message) = post(
            &url,
            json,
            with_resources(resources.clone()),
            Some(&scheduler.stream_id),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resources}: {message}");
        assert!(
            message.contains(needle),
            "{resources}: {message:?} should mention {needle:?}"
        );
    }
    let bad_filter = json!({"type": "DECLINE", "framework_id": {"value": scheduler.framework_id},
        "decline": {"offer_ids": [offer["id"]], "filters": {"refuse_seconds": "NaN"}}})
    .to_string();
    assert_eq!(
        post(&url, json, bad_filter, Some(&scheduler.stream_id))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let bad_uuid = json!({"type": "ACKNOWLEDGE", "framework_id": {"value": scheduler.framework_id},
        "acknowledge": {"agent_id": offer["agent_id"], "task_id": {"value": "t"}, "uuid": "AAAA"}})
    .to_string();
    let (status, message) = post(&url, json, bad_uuid, Some(&scheduler.stream_id)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");

    // Still serving: the offer is still usable and a task launches.
    assert_eq!(
        scheduler
            .call(support::launch(&offer, &[("after", "true", 0.5, 64.0)]))
            .await,
        202
    );
    scheduler.await_state("after", "TASK_FINISHED", 5).await;
    assert_eq!(
        reqwest::get(format!("http://{}/health", master.addr))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        reqwest::get(format!("http://{}/no/such/thing", master.addr))
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    master.shutdown().await;
}

#[tokio::test]
async fn agent_with_invalid_resources_is_refused_with_the_reason() {
    use butte_api::agent_link::v1::{
        self as link, agent_link_client::AgentLinkClient, agent_message,
    };
    let master = support::master("bad-agent").await;
    let mut client = AgentLinkClient::connect(format!("http://{}", master.addr))
        .await
        .unwrap();
    let register = link::AgentMessage {
        kind: Some(agent_message::Kind::Register(link::Register {
            agent_info: butte_api::mesos::v1::AgentInfo {
                hostname: "h".into(),
                ..Default::default()
            },
            total_resources: vec![butte_api::resources::scalar("cpus", -4.0)],
            ..Default::default()
        })),
    };
    let error = client
        .session(tokio_stream::iter(vec![register]))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().contains("negative"), "{}", error.message());
    let not_register = link::AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(link::Heartbeat {})),
    };
    let error = client
        .session(tokio_stream::iter(vec![not_register]))
        .await
        .expect_err("refused");
    assert!(
        error.message().contains("must be Register"),
        "{}",
        error.message()
    );
    master.shutdown().await;
}

#[tokio::test]
async fn every_id_rule_is_held_for_every_id_a_call_or_task_names() {
    let master = support::master("hostile-ids").await;
    let _agent = TestAgent::connect(&master, "cpus:2;mem:2048").await;
    let url = format!("http://{}/api/v1/scheduler", master.addr);
    let json = Some("application/json");
    let mut scheduler = Scheduler::subscribe(&master, json!({"user": "root", "name": "ids"})).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = offers["offers"]["offers"][0].clone();
    let framework = json!({"value": scheduler.framework_id});
    let agent = offer["agent_id"].clone();
    let long = "x".repeat(256);
    let bad_ids = [
        "",
        ".",
        "..",
        "../../var/tmp",
        "a\\b",
        "a\u{0}b",
        "a\nb",
        long.as_str(),
    ];

    // Each id field of each call, with each bad id: 400 naming the field.
    type CallWith = fn(&Value, &Value, &Value, &str) -> Value;
    let calls: [(&str, CallWith); 10] = [
        (
            "subscribe.framework_info.id",
            |_, _, _, id| json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "u", "name": "n", "id": {"value": id}}}}),
        ),
        (
            "framework_id",
            |_, _, _, id| json!({"type": "REVIVE", "framework_id": {"value": id}}),
        ),
        (
            "kill.task_id",
            |f, _, _, id| json!({"type": "KILL", "framework_id": f, "kill": {"task_id": {"value": id}}}),
        ),
        (
            "kill.agent_id",
            |f, _, _, id| json!({"type": "KILL", "framework_id": f, "kill": {"task_id": {"value": "t"}, "agent_id": {"value": id}}}),
        ),
        (
            "acknowledge.task_id",
            |f, a, _, id| json!({"type": "ACKNOWLEDGE", "framework_id": f, "acknowledge": {"agent_id": a, "task_id": {"value": id}, "uuid": "AAAAAAAAAAAAAAAAAAAAAA=="}}),
        ),
        (
            "acknowledge.agent_id",
            |f, _, _, id| json!({"type": "ACKNOWLEDGE", "framework_id": f, "acknowledge": {"agent_id": {"value": id}, "task_id": {"value": "t"}, "uuid": "AAAAAAAAAAAAAAAAAAAAAA=="}}),
        ),
        (
            "reconcile.tasks.task_id",
            |f, _, _, id| json!({"type": "RECONCILE", "framework_id": f, "reconcile": {"tasks": [{"task_id": {"value": id}}]}}),
        ),
        (
            "shutdown.executor_id",
            |f, a, _, id| json!({"type": "SHUTDOWN", "framework_id": f, "shutdown": {"agent_id": a, "executor_id": {"value": id}}}),
        ),
        (
            "message.executor_id",
            |f, a, _, id| json!({"type": "MESSAGE", "framework_id": f, "message": {"agent_id": a, "executor_id": {"value": id}, "data": ""}}),
        ),
        (
            "decline.offer_ids",
            |f, _, _, id| json!({"type": "DECLINE", "framework_id": f, "decline": {"offer_ids": [{"value": id}]}}),
        ),
    ];
    for (field, call) in calls {
        for id in bad_ids {
            let body = call(&framework, &agent, &offer, id).to_string();
            let (status, message) = post(&url, json, body, Some(&scheduler.stream_id)).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{field} = {id:?}: {message}"
            );
            let named = if id.is_empty() && field == "framework_id" {
                "'framework_id'"
            } else {
                field
            };
            assert!(message.contains(named), "{field} = {id:?}: {message:?}");
        }
    }

    // Ids inside a launch: TASK_ERROR naming the field, the rest launches.
    let mut launch = support::launch(
        &offer,
        &[("..", "true", 0.1, 32.0), ("fine", "true", 0.1, 32.0)],
    );
    launch["accept"]["operations"][0]["launch"]["task_infos"][0]["task_id"]["value"] =
        json!("../../var/tmp");
    assert_eq!(scheduler.call(launch).await, 202);
    let refused = scheduler
        .await_state("../../var/tmp", "TASK_ERROR", 5)
        .await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("'task_id'"),
        "{refused}"
    );
    scheduler.await_state("fine", "TASK_RUNNING", 5).await;
    master.shutdown().await;
}

#[tokio::test]
async fn what_the_cluster_cannot_honour_is_refused_by_name() {
    let master = support::master("hostile-unsupported").await;
    let _agent = TestAgent::connect(&master, "cpus:4;mem:4096").await;
    let mut scheduler =
        Scheduler::subscribe(&master, json!({"user": "root", "name": "unsupported"})).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = offers["offers"]["offers"][0].clone();
    let fields: [(&str, &str, Value); 6] = [
        (
            "with-container",
            "'container.docker'",
            json!({"container": {"type": "MESOS", "docker": {"image": "busybox"}}}),
        ),
        (
            "with-uris",
            "'command.uris'",
            json!({"command": {"value": "true", "uris": [{"value": "http://example.invalid/x"}]}}),
        ),
        (
            "with-health-check",
            "'health_check'",
            json!({"health_check": {}}),
        ),
        ("with-check", "'check'", json!({"check": {}})),
        (
            "with-executor",
            "'executor'",
            json!({"command": null, "executor": {"executor_id": {"value": "e"}, "command": {"value": "true"}}}),
        ),
        (
            "without-mem",
            "needs both",
            json!({"resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}]}),
        ),
    ];
    let ids: Vec<(&str, f64, f64)> = fields.iter().map(|(id, _, _)| (*id, 0.1, 32.0)).collect();
    let tasks: Vec<(&str, &str, f64, f64)> =
        ids.iter().map(|(id, c, m)| (*id, "true", *c, *m)).collect();
    let mut launch = support::launch(&offer, &tasks);
    for (i, (_, _, extra)) in fields.iter().enumerate() {
        let task = &mut launch["accept"]["operations"][0]["launch"]["task_infos"][i];
        for (key, value) in extra.as_object().unwrap() {
            if value.is_null() {
                task.as_object_mut().unwrap().remove(key);
            } else {
                task[key] = value.clone();
            }
        }
    }
    // An operation this master does not implement, with an id.
    launch["accept"]["operations"]
        .as_array_mut()
        .unwrap()
        .push(json!({
        "type": "RESERVE", "id": {"value": "op-1"},
        "reserve": {"resources": []}}));
    assert_eq!(scheduler.call(launch).await, 202);
    for (id, field, _) in &fields {
        let status = scheduler.await_state(id, "TASK_ERROR", 5).await;
        let message = status["message"].as_str().unwrap_or("");
        assert!(message.contains(field), "{id}: {message}");
    }
    let error = scheduler.next("ERROR", 5).await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("RESERVE"),
        "{error}"
    );
    let operation = scheduler.next("UPDATE_OPERATION_STATUS", 5).await;
    let status = &operation["update_operation_status"]["status"];
    assert_eq!(status["state"], "OPERATION_ERROR", "{operation}");
    assert_eq!(status["operation_id"]["value"], "op-1", "{operation}");
    master.shutdown().await;
}
