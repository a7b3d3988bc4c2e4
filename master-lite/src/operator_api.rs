//! What operators read: `POST /api/v1` (GET_HEALTH, GET_VERSION, GET_STATE,
//! GET_AGENTS, GET_FRAMEWORKS, GET_TASKS, GET_METRICS, GET_ROLES), the v0 JSON
//! views (`/state`, `/slaves`, `/frameworks`, `/tasks`, `/roles`),
//! `/metrics/snapshot` and Prometheus text at `/metrics` (from `metrics`).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use butte_api::mesos::v1::master::{Call, Response as ApiResponse, call, response};
use butte_api::mesos::v1::{Metric, Resource, Role, TaskState, VersionInfo};
use butte_api::resources::Resources;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::acls::Action;
use crate::http::{HttpError, encoded, json_response, read_post, response_format};
use crate::master::{Master, Shared, Viewer, roles_of};
use crate::metrics::{IN_FLIGHT, TASK_STATES};
use butte_api::task_state::is_terminal;

/// One operator call from `principal` (None: unauthenticated), as the ACLs
/// allow it.
pub async fn handle_api(
    shared: Shared,
    principal: Option<String>,
    request: Request<Body>,
) -> Result<Response, HttpError> {
    let principal = principal.as_deref();
    let limit = shared.lock().config.max_request_bytes;
    let posted = read_post(request, limit).await?;
    let accept = response_format(&posted.headers)?;
    let call: Call = posted.format.decode(&posted.body)?;
    let kind = call
        .r#type
        .and_then(|t| call::Type::try_from(t).ok())
        .unwrap_or(call::Type::Unknown);
    let mut master = shared.lock();
    let mut answer = ApiResponse {
        r#type: Some(response::Type::Unknown as i32),
        ..Default::default()
    };
    match kind {
        call::Type::GetHealth => {
            answer.r#type = Some(response::Type::GetHealth as i32);
            answer.get_health = Some(response::GetHealth { healthy: true });
        }
        call::Type::GetVersion => {
            answer.r#type = Some(response::Type::GetVersion as i32);
            answer.get_version = Some(response::GetVersion {
                version_info: version_info(),
            });
        }
        call::Type::GetState => {
            answer.r#type = Some(response::Type::GetState as i32);
            answer.get_state = Some(get_state(&master, master.viewer(principal)));
        }
        call::Type::GetAgents => {
            answer.r#type = Some(response::Type::GetAgents as i32);
            answer.get_agents = Some(get_agents(&master));
        }
        call::Type::GetFrameworks => {
            answer.r#type = Some(response::Type::GetFrameworks as i32);
            answer.get_frameworks = Some(get_frameworks(&master, master.viewer(principal)));
        }
        call::Type::GetTasks => {
            answer.r#type = Some(response::Type::GetTasks as i32);
            answer.get_tasks = Some(get_tasks(&master, master.viewer(principal)));
        }
        call::Type::GetMetrics => {
            forbid(
                master
                    .acls
                    .check(Action::GetEndpoints, principal, Some("/metrics/snapshot")),
            )?;
            answer.r#type = Some(response::Type::GetMetrics as i32);
            let metrics = metrics_snapshot(&master)
                .into_iter()
                .chain(master.telemetry.metrics())
                .map(|(name, value)| Metric {
                    name,
                    value: Some(value),
                })
                .collect();
            answer.get_metrics = Some(response::GetMetrics { metrics });
        }
        call::Type::GetRoles => {
            answer.r#type = Some(response::Type::GetRoles as i32);
            answer.get_roles = Some(response::GetRoles {
                roles: roles(&master),
            });
        }
        call::Type::MarkAgentGone => {
            forbid(master.acls.check(Action::MarkAgentsGone, principal, None))?;
            let Some(agent_id) = call
                .mark_agent_gone
                .as_ref()
                .map(|m| m.agent_id.value.clone())
            else {
                return Err(HttpError::bad_request(
                    "MARK_AGENT_GONE needs 'mark_agent_gone.agent_id'",
                ));
            };
            return match master.mark_agent_gone(&agent_id) {
                Ok(()) => Ok(StatusCode::OK.into_response()),
                Err(crate::master::MarkGoneError::Unknown(id)) => Err(HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("no agent {id} is known to this master"),
                )),
                Err(error) => Err(HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the master could not persist the change: {error}"),
                )),
            };
        }
        call::Type::Teardown => {
            let Some(framework_id) = call.teardown.as_ref().map(|t| t.framework_id.value.clone())
            else {
                return Err(HttpError::bad_request(
                    "TEARDOWN needs 'teardown.framework_id'",
                ));
            };
            let Some(framework) = master.frameworks.get(&framework_id) else {
                return Err(HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("no framework {framework_id} is active on this master"),
                ));
            };
            let owner = framework.info.principal.clone();
            forbid(
                master
                    .acls
                    .check(Action::TeardownFrameworks, principal, owner.as_deref()),
            )?;
            master.remove_framework(&framework_id, "the operator sent TEARDOWN");
            return Ok(StatusCode::OK.into_response());
        }
        call::Type::Unknown => {
            return Err(HttpError::bad_request(
                "Expecting 'type' to be present and a known operator call (GET_STATE, ...)",
            ));
        }
        other => {
            return Err(HttpError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "operator call {} is not supported by this master yet",
                    other.as_str_name()
                ),
            ));
        }
    }
    Ok(encoded(StatusCode::OK, accept, &answer))
}

fn version_info() -> VersionInfo {
    VersionInfo {
        version: butte_api::MESOS_VERSION.to_owned(),
        build_user: Some("butte".to_owned()),
        git_tag: Some(format!("butte-{}", env!("CARGO_PKG_VERSION"))),
        ..Default::default()
    }
}

/// An ACL's refusal as 403.
fn forbid(checked: Result<(), String>) -> Result<(), HttpError> {
    checked.map_err(|refusal| HttpError::new(StatusCode::FORBIDDEN, refusal))
}

fn get_tasks(master: &Master, viewer: Viewer<'_>) -> response::GetTasks {
    let mut tasks = response::GetTasks::default();
    let active = master.frameworks.values().flat_map(|f| {
        f.tasks
            .values()
            .map(|e| &e.task)
            .filter(move |t| viewer.task(t, &f.info))
    });
    for task in active {
        match task.state() {
            TaskState::TaskUnreachable => tasks.unreachable_tasks.push(task.clone()),
            state if is_terminal(state) => tasks.completed_tasks.push(task.clone()),
            _ => tasks.tasks.push(task.clone()),
        }
    }
    for framework in master.frameworks.values() {
        tasks.completed_tasks.extend(
            framework
                .completed_tasks
                .iter()
                .filter(|t| viewer.task(t, &framework.info))
                .cloned(),
        );
    }
    tasks
}

fn get_agents(master: &Master) -> response::GetAgents {
    let agents = master
        .agents
        .values()
        .map(|agent| {
            let offered = offered_on(master, |o| o.agent_id == agent.id());
            let used = used_on(master, agent);
            response::get_agents::Agent {
                agent_info: agent.info.clone(),
                active: agent.connected(),
                version: agent.version.clone(),
                pid: Some(format!(
                    "agent@{}:{}",
                    agent.info.hostname,
                    agent.info.port.unwrap_or(5051)
                )),
                registered_time: Some(time_info(agent.registered_time)),
                reregistered_time: agent.reregistered_time.map(time_info),
                total_resources: agent.total.to_proto(None),
                allocated_resources: used.to_proto(None),
                offered_resources: offered.to_proto(None),
                ..Default::default()
            }
        })
        .collect();
    response::GetAgents {
        agents,
        ..Default::default()
    }
}

/// What tasks use on an agent: neither free nor offered.
pub(crate) fn used_on(master: &Master, agent: &crate::master::Agent) -> Resources {
    let mut held = agent.total.clone();
    if let Some(free) = master.allocator.free(agent.id()) {
        held.subtract_contained(free);
    }
    held.subtract_contained(&offered_on(master, |o| o.agent_id == agent.id()));
    held
}

pub(crate) fn offered_on(
    master: &Master,
    keep: impl Fn(&crate::master::OutstandingOffer) -> bool,
) -> Resources {
    let mut sum = Resources::new();
    for offer in master.offers.values().filter(|o| keep(o)) {
        sum.add(&offer.resources);
    }
    sum
}

fn allocated_to(master: &Master, framework_id: &str) -> Vec<Resource> {
    master
        .allocator
        .allocated(framework_id)
        .map(|by_role| {
            by_role
                .iter()
                .flat_map(|(role, r)| r.to_proto(Some(role)))
                .collect()
        })
        .unwrap_or_default()
}

fn get_frameworks(master: &Master, viewer: Viewer<'_>) -> response::GetFrameworks {
    let frameworks = master
        .frameworks
        .values()
        .filter(|f| viewer.framework(&f.info))
        .map(|f| response::get_frameworks::Framework {
            framework_info: f.info.clone(),
            active: f.connected(),
            connected: f.connected(),
            recovered: false,
            registered_time: Some(time_info(f.registered_time)),
            reregistered_time: f.reregistered_time.map(time_info),
            offers: master
                .offers
                .values()
                .filter(|o| o.framework_id == f.id())
                .map(|o| offer_proto(master, o))
                .collect(),
            allocated_resources: allocated_to(master, f.id()),
            offered_resources: offered_on(master, |o| o.framework_id == f.id()).to_proto(None),
            ..Default::default()
        })
        .collect();
    let completed_frameworks = master
        .completed_frameworks
        .iter()
        .filter(|info| viewer.framework(info))
        .map(|info| response::get_frameworks::Framework {
            framework_info: info.clone(),
            ..Default::default()
        })
        .collect();
    response::GetFrameworks {
        frameworks,
        completed_frameworks,
        ..Default::default()
    }
}

fn offer_proto(
    master: &Master,
    offer: &crate::master::OutstandingOffer,
) -> butte_api::mesos::v1::Offer {
    butte_api::mesos::v1::Offer {
        id: butte_api::mesos::v1::OfferId {
            value: offer.id.clone(),
        },
        framework_id: butte_api::mesos::v1::FrameworkId {
            value: offer.framework_id.clone(),
        },
        agent_id: butte_api::mesos::v1::AgentId {
            value: offer.agent_id.clone(),
        },
        hostname: master
            .agents
            .get(&offer.agent_id)
            .map(|a| a.info.hostname.clone())
            .unwrap_or_default(),
        resources: offer.resources.to_proto(Some(&offer.role)),
        ..Default::default()
    }
}

fn get_state(master: &Master, viewer: Viewer<'_>) -> response::GetState {
    response::GetState {
        get_tasks: Some(get_tasks(master, viewer)),
        get_executors: Some(response::GetExecutors::default()),
        get_frameworks: Some(get_frameworks(master, viewer)),
        get_agents: Some(get_agents(master)),
    }
}

pub(crate) fn roles(master: &Master) -> Vec<Role> {
    let mut by_role: BTreeMap<String, (Vec<butte_api::mesos::v1::FrameworkId>, Resources)> =
        BTreeMap::new();
    for framework in master.frameworks.values() {
        for role in roles_of(&framework.info) {
            by_role
                .entry(role)
                .or_default()
                .0
                .push(butte_api::mesos::v1::FrameworkId {
                    value: framework.id().to_owned(),
                });
        }
        for (role, resources) in master
            .allocator
            .allocated(framework.id())
            .into_iter()
            .flatten()
        {
            by_role.entry(role.clone()).or_default().1.add(resources);
        }
    }
    by_role
        .into_iter()
        .map(|(name, (frameworks, resources))| Role {
            weight: master.allocator.weight(&name),
            resources: resources.to_proto(None),
            name,
            frameworks,
        })
        .collect()
}

fn time_info(unix_seconds: f64) -> butte_api::mesos::v1::TimeInfo {
    butte_api::mesos::v1::TimeInfo {
        nanoseconds: (unix_seconds * 1e9) as i64,
    }
}

/// Mesos's metric names and meanings, read in one pass over the state.
pub fn metrics_snapshot(master: &Master) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let mut put = |name: &str, value: f64| {
        m.insert(format!("master/{name}"), value);
    };
    put("elected", 1.0);
    put("uptime_secs", master.started.elapsed().as_secs_f64());
    let connected = master.agents.values().filter(|a| a.connected()).count();
    put("slaves_active", connected as f64);
    put("slaves_connected", connected as f64);
    put(
        "slaves_disconnected",
        (master.agents.len() - connected) as f64,
    );
    put(
        "slaves_unreachable",
        master.agents.values().filter(|a| a.unreachable()).count() as f64,
    );
    let active = master.frameworks.values().filter(|f| f.connected()).count();
    put("frameworks_active", active as f64);
    put("frameworks_connected", active as f64);
    put(
        "frameworks_disconnected",
        (master.frameworks.len() - active) as f64,
    );
    put(
        "frameworks_inactive",
        (master.frameworks.len() - active) as f64,
    );
    put("outstanding_offers", master.offers.len() as f64);
    for (name, count) in task_counts(master) {
        put(&name, count as f64);
    }
    let total = master.allocator.total().clone();
    let mut used = Resources::new();
    for agent in master.agents.values().filter(|a| !a.unreachable()) {
        used.add(&used_on(master, agent));
    }
    for name in ["cpus", "mem", "disk", "gpus", "network_bandwidth"] {
        let (t, u) = (total.scalar(name), used.scalar(name));
        put(&format!("{name}_total"), t);
        put(&format!("{name}_used"), u);
        put(
            &format!("{name}_percent"),
            if t > 0.0 { u / t } else { 0.0 },
        );
    }
    let c = &master.counters;
    for (name, value) in [
        ("offers_sent", c.offers_sent),
        ("offers_declined", c.offers_declined),
        ("offers_rescinded", c.offers_rescinded),
        ("offers_accepted", c.offers_accepted),
        ("tasks_launched", c.tasks_launched),
        ("invalid_tasks", c.tasks_invalid),
        ("valid_status_updates", c.status_updates),
        ("allocation_runs", c.allocation_runs),
        ("registry_write_errors", c.registry_errors),
    ] {
        put(name, value as f64);
    }
    put("allocation_run_ms", c.allocation_last_ms);
    m.insert(
        "allocator/mesos/allocation_runs".into(),
        c.allocation_runs as f64,
    );
    m
}

/// Mesos's task gauges (`tasks_running`...): the active states count the
/// tasks in flight, the terminal ones also the completed tasks kept.
fn task_counts(master: &Master) -> Vec<(String, usize)> {
    let mut active: BTreeMap<i32, usize> = BTreeMap::new();
    let mut completed: BTreeMap<i32, usize> = BTreeMap::new();
    for framework in master.frameworks.values() {
        for entry in framework.tasks.values() {
            *active.entry(entry.task.state).or_default() += 1;
        }
        for task in &framework.completed_tasks {
            *completed.entry(task.state).or_default() += 1;
        }
    }
    let name = |state: TaskState| {
        state
            .as_str_name()
            .to_ascii_lowercase()
            .replace("task_", "tasks_")
    };
    let count = |counts: &BTreeMap<i32, usize>, state: TaskState| {
        counts.get(&(state as i32)).copied().unwrap_or(0)
    };
    let (in_flight, ended) = TASK_STATES.split_at(IN_FLIGHT);
    let in_flight = in_flight
        .iter()
        .map(|&state| (name(state), count(&active, state)));
    let ended = ended.iter().map(|&state| {
        let both = count(&active, state) + count(&completed, state);
        (name(state), both)
    });
    in_flight.chain(ended).collect()
}

/// `GET /api/v1/telemetry`: every telemetry batch as it arrives, one JSON
/// object per line (`{"agent_id": ..., "batch": TelemetryBatch}`), chunked.
pub fn telemetry_stream(master: &Master) -> Response {
    let receiver = master.telemetry.subscribe();
    let lines = tokio_stream::wrappers::BroadcastStream::new(receiver).filter_map(|line| {
        // A subscriber that fell behind skips what it missed.
        line.ok()
            .map(|line| Ok::<_, std::convert::Infallible>(format!("{line}\n")))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// `GET /telemetry?framework_id=F&task_id=T`: a task's recent samples,
/// oldest first; without a query, every task's newest sample.
pub fn telemetry_history(master: &Master, query: Option<&str>) -> Response {
    let mut framework_id = None;
    let mut task_id = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("framework_id", v)) => framework_id = Some(v),
            Some(("task_id", v)) => task_id = Some(v),
            _ => {}
        }
    }
    let encode = |sample: &butte_api::telemetry::v1::TaskSample| {
        butte_api::json::to_value(sample).unwrap_or(Value::Null)
    };
    match (framework_id, task_id) {
        (Some(framework_id), Some(task_id)) => {
            match master.telemetry.history(framework_id, task_id) {
                Some(history) => json_response(
                    &json!({"samples": history.iter().map(encode).collect::<Vec<_>>()}),
                ),
                None => HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("no telemetry for task {task_id} of framework {framework_id}"),
                )
                .into_response(),
            }
        }
        (None, None) => json_response(&json!({
            "samples": master.telemetry.latest().values().map(|s| encode(s)).collect::<Vec<_>>()
        })),
        _ => {
            HttpError::bad_request("give both framework_id and task_id, or neither").into_response()
        }
    }
}
