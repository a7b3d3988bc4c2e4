//! The operator API and the read-only views agree with what happened.

mod support;

use butte_api::mesos::v1::master::{Call, Response, call, response};
use prost::Message;
use serde_json::{Value, json};
use support::{Scheduler, TestAgent};

#[tokio::test]
async fn operator_calls_and_views_report_agents_frameworks_tasks_and_metrics() {
    let master = support::master("operator").await;
    let agent = TestAgent::connect(&master, "cpus:4;mem:4096;gpus:0").await;
    let mut scheduler = Scheduler::subscribe(&master, json!({"user": "root", "name": "ops", "roles": ["web"], "capabilities": [{"type": "MULTI_ROLE"}]})).await;
    let offers = scheduler.next("OFFERS", 5).await;
    let offer = &offers["offers"]["offers"][0];
    assert_eq!(offer["allocation_info"]["role"], "web");
    assert_eq!(
        scheduler
            .call(support::launch(offer, &[("svc", "sleep 600", 1.0, 256.0)]))
            .await,
        202
    );
    scheduler.await_state("svc", "TASK_RUNNING", 5).await;

    let api = format!("http://{}/api/v1", master.addr);
    let client = reqwest::Client::new();
    let call_json = |kind: &str| {
        let client = client.clone();
        let api = api.clone();
        let body = json!({"type": kind}).to_string();
        async move {
            let response = client
                .post(&api)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(call_json("GET_HEALTH").await["get_health"]["healthy"], true);
    assert_eq!(
        call_json("GET_VERSION").await["get_version"]["version_info"]["version"],
        "1.11.0"
    );
    let state = call_json("GET_STATE").await;
    assert_eq!(
        state["get_state"]["get_agents"]["agents"][0]["agent_info"]["id"]["value"],
        agent.agent_id.as_str()
    );
    assert_eq!(
        state["get_state"]["get_tasks"]["tasks"][0]["task_id"]["value"],
        "svc"
    );
    assert_eq!(
        state["get_state"]["get_tasks"]["tasks"][0]["state"],
        "TASK_RUNNING"
    );
    let frameworks = call_json("GET_FRAMEWORKS").await;
    assert_eq!(
        frameworks["get_frameworks"]["frameworks"][0]["framework_info"]["name"],
        "ops"
    );
    let roles = call_json("GET_ROLES").await;
    assert_eq!(roles["get_roles"]["roles"][0]["name"], "web");
    let metrics = call_json("GET_METRICS").await;
    let running = metrics["get_metrics"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "master/tasks_running")
        .unwrap();
    assert_eq!(running["value"], 1.0);

    // The same call in protobuf.
    let call = Call {
        r#type: Some(call::Type::GetAgents as i32),
        ..Default::default()
    };
    let bytes = client
        .post(&api)
        .header("Content-Type", "application/x-protobuf")
        .header("Accept", "application/x-protobuf")
        .body(call.encode_to_vec())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let decoded = Response::decode(bytes).unwrap();
    assert_eq!(decoded.r#type(), response::Type::GetAgents);
    let agents = decoded.get_agents.unwrap().agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].active);

    // v0 views and metrics agree.
    let get = |path: &str| {
        let url = format!("http://{}{path}", master.addr);
        async move { reqwest::get(url).await.unwrap() }
    };
    let slaves: Value = get("/master/slaves").await.json().await.unwrap();
    assert_eq!(
        slaves["slaves"][0]["used_resources"]["cpus"], 1.0,
        "only the task's cpus are used: {slaves}"
    );
    let snapshot: Value = get("/metrics/snapshot").await.json().await.unwrap();
    assert_eq!(snapshot["master/cpus_total"], 4.0);
    assert_eq!(snapshot["master/tasks_running"], 1.0);
    assert_eq!(snapshot["master/frameworks_active"], 1.0);
    let prometheus = get("/metrics").await.text().await.unwrap();
    for line in [
        "# TYPE butte_master_tasks gauge",
        "butte_master_tasks{state=\"running\"} 1",
        "# TYPE butte_master_resources gauge",
        "butte_master_resources{resource=\"cpus\",unit=\"cores\"} 4.0",
        "# TYPE butte_master_tasks_launched_total counter",
        "# TYPE butte_master_allocation_run_duration_seconds histogram",
    ] {
        assert!(
            prometheus.lines().any(|l| l == line),
            "no line {line:?} in:\n{prometheus}"
        );
    }
    let cycles: u64 = prometheus
        .lines()
        .find_map(|l| l.strip_prefix("butte_master_allocation_run_duration_seconds_count "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cycles > 0, "every allocation cycle is timed:\n{prometheus}");
    let version: Value = get("/version").await.json().await.unwrap();
    assert_eq!(version["version"], "1.11.0");
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://{}/master/redirect", master.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 307);
    assert_eq!(
        redirect.headers()["location"],
        format!("//{}", master.addr).as_str()
    );
    master.shutdown().await;
}
