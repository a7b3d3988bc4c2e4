//! The master's GET views in Mesos's v0 JSON shapes (`/state`,
//! `/frameworks`, `/slaves`, `/tasks`, `/roles`) and its metrics endpoints,
//! as Mesos's web UI and tools read them.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use butte_api::mesos::v1::Task;
use butte_api::resources::Resources;
use serde_json::{Value, json};

use crate::http::json_response;
use crate::master::{Master, Viewer, roles_of};
use crate::operator_api::{metrics_snapshot, offered_on, roles, used_on};

fn resources_json(resources: &Resources) -> Value {
    let mut map = serde_json::Map::new();
    for name in ["cpus", "mem", "disk", "gpus"] {
        map.insert(name.to_owned(), json!(resources.scalar(name)));
    }
    for (name, value) in resources.scalars() {
        map.insert(name.to_owned(), json!(value));
    }
    if let Some(ports) = resources.ranges("ports") {
        map.insert("ports".to_owned(), json!(ports.to_string()));
    }
    Value::Object(map)
}

/// Agent attributes as Mesos's v0 views show them: name to value.
fn attributes_json(attributes: &[butte_api::mesos::v1::Attribute]) -> Value {
    let mut map = serde_json::Map::new();
    for attribute in attributes {
        let value = if let Some(text) = &attribute.text {
            json!(text.value)
        } else if let Some(scalar) = &attribute.scalar {
            json!(scalar.value)
        } else {
            continue;
        };
        map.insert(attribute.name.clone(), value);
    }
    Value::Object(map)
}

fn task_json(task: &Task) -> Value {
    let resources = Resources::from_proto(&task.resources).unwrap_or_default();
    json!({
        "id": task.task_id.value,
        "name": task.name,
        "framework_id": task.framework_id.value,
        "executor_id": task.executor_id.as_ref().map_or("", |e| e.value.as_str()),
        "slave_id": task.agent_id.value,
        "state": task.state().as_str_name(),
        "resources": resources_json(&resources),
        "statuses": task.statuses.iter().map(|s| json!({"state": s.state().as_str_name(), "timestamp": s.timestamp})).collect::<Vec<_>>(),
    })
}

fn frameworks_json(master: &Master, viewer: Viewer<'_>) -> (Vec<Value>, Vec<Value>) {
    let frameworks = master
        .frameworks
        .values()
        .filter(|f| viewer.framework(&f.info))
        .map(|f| {
            let mut used = Resources::new();
            for r in master.allocator.allocated(f.id()).into_iter().flat_map(|m| m.values()) {
                used.add(r);
            }
            json!({
                "id": f.id(),
                "name": f.info.name,
                "user": f.info.user,
                "principal": f.info.principal,
                "hostname": f.info.hostname,
                "failover_timeout": f.info.failover_timeout.unwrap_or(0.0),
                "role": roles_of(&f.info).first().cloned().unwrap_or_default(),
                "roles": roles_of(&f.info),
                "capabilities": f.info.capabilities.iter().map(|c| c.r#type().as_str_name()).collect::<Vec<_>>(),
                "active": f.connected(),
                "connected": f.connected(),
                "registered_time": f.registered_time,
                "reregistered_time": f.reregistered_time,
                "used_resources": resources_json(&used),
                "offered_resources": resources_json(&offered_on(master, |o| o.framework_id == f.id())),
                "tasks": f.tasks.values().map(|e| &e.task).filter(|t| viewer.task(t, &f.info)).map(task_json).collect::<Vec<_>>(),
                "completed_tasks": f.completed_tasks.iter().filter(|t| viewer.task(t, &f.info)).map(task_json).collect::<Vec<_>>(),
                "offers": master.offers.values().filter(|o| o.framework_id == f.id()).map(|o| json!({"id": o.id, "slave_id": o.agent_id, "resources": resources_json(&o.resources)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let completed = master
        .completed_frameworks
        .iter()
        .filter(|info| viewer.framework(info))
        .map(|info| json!({"id": info.id.as_ref().map_or("", |f| f.value.as_str()), "name": info.name, "principal": info.principal, "active": false}))
        .collect();
    (frameworks, completed)
}

fn slaves_json(master: &Master) -> Vec<Value> {
    master
        .agents
        .values()
        .map(|a| {
            json!({
                "id": a.id(),
                "hostname": a.info.hostname,
                "port": a.info.port.unwrap_or(5051),
                "pid": format!("slave(1)@{}:{}", a.info.hostname, a.info.port.unwrap_or(5051)),
                "active": a.connected(),
                "version": a.version,
                "registered_time": a.registered_time,
                "resources": resources_json(&a.total),
                "used_resources": resources_json(&used_on(master, a)),
                "offered_resources": resources_json(&offered_on(master, |o| o.agent_id == a.id())),
                "unreserved_resources": resources_json(&a.total),
                "attributes": attributes_json(&a.info.attributes),
            })
        })
        .collect()
}

/// GET views in Mesos's v0 JSON shapes, as `principal` may see them (the
/// view ACLs; get_endpoints for the metrics).
pub fn view(master: &Master, route: &str, principal: Option<&str>) -> Response {
    if matches!(route, "/metrics/snapshot" | "/metrics")
        && let Err(refusal) =
            master
                .acls
                .check(crate::acls::Action::GetEndpoints, principal, Some(route))
    {
        return (StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response();
    }
    let viewer = master.viewer(principal);
    let (frameworks, completed) = frameworks_json(master, viewer);
    match route {
        "/state" | "/state.json" | "/state-summary" => json_response(&json!({
            "version": butte_api::MESOS_VERSION,
            "id": master.master_id(),
            "pid": master.info.pid,
            "hostname": master.info.hostname,
            "start_time": master.start_time,
            "elected_time": master.start_time,
            "leader": master.info.pid,
            "leader_info": butte_api::json::to_value(&master.info).unwrap_or_default(),
            "activated_slaves": master.agents.values().filter(|a| a.connected()).count(),
            "deactivated_slaves": master.agents.values().filter(|a| !a.connected()).count(),
            "frameworks": frameworks,
            "completed_frameworks": completed,
            "unregistered_frameworks": [],
            "slaves": slaves_json(master),
        })),
        "/frameworks" => json_response(
            &json!({"frameworks": frameworks, "completed_frameworks": completed, "unregistered_frameworks": []}),
        ),
        "/slaves" => json_response(&json!({"slaves": slaves_json(master), "recovered_slaves": []})),
        "/tasks" | "/tasks.json" => {
            let tasks: Vec<Value> = master
                .frameworks
                .values()
                .flat_map(|f| {
                    f.tasks
                        .values()
                        .map(|e| &e.task)
                        .chain(&f.completed_tasks)
                        .filter(move |t| viewer.task(t, &f.info))
                        .map(task_json)
                })
                .collect();
            json_response(&json!({"tasks": tasks}))
        }
        "/roles" => {
            let roles: Vec<Value> = roles(master)
                .into_iter()
                .map(|r| json!({"name": r.name, "weight": r.weight, "frameworks": r.frameworks.iter().map(|f| f.value.clone()).collect::<Vec<_>>(), "resources": resources_json(&Resources::from_proto(&r.resources).unwrap_or_default())}))
                .collect();
            json_response(&json!({"roles": roles}))
        }
        "/metrics/snapshot" => json_response(&json!(metrics_snapshot(master))),
        "/metrics" => match crate::metrics::prometheus(master) {
            Ok(text) => {
                ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
            }
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        },
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
