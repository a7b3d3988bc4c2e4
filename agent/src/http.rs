//! The agent's own HTTP port: Prometheus text at `GET /metrics`, the Mesos
//! v1 agent operator API at `POST /api/v1` (GET_HEALTH, GET_VERSION,
//! GET_CONTAINERS with ResourceStatistics and our additions), `GET /health`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use butte_api::mesos::v1::agent::{Call, Response as ApiResponse, call, response};
use butte_api::mesos::v1::{ContainerStatus, VersionInfo};
use butte_web::auth::{Authenticator, Realm};
use prost::{Message, Name};

use crate::agent::{Agent, TaskKey};

const JSON: &str = "application/json";
const PROTOBUF: &str = "application/x-protobuf";
/// The largest call body taken.
const MAX_BODY: usize = 1 << 20;

/// The agent's routes; with `authenticator`, the read endpoints
/// (`/metrics`, `/api/v1`) want HTTP Basic credentials (`/health` does not).
pub fn router(agent: Agent, authenticator: Option<Arc<Authenticator>>) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1", post(api))
        .route_layer(axum::middleware::from_fn(
            move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request, next: Next| {
                let authenticator = authenticator.clone();
                async move {
                    if let Some(authenticator) = authenticator
                        && let Err(refused) = authenticator.authenticate(
                            Realm::ReadOnly,
                            request.headers(),
                            peer.ip(),
                        )
                    {
                        return *refused;
                    }
                    next.run(request).await
                }
            },
        ));
    guarded
        .route("/health", get(|| async { "OK" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

async fn metrics(axum::extract::State(agent): axum::extract::State<Agent>) -> Response {
    let scrape = {
        let state = agent.lock();
        crate::metrics::Scrape {
            tasks: state.latest.values().cloned().collect(),
            gpus: state.gpus.as_ref().map(crate::metrics::GpuReading::all),
            container_starts: agent.container_starts.clone(),
        }
    };
    match crate::metrics::encode(scrape) {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(failure) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// Protobuf when the header names it, JSON otherwise (absent, wildcard, JSON).
fn wants_protobuf(headers: &HeaderMap, name: header::HeaderName) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains(PROTOBUF))
}

/// A call refused: the status and the message the client reads.
type Refusal = (StatusCode, String);

async fn api(
    axum::extract::State(agent): axum::extract::State<Agent>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let answered = match decode_call(&content_type, &body) {
        Ok(call) => answer(agent, &call).await,
        Err(refused) => Err(refused),
    };
    match answered {
        Ok(answer) => {
            let protobuf = if headers.contains_key(header::ACCEPT) {
                wants_protobuf(&headers, header::ACCEPT)
            } else {
                content_type.starts_with(PROTOBUF)
            };
            encode(&answer, protobuf)
        }
        Err((status, message)) => error(status, message),
    }
}

/// The call in the body, as its Content-Type says it is encoded.
fn decode_call(content_type: &str, body: &[u8]) -> Result<Call, Refusal> {
    let decoded = if content_type.starts_with(PROTOBUF) {
        butte_api::json::from_protobuf::<Call>(body)
    } else if content_type.starts_with(JSON) {
        butte_api::json::from_json::<Call>(body)
    } else {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Expecting 'Content-Type' of {JSON} or {PROTOBUF}, got '{content_type}'"),
        ));
    };
    decoded.map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("Failed to parse body: {e}"),
        )
    })
}

/// The answer to a call this agent serves, or the refusal of one it does not.
async fn answer(agent: Agent, call: &Call) -> Result<ApiResponse, Refusal> {
    let kind = call
        .r#type
        .and_then(|t| call::Type::try_from(t).ok())
        .unwrap_or(call::Type::Unknown);
    match kind {
        call::Type::GetHealth => Ok(ApiResponse {
            r#type: Some(response::Type::GetHealth as i32),
            get_health: Some(response::GetHealth { healthy: true }),
            ..Default::default()
        }),
        call::Type::GetVersion => Ok(ApiResponse {
            r#type: Some(response::Type::GetVersion as i32),
            get_version: Some(response::GetVersion {
                version_info: VersionInfo {
                    version: butte_api::MESOS_VERSION.to_owned(),
                    git_tag: Some(format!("butte-{}", env!("CARGO_PKG_VERSION"))),
                    ..Default::default()
                },
            }),
            ..Default::default()
        }),
        call::Type::GetContainers => {
            // The cgroup reads block: off the runtime threads.
            let containers = tokio::task::spawn_blocking(move || containers(&agent))
                .await
                .map_err(|e| {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot list the containers: {e}"),
                    )
                })?;
            Ok(ApiResponse {
                r#type: Some(response::Type::GetContainers as i32),
                get_containers: Some(containers),
                ..Default::default()
            })
        }
        other => Err((
            StatusCode::BAD_REQUEST,
            format!(
                "call {} is not served by this agent; it serves GET_HEALTH, GET_VERSION and GET_CONTAINERS",
                other.as_str_name()
            ),
        )),
    }
}

fn encode<M: Message + Name>(message: &M, protobuf: bool) -> Response {
    if protobuf {
        return ([(header::CONTENT_TYPE, PROTOBUF)], message.encode_to_vec()).into_response();
    }
    match butte_api::json::to_json(message) {
        Ok(text) => ([(header::CONTENT_TYPE, JSON)], text).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

/// One entry per container (a task group's tasks share theirs), from the
/// newest telemetry samples, plus what only an operator asks for and so is
/// read from cgroupfs now rather than every second: processes, threads and
/// CPU throttling.
fn containers(agent: &Agent) -> response::GetContainers {
    let mut sampled = sampled_containers(agent);
    for (key, container) in &mut sampled {
        // The sandbox is measured now, as the disk watcher does, outside
        // the agent's lock.
        if let (Some((sandbox, limit_bytes)), Some(statistics)) =
            (agent.disk_of(key), container.resource_statistics.as_mut())
        {
            let used = crate::disk::measure(
                agent.quotas.as_deref(),
                &container.container_id.value,
                &sandbox,
            );
            statistics.disk_used_bytes = Some(used.bytes());
            statistics.disk_limit_bytes = (limit_bytes > 0).then_some(limit_bytes);
        }
    }
    let mut containers: Vec<_> = sampled.into_iter().map(|(_, c)| c).collect();
    for container in &mut containers {
        let id = &container.container_id.value;
        let Some(statistics) = container.resource_statistics.as_mut() else {
            continue;
        };
        match agent.isolator().process_counts(id) {
            Ok(counts) => {
                statistics.processes = Some(saturating_u32(counts.processes));
                statistics.threads = Some(saturating_u32(counts.threads));
            }
            Err(error) => tracing::debug!(%error, "no process counts for {id}"),
        }
        match agent.isolator().cpu_throttling(id) {
            Ok(throttling) => {
                statistics.cpus_nr_periods = Some(saturating_u32(throttling.periods));
                statistics.cpus_nr_throttled = Some(saturating_u32(throttling.throttled));
                statistics.cpus_throttled_time_secs = Some(throttling.throttled_ns as f64 / 1e9);
            }
            Err(error) => tracing::debug!(%error, "no CPU throttling figures for {id}"),
        }
    }
    response::GetContainers { containers }
}

/// Mesos's process and period counts are 32-bit.
fn saturating_u32(count: u64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn sampled_containers(agent: &Agent) -> Vec<(TaskKey, response::get_containers::Container)> {
    let state = agent.lock();
    let mut seen = BTreeSet::new();
    let mut samples: Vec<_> = state.latest.values().collect();
    samples.sort_by(|a, b| a.task_id.value.cmp(&b.task_id.value));
    samples
        .into_iter()
        .filter(|s| {
            s.container_id
                .as_ref()
                .is_some_and(|c| seen.insert(c.value.clone()))
        })
        .map(|sample| {
            let executor_id = sample.executor_id.clone().unwrap_or_default();
            let command = executor_id.value == sample.task_id.value;
            let key = TaskKey::new(&sample.framework_id.value, &sample.task_id.value);
            let container = response::get_containers::Container {
                framework_id: sample.framework_id.clone(),
                executor_name: if command {
                    "Command Executor".to_owned()
                } else {
                    executor_id.value.clone()
                },
                executor_id,
                container_id: sample.container_id.clone().unwrap_or_default(),
                container_status: Some(ContainerStatus {
                    container_id: sample.container_id.clone(),
                    ..Default::default()
                }),
                resource_statistics: Some(sample.statistics.clone()),
                butte_statistics: sample.extra.clone(),
            };
            (key, container)
        })
        .collect()
}
