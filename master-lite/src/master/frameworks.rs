//! Frameworks: SUBSCRIBE (new or failing over), the scheduler's event
//! stream, TEARDOWN and the failover timeout, REVIVE and SUPPRESS, and the
//! roles a framework may subscribe with.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1 as link;
use butte_api::mesos::v1::scheduler::{Event, call, event};
use butte_api::mesos::v1::{FrameworkId, FrameworkInfo, TaskState, framework_info::capability};
use butte_api::task_state::is_terminal;
use butte_api::update_queue::{push_bounded, unix_now};
use tokio::sync::mpsc;

use super::{COMPLETED_KEPT, Master, Refusal, TaskEntry};

/// How many events may wait for a scheduler. One that falls this far
/// behind loses its stream: it subscribes again, and its unacknowledged
/// updates are sent again (its offers are rescinded).
pub const EVENT_QUEUE: usize = 65_536;

/// A subscribed scheduler's event stream.
pub struct EventStream {
    pub stream_id: String,
    events: mpsc::Sender<Event>,
    /// Set when an event did not fit: the HTTP side ends the stream.
    overflowed: Arc<AtomicBool>,
}

impl EventStream {
    pub(super) fn send(&self, event: Event) {
        // A closed stream is noticed by its guard; nothing to do here.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event)
            && !self.overflowed.swap(true, Ordering::SeqCst)
        {
            tracing::error!(
                stream_id = self.stream_id,
                bound = EVENT_QUEUE,
                "a scheduler's event queue is full (it reads too slowly); its stream is closed, and it must subscribe again"
            );
        }
    }
}

/// Whether a framework's scheduler is subscribed. A disconnected one has its
/// failover timeout, counted from `since`, to subscribe again.
pub enum Connection {
    Connected(EventStream),
    Disconnected { since: Instant },
}

impl Connection {
    pub fn is_connected(&self) -> bool {
        matches!(self, Connection::Connected(_))
    }

    pub fn stream(&self) -> Option<&EventStream> {
        match self {
            Connection::Connected(stream) => Some(stream),
            Connection::Disconnected { .. } => None,
        }
    }

    pub(super) fn send(&self, event: Event) {
        if let Connection::Connected(stream) = self {
            stream.send(event);
        }
    }

    /// The stream `stream_id` ended; true when it was the current one (a
    /// replaced stream's end changes nothing).
    fn disconnect(&mut self, stream_id: &str, now: Instant) -> bool {
        let current = self.stream().is_some_and(|s| s.stream_id == stream_id);
        if current {
            *self = Connection::Disconnected { since: now };
        }
        current
    }

    /// The master ends the stream itself (it is stopping).
    pub(super) fn close(&mut self, now: Instant) {
        if self.is_connected() {
            *self = Connection::Disconnected { since: now };
        }
    }

    /// Whether the scheduler has been away for `timeout` or longer.
    fn failed_over(&self, timeout: Duration, now: Instant) -> bool {
        match self {
            Connection::Connected(_) => false,
            Connection::Disconnected { since } => now.duration_since(*since) >= timeout,
        }
    }
}

pub struct Framework {
    pub info: FrameworkInfo,
    pub connection: Connection,
    pub registered_time: f64,
    pub reregistered_time: Option<f64>,
    pub tasks: BTreeMap<String, TaskEntry>,
    pub completed_tasks: VecDeque<butte_api::mesos::v1::Task>,
    pub offers: HashSet<String>,
    /// Read back from the registry after a master restart and not yet
    /// re-subscribed: its scheduler had no chance to come back before now.
    pub restored: bool,
}

impl Framework {
    fn new(info: FrameworkInfo, connection: Connection, registered_time: f64) -> Self {
        Self {
            info,
            connection,
            registered_time,
            reregistered_time: None,
            tasks: BTreeMap::new(),
            completed_tasks: VecDeque::new(),
            offers: HashSet::new(),
            restored: false,
        }
    }

    pub fn id(&self) -> &str {
        self.info.id.as_ref().map_or("", |f| f.value.as_str())
    }

    pub fn roles(&self) -> Vec<String> {
        roles_of(&self.info)
    }

    pub fn has_capability(&self, kind: capability::Type) -> bool {
        has_capability(&self.info, kind)
    }

    /// Whether the scheduler is subscribed now.
    pub fn connected(&self) -> bool {
        self.connection.is_connected()
    }

    fn failover_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.info.failover_timeout.unwrap_or(0.0))
            .unwrap_or(Duration::MAX)
    }

    /// The scheduler (re)subscribed on `stream`, which has seen none of the
    /// pending updates: each task's oldest is sent again.
    fn connect(&mut self, stream: EventStream) {
        self.connection = Connection::Connected(stream);
        self.restored = false;
        for entry in self.tasks.values_mut() {
            entry.updates.resend_now();
        }
    }
}

pub(super) fn has_capability(info: &FrameworkInfo, kind: capability::Type) -> bool {
    info.capabilities.iter().any(|c| c.r#type() == kind)
}

/// The roles a framework subscribes with: `roles` under MULTI_ROLE, else `role` ("*" by default).
pub fn roles_of(info: &FrameworkInfo) -> Vec<String> {
    if has_capability(info, capability::Type::MultiRole) {
        info.roles.clone()
    } else {
        vec![info.role.clone().unwrap_or_else(|| "*".to_owned())]
    }
}

/// What a successful SUBSCRIBE hands to the HTTP layer.
pub struct Subscription {
    pub framework_id: String,
    pub stream_id: String,
    pub events: mpsc::Receiver<Event>,
    /// Set when an event was dropped: the stream is to end.
    pub overflowed: Arc<AtomicBool>,
}

impl Master {
    /// SUBSCRIBE: a new framework, or a known one re-subscribing (failover).
    /// Subscribes a framework, new or known by its id. `principal`: who
    /// authenticated (None where frameworks do not authenticate); it
    /// becomes the framework's principal, and a known framework keeps the
    /// principal it registered with (as Mesos: it cannot change, so nobody
    /// else takes the framework over).
    pub fn subscribe(
        &mut self,
        call_framework_id: Option<String>,
        subscribe: call::Subscribe,
        principal: Option<&str>,
    ) -> Result<Subscription, Refusal> {
        let mut info = subscribe.framework_info;
        let info_id = info.id.as_ref().map(|f| f.value.clone());
        if call_framework_id.is_some() && call_framework_id != info_id {
            return Err(Refusal::bad_request(
                "'framework_id' differs from 'subscribe.framework_info.id'; send the same id in both",
            ));
        }
        if let Some(principal) = principal {
            match info.principal.as_deref() {
                Some(given) if given != principal => {
                    return Err(Refusal::forbidden(format!(
                        "'framework_info.principal' is '{given}' but the request authenticated as '{principal}'; leave it out or send '{principal}'"
                    )));
                }
                _ => info.principal = Some(principal.to_owned()),
            }
        }
        if let Some(id) = &info_id
            && let Some(known) = self.frameworks.get(id)
            && known.info.principal != info.principal
        {
            let shown = |p: &Option<String>| {
                p.as_deref()
                    .map_or("no principal".to_owned(), |p| format!("principal '{p}'"))
            };
            return Err(Refusal::forbidden(format!(
                "framework {id} was registered with {} and cannot be subscribed with {}; a framework's principal cannot change",
                shown(&known.info.principal),
                shown(&info.principal)
            )));
        }
        validate_roles(&info)?;
        for role in roles_of(&info) {
            self.acls
                .check(
                    crate::acls::Action::RegisterFrameworks,
                    info.principal.as_deref(),
                    Some(&role),
                )
                .map_err(Refusal::forbidden)?;
        }
        let (sender, receiver) = mpsc::channel(EVENT_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let stream_id = uuid::Uuid::new_v4().to_string();

        if let Some(id) = &info_id
            && self.is_removed(id)
        {
            let _ = sender.try_send(error_event(&format!(
                "Framework {id} has been removed; subscribe without an id"
            )));
            return Ok(Subscription {
                framework_id: id.clone(),
                stream_id,
                events: receiver,
                overflowed,
            });
        }

        let framework_id = match info_id {
            Some(id) => id,
            None => self.assign_framework_id(&mut info),
        };
        self.registry.put_framework(&info)?;

        let roles = roles_of(&info);
        let gpu_aware = has_capability(&info, capability::Type::GpuResources);
        let stream = EventStream {
            stream_id: stream_id.clone(),
            events: sender,
            overflowed: overflowed.clone(),
        };
        let resubscribe = self.connect_framework(&framework_id, info, stream);
        self.allocator
            .add_framework(&framework_id, &roles, gpu_aware);
        self.allocator.revive(&framework_id, &[]);
        if !subscribe.suppressed_roles.is_empty() {
            self.allocator
                .suppress(&framework_id, &subscribe.suppressed_roles);
        }
        self.send_event(&framework_id, self.subscribed_event(&framework_id));
        self.resend_pending_updates(Instant::now());
        tracing::info!(framework_id, resubscribe, "framework subscribed");
        self.want_allocation();
        Ok(Subscription {
            framework_id,
            stream_id,
            events: receiver,
            overflowed,
        })
    }

    fn is_removed(&self, framework_id: &str) -> bool {
        self.completed_frameworks
            .iter()
            .any(|f| f.id.as_ref().is_some_and(|i| i.value == framework_id))
    }

    fn assign_framework_id(&mut self, info: &mut FrameworkInfo) -> String {
        let id = format!("{}-{:04}", self.master_id(), self.next_framework);
        self.next_framework += 1;
        let counter = self.next_framework.to_string();
        let result = self.registry.put_meta("next_framework", &counter);
        self.persist(result);
        info.id = Some(FrameworkId { value: id.clone() });
        id
    }

    /// Puts the framework on `stream`; true when it was known (a failover).
    fn connect_framework(
        &mut self,
        framework_id: &str,
        info: FrameworkInfo,
        stream: EventStream,
    ) -> bool {
        let now = unix_now();
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            let connection = Connection::Connected(stream);
            let framework = Framework::new(info, connection, now);
            self.frameworks.insert(framework_id.to_owned(), framework);
            return false;
        };
        framework.reregistered_time = Some(now);
        framework.info = info;
        framework.connect(stream);
        // Offers made to the old scheduler instance are void (as in Mesos).
        self.rescind_framework_offers(framework_id, false);
        true
    }

    fn subscribed_event(&self, framework_id: &str) -> Event {
        Event {
            r#type: Some(event::Type::Subscribed as i32),
            subscribed: Some(event::Subscribed {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                heartbeat_interval_seconds: Some(self.config.heartbeat_interval.as_secs_f64()),
                master_info: Some(self.info.clone()),
            }),
            ..Default::default()
        }
    }

    /// A framework read back from the registry: disconnected until its
    /// scheduler subscribes again.
    pub(super) fn restore_framework(&mut self, info: FrameworkInfo, now: Instant) {
        let id = info.id.as_ref().map_or(String::new(), |f| f.value.clone());
        self.allocator.add_framework(
            &id,
            &roles_of(&info),
            has_capability(&info, capability::Type::GpuResources),
        );
        self.allocator.set_framework_active(&id, false);
        let connection = Connection::Disconnected { since: now };
        let mut framework = Framework::new(info, connection, self.start_time);
        framework.restored = true;
        self.frameworks.insert(id, framework);
    }

    /// Checks that a call comes from the framework's current stream.
    /// Where frameworks authenticate: a call about a framework must come
    /// from its principal.
    pub fn check_principal(&self, framework_id: &str, principal: &str) -> Result<(), Refusal> {
        let registered = self
            .frameworks
            .get(framework_id)
            .and_then(|f| f.info.principal.as_deref());
        if registered == Some(principal) {
            return Ok(());
        }
        Err(Refusal::forbidden(format!(
            "the request authenticated as '{principal}', which is not framework {framework_id}'s principal"
        )))
    }

    pub fn check_stream(&self, framework_id: &str, stream_id: Option<&str>) -> Result<(), Refusal> {
        let stream = self
            .frameworks
            .get(framework_id)
            .and_then(|f| f.connection.stream())
            .ok_or_else(|| {
                Refusal::forbidden(format!(
                    "framework {framework_id} is not subscribed; SUBSCRIBE first"
                ))
            })?;
        match stream_id {
            None => Err(Refusal::forbidden(
                "all non-subscribe calls must include the 'Mesos-Stream-Id' header from the SUBSCRIBE response",
            )),
            Some(id) if id != stream.stream_id => Err(Refusal::forbidden(format!(
                "the stream id '{id}' in this request does not match framework {framework_id}'s subscription"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The scheduler's stream closed.
    pub fn framework_disconnected(&mut self, framework_id: &str, stream_id: &str) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        if !framework.connection.disconnect(stream_id, Instant::now()) {
            return;
        }
        self.allocator.set_framework_active(framework_id, false);
        self.rescind_framework_offers(framework_id, false);
        tracing::info!(
            framework_id,
            "framework disconnected; waiting failover_timeout for it to come back"
        );
    }

    /// Removes the frameworks whose schedulers stayed away past their
    /// failover timeout. After a master restart a framework gets at least
    /// the agents' re-register window to re-subscribe, whatever its own
    /// timeout (a `failover_timeout` of 0 would otherwise lose every task
    /// at the first tick, before its scheduler could find the new master).
    pub(super) fn fail_over_frameworks(&mut self, now: Instant) {
        let restart_window = self.config.agent_reregister_timeout;
        let failed_over: Vec<String> = self
            .frameworks
            .iter()
            .filter(|(_, f)| {
                let window = if f.restored {
                    f.failover_timeout().max(restart_window)
                } else {
                    f.failover_timeout()
                };
                f.connection.failed_over(window, now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in failed_over {
            self.remove_framework(
                &id,
                "failover_timeout passed without the scheduler re-subscribing",
            );
        }
    }

    /// TEARDOWN, or failover timeout: kills the framework's tasks and forgets it.
    pub fn remove_framework(&mut self, framework_id: &str, why: &str) {
        self.rescind_framework_offers(framework_id, false);
        let Some(mut framework) = self.frameworks.remove(framework_id) else {
            return;
        };
        let now = Instant::now();
        let mut agents = HashSet::new();
        for (_, mut entry) in std::mem::take(&mut framework.tasks) {
            let agent_id = entry.task.agent_id.value.clone();
            if entry.take_booked() {
                self.allocator.recover(
                    framework_id,
                    &agent_id,
                    &entry.role,
                    &entry.resources,
                    None,
                    now,
                );
            }
            if !is_terminal(entry.state()) {
                entry.task.state = TaskState::TaskKilled as i32;
            }
            agents.insert(agent_id);
            push_bounded(&mut framework.completed_tasks, entry.task, COMPLETED_KEPT);
        }
        for agent_id in agents {
            self.send_to_agent(
                &agent_id,
                link::master_message::Kind::ShutdownFramework(link::ShutdownFramework {
                    framework_id: FrameworkId {
                        value: framework_id.to_owned(),
                    },
                }),
            );
        }
        self.allocator.remove_framework(framework_id);
        let result = self.registry.remove_framework(framework_id);
        self.persist(result);
        push_bounded(
            &mut self.completed_frameworks,
            framework.info,
            COMPLETED_KEPT,
        );
        tracing::info!(framework_id, why, "framework removed");
        // Dropping `framework.connection` ends its event stream.
    }

    pub fn revive(&mut self, framework_id: &str, roles: &[String]) {
        self.allocator.revive(framework_id, roles);
        self.want_allocation();
    }

    pub fn suppress(&mut self, framework_id: &str, roles: &[String]) {
        self.allocator.suppress(framework_id, roles);
    }
}

fn validate_roles(info: &FrameworkInfo) -> Result<(), Refusal> {
    let multi = has_capability(info, capability::Type::MultiRole);
    if multi && info.role.is_some() {
        return Err(Refusal::bad_request(
            "'framework_info.role' must not be set with the MULTI_ROLE capability; use 'roles'",
        ));
    }
    if !multi && !info.roles.is_empty() {
        return Err(Refusal::bad_request(
            "'framework_info.roles' needs the MULTI_ROLE capability; add it or use 'role'",
        ));
    }
    let roles = roles_of(info);
    if roles.is_empty() {
        return Err(Refusal::bad_request(
            "a MULTI_ROLE framework must name at least one role in 'roles'",
        ));
    }
    let mut seen = HashSet::new();
    for role in &roles {
        if !valid_role(role) {
            return Err(Refusal::bad_request(format!(
                "role {role:?} is invalid: use a non-empty name without whitespace, not '.', '..', or starting with '-'"
            )));
        }
        if !seen.insert(role) {
            return Err(Refusal::bad_request(format!(
                "role {role:?} is listed twice"
            )));
        }
    }
    Ok(())
}

fn valid_role(role: &str) -> bool {
    !(role.is_empty()
        || role == "."
        || role == ".."
        || role.starts_with('-')
        || role.starts_with('/')
        || role.ends_with('/')
        || role.contains("//")
        || role.chars().any(|c| c.is_whitespace() || c.is_control()))
}

pub(super) fn error_event(message: &str) -> Event {
    Event {
        r#type: Some(event::Type::Error as i32),
        error: Some(event::Error {
            message: message.to_owned(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use std::sync::atomic::Ordering;

    use butte_api::mesos::v1::scheduler::Event;

    use super::{Connection, EVENT_QUEUE};
    use crate::master::fixture;

    #[test]
    fn disconnected_framework_is_removed_once_its_failover_timeout_passes() {
        let mut master = fixture::master("failover", |_| {});
        let subscription = fixture::framework(&mut master, Some(60.0));
        let id = subscription.framework_id.clone();

        master.framework_disconnected(&id, "an older stream");
        assert!(
            master.frameworks[&id].connected(),
            "the end of a stream that is not the current one changes nothing"
        );

        master.framework_disconnected(&id, &subscription.stream_id);
        let since = match master.frameworks[&id].connection {
            Connection::Disconnected { since } => since,
            Connection::Connected(_) => panic!("framework {id} is still connected"),
        };
        assert!(
            master
                .allocator
                .allocated(&id)
                .is_some_and(|a| a.is_empty())
        );

        master.fail_over_frameworks(since + Duration::from_secs(59));
        assert!(
            master.frameworks.contains_key(&id),
            "59 s into a 60 s failover timeout the framework is kept"
        );

        master.fail_over_frameworks(since + Duration::from_secs(60));
        assert!(!master.frameworks.contains_key(&id));
        assert!(
            master
                .completed_frameworks
                .iter()
                .any(|f| f.id.as_ref().is_some_and(|i| i.value == id)),
            "a framework that failed over is listed as completed"
        );
        assert!(master.allocator.allocated(&id).is_none());
    }

    #[test]
    fn resubscribing_within_the_failover_timeout_keeps_the_framework() {
        let mut master = fixture::master("resubscribe", |_| {});
        let first = fixture::framework(&mut master, Some(60.0));
        let id = first.framework_id.clone();
        master.framework_disconnected(&id, &first.stream_id);

        let info = master.frameworks[&id].info.clone();
        let subscribe = butte_api::mesos::v1::scheduler::call::Subscribe {
            framework_info: info,
            ..Default::default()
        };
        let second = master
            .subscribe(Some(id.clone()), subscribe, None)
            .expect("the framework subscribes again");
        assert!(master.frameworks[&id].connected());
        assert!(master.frameworks[&id].reregistered_time.is_some());
        master.fail_over_frameworks(Instant::now() + Duration::from_secs(3600));
        assert!(master.frameworks.contains_key(&id));
        assert!(master.check_stream(&id, Some(&second.stream_id)).is_ok());
        assert!(master.check_stream(&id, Some(&first.stream_id)).is_err());
    }

    #[test]
    fn a_scheduler_that_falls_a_queue_behind_loses_its_stream() {
        let mut master = fixture::master("event-queue", |_| {});
        let subscription = fixture::framework(&mut master, Some(60.0));
        let id = subscription.framework_id.clone();
        // SUBSCRIBED (and maybe more) waits there already.
        for _ in subscription.events.len()..EVENT_QUEUE {
            master.send_event(&id, Event::default());
        }
        assert!(!subscription.overflowed.load(Ordering::SeqCst));
        master.send_event(&id, Event::default());
        assert!(
            subscription.overflowed.load(Ordering::SeqCst),
            "the event past the bound marks the stream for closing"
        );
        assert_eq!(subscription.events.len(), EVENT_QUEUE);
    }
}
