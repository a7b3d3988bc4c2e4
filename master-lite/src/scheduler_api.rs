//! `POST /api/v1/scheduler`: the Mesos v1 scheduler API. SUBSCRIBE answers a
//! RecordIO event stream; every other call answers 202 once applied.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use butte_api::mesos::v1::scheduler::{Call, Event, call, event};
use butte_api::recordio;
use butte_api::resources::Resources;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::http::{Format, HttpError, Posted, STREAM_ID_HEADER, read_post, response_format};
use butte_api::ids::{IdError, check_id};

use crate::master::{Master, Shared, check_launch_resources};

/// One call; `principal`: who authenticated, where frameworks must.
pub async fn handle(
    shared: Shared,
    principal: Option<String>,
    request: Request<Body>,
) -> Result<Response, HttpError> {
    let limit = shared.lock().config.max_request_bytes;
    let Posted {
        headers,
        format,
        body: bytes,
    } = read_post(request, limit).await?;
    let call: Call = format.decode(&bytes)?;
    if call.r#type.is_none() && format == Format::Json {
        refuse_unknown_type(&bytes)?;
    }
    let stream_id = headers
        .get(STREAM_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The cheap checks first: ids, then the stream, before any resource is
    // parsed.
    check_ids(&call).map_err(|e| HttpError::bad_request(e.to_string()))?;
    let framework_id = call.framework_id.as_ref().map(|f| f.value.as_str());
    if call.r#type() != call::Type::Subscribe
        && let Some(framework_id) = framework_id.filter(|id| !id.is_empty())
    {
        let master = shared.lock();
        if let Some(principal) = &principal {
            master.check_principal(framework_id, principal)?;
        }
        master.check_stream(framework_id, stream_id.as_deref())?;
    }
    validate(&call)?;

    if call.r#type() == call::Type::Subscribe {
        if stream_id.is_some() {
            return Err(HttpError::bad_request(format!(
                "SUBSCRIBE calls must not carry the '{STREAM_ID_HEADER}' header; the master assigns one"
            )));
        }
        let accept = response_format(&headers)?;
        let subscribe = call.subscribe.unwrap_or_default();
        let subscription = shared.lock().subscribe(
            call.framework_id.map(|f| f.value),
            subscribe,
            principal.as_deref(),
        )?;
        return Ok(event_stream(shared, accept, subscription));
    }

    let framework_id = call
        .framework_id
        .as_ref()
        .map(|f| f.value.clone())
        .unwrap_or_default();
    let mut master = shared.lock();
    master.check_stream(&framework_id, stream_id.as_deref())?;
    apply(&mut master, &framework_id, call)?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// A JSON call whose `type` decoded to nothing: unknown enum names are
/// dropped like unknown fields, so say which one it was.
fn refuse_unknown_type(bytes: &[u8]) -> Result<(), HttpError> {
    let given = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("type").cloned());
    match given {
        Some(given) => Err(HttpError::bad_request(format!(
            "call type {given} is not known; use SUBSCRIBE, ACCEPT, DECLINE, REVIVE, SUPPRESS, KILL, SHUTDOWN, ACKNOWLEDGE, RECONCILE, MESSAGE, REQUEST or TEARDOWN"
        ))),
        None => Ok(()),
    }
}

/// Applies a call of a subscribed framework (any but SUBSCRIBE).
fn apply(master: &mut Master, framework_id: &str, call: Call) -> Result<(), HttpError> {
    let framework_id = framework_id.to_owned();
    match call.r#type() {
        call::Type::Teardown => {
            master.remove_framework(&framework_id, "the scheduler sent TEARDOWN")
        }
        call::Type::Accept => master.accept(&framework_id, call.accept.unwrap_or_default()),
        call::Type::Decline => master.decline(&framework_id, &call.decline.unwrap_or_default()),
        call::Type::Revive => master.revive(&framework_id, &call.revive.unwrap_or_default().roles),
        call::Type::Suppress => {
            master.suppress(&framework_id, &call.suppress.unwrap_or_default().roles)
        }
        call::Type::Kill => master.kill(&framework_id, &call.kill.unwrap_or_default()),
        call::Type::Shutdown => {
            master.shutdown_executor(&framework_id, &call.shutdown.unwrap_or_default())
        }
        call::Type::Acknowledge => {
            master.acknowledge(&framework_id, &call.acknowledge.unwrap_or_default())?
        }
        call::Type::Reconcile => {
            master.reconcile(&framework_id, &call.reconcile.unwrap_or_default())
        }
        call::Type::Message => master.message(&framework_id, &call.message.unwrap_or_default()),
        // Mesos's allocator ignores resource requests too.
        call::Type::Request => {}
        other => {
            return Err(HttpError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "call type {} is not supported by this master",
                    other.as_str_name()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks what Mesos checks before applying a call: its type, the body its
/// type needs, and every resource it carries.
fn validate(call: &Call) -> Result<(), HttpError> {
    let Some(kind) = call.r#type.and_then(|t| call::Type::try_from(t).ok()) else {
        return Err(HttpError::bad_request(
            "Expecting 'type' to be present and a known call type (SUBSCRIBE, ACCEPT, DECLINE, ...)",
        ));
    };
    let need = |present: bool, field: &str| {
        if present {
            Ok(())
        } else {
            Err(HttpError::bad_request(format!(
                "Expecting '{field}' to be present for a {} call",
                kind.as_str_name()
            )))
        }
    };
    if kind == call::Type::Unknown {
        return Err(HttpError::bad_request(
            "Expecting 'type' to be a known call type, got UNKNOWN",
        ));
    }
    if kind != call::Type::Subscribe {
        need(
            call.framework_id
                .as_ref()
                .is_some_and(|f| !f.value.is_empty()),
            "framework_id",
        )?;
    }
    let check_filters = |filters: Option<&butte_api::mesos::v1::Filters>| match filters
        .and_then(|f| f.refuse_seconds)
    {
        Some(seconds) if !seconds.is_finite() || seconds < 0.0 => Err(HttpError::bad_request(
            format!("'filters.refuse_seconds' is {seconds}; use a finite number of seconds >= 0"),
        )),
        _ => Ok(()),
    };
    let check_resources = |what: &str, resources: &[butte_api::mesos::v1::Resource]| {
        Resources::from_proto(resources)
            .map(|_| ())
            .map_err(|e| HttpError::bad_request(format!("{what}: {e}")))
    };
    match kind {
        call::Type::Subscribe => need(call.subscribe.is_some(), "subscribe")?,
        call::Type::Accept => {
            need(call.accept.is_some(), "accept")?;
            let accept = call
                .accept
                .as_ref()
                .map(|a| (&a.operations, a.filters.as_ref()));
            if let Some((operations, filters)) = accept {
                check_filters(filters)?;
                check_launch_resources(operations).map_err(HttpError::bad_request)?;
            }
        }
        call::Type::Decline => {
            need(call.decline.is_some(), "decline")?;
            check_filters(call.decline.as_ref().and_then(|d| d.filters.as_ref()))?;
        }
        call::Type::Kill => need(call.kill.is_some(), "kill")?,
        call::Type::Shutdown => need(call.shutdown.is_some(), "shutdown")?,
        call::Type::Acknowledge => need(call.acknowledge.is_some(), "acknowledge")?,
        call::Type::Reconcile => need(call.reconcile.is_some(), "reconcile")?,
        call::Type::Message => need(call.message.is_some(), "message")?,
        call::Type::Request => {
            need(call.request.is_some(), "request")?;
            for request in call.request.iter().flat_map(|r| r.requests.iter()) {
                check_resources("request", &request.resources)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every id a call names, by the one id rule (`butte_api::ids`): they
/// become paths on the agents, so a bad one is refused before anything else
/// sees it. (Ids inside ACCEPT's tasks are checked per task: TASK_ERROR.)
fn check_ids(call: &Call) -> Result<(), IdError> {
    let mut ids: Vec<(&str, &str)> = Vec::new();
    if let Some(framework_id) = &call.framework_id {
        ids.push(("framework_id", &framework_id.value));
    }
    if let Some(id) = call
        .subscribe
        .as_ref()
        .and_then(|s| s.framework_info.id.as_ref())
    {
        ids.push(("subscribe.framework_info.id", &id.value));
    }
    for offer_id in call.accept.iter().flat_map(|a| &a.offer_ids) {
        ids.push(("accept.offer_ids", &offer_id.value));
    }
    for offer_id in call.decline.iter().flat_map(|d| &d.offer_ids) {
        ids.push(("decline.offer_ids", &offer_id.value));
    }
    if let Some(kill) = &call.kill {
        ids.push(("kill.task_id", &kill.task_id.value));
        if let Some(agent_id) = &kill.agent_id {
            ids.push(("kill.agent_id", &agent_id.value));
        }
    }
    if let Some(shutdown) = &call.shutdown {
        ids.push(("shutdown.executor_id", &shutdown.executor_id.value));
        ids.push(("shutdown.agent_id", &shutdown.agent_id.value));
    }
    if let Some(ack) = &call.acknowledge {
        ids.push(("acknowledge.task_id", &ack.task_id.value));
        ids.push(("acknowledge.agent_id", &ack.agent_id.value));
    }
    for task in call.reconcile.iter().flat_map(|r| &r.tasks) {
        ids.push(("reconcile.tasks.task_id", &task.task_id.value));
        if let Some(agent_id) = &task.agent_id {
            ids.push(("reconcile.tasks.agent_id", &agent_id.value));
        }
    }
    if let Some(message) = &call.message {
        ids.push(("message.agent_id", &message.agent_id.value));
        ids.push(("message.executor_id", &message.executor_id.value));
    }
    ids.into_iter()
        .try_for_each(|(field, id)| check_id(field, id))
}

/// Tells the master when a subscriber's stream is gone (client closed it or the master ended it).
struct StreamGuard {
    shared: Shared,
    framework_id: String,
    stream_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared
            .lock()
            .framework_disconnected(&self.framework_id, &self.stream_id);
    }
}

struct StreamState {
    events: mpsc::Receiver<Event>,
    overflowed: Arc<AtomicBool>,
    heartbeat: tokio::time::Interval,
    format: Format,
    _guard: StreamGuard,
}

fn event_stream(
    shared: Shared,
    format: Format,
    subscription: crate::master::Subscription,
) -> Response {
    let period = shared
        .lock()
        .config
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let state = StreamState {
        events: subscription.events,
        overflowed: subscription.overflowed,
        heartbeat,
        format,
        _guard: StreamGuard {
            shared,
            framework_id: subscription.framework_id,
            stream_id: subscription.stream_id.clone(),
        },
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        if state.overflowed.load(Ordering::SeqCst) {
            return None; // it missed events: it must subscribe again
        }
        let event = tokio::select! {
            event = state.events.recv() => event?,
            _ = state.heartbeat.tick() => Event { r#type: Some(event::Type::Heartbeat as i32), ..Default::default() },
        };
        let record = recordio::encode(&state.format.encode(&event));
        Some((Ok::<_, Infallible>(Bytes::from(record)), state))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(value) = HeaderValue::from_str(&subscription.stream_id) {
        headers.insert(STREAM_ID_HEADER, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
