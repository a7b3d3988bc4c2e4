//! The master's state and every change to it: frameworks, agents, offers and
//! tasks. All changes run under one lock and never wait; what must leave the
//! process (events to frameworks, messages to agents) is queued on channels.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use butte_api::agent_link::v1 as link;
use butte_api::mesos::v1::scheduler::{Event, call, event};
use butte_api::mesos::v1::{
    AgentId, AgentInfo, FrameworkId, FrameworkInfo, MasterInfo, Offer, OfferId, Task, TaskId,
    TaskInfo, TaskState, TaskStatus, framework_info::capability, offer::operation,
    resource::AllocationInfo, task_status,
};
use butte_api::resources::Resources;
use tokio::sync::{Notify, mpsc};

use crate::allocator::Allocator;
use crate::config::MasterConfig;
use crate::registry::{Registry, RegistryError};
use butte_api::task_state::{is_terminal, may_transition};

/// Seconds between heartbeats an agent is told to send.
pub const AGENT_HEARTBEAT_SECONDS: f64 = 5.0;
/// Completed tasks and frameworks kept for the views.
const COMPLETED_KEPT: usize = 1000;
/// Longest wait between resends of an unacknowledged update.
const MAX_UPDATE_BACKOFF: Duration = Duration::from_secs(600);

/// The master, behind the one lock that all its changes take.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Mutex<Master>>,
    /// Wakes the allocation loop before its next tick.
    pub allocation_wanted: Arc<Notify>,
}

impl Shared {
    pub fn new(master: Master) -> Self {
        let allocation_wanted = master.allocation_wanted.clone();
        Self {
            inner: Arc::new(Mutex::new(master)),
            allocation_wanted,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Master> {
        // A panic under the lock is a bug; keep serving with the state as it is.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a call was refused, with the HTTP status it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: 403,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
        }
    }
}

impl From<RegistryError> for Refusal {
    fn from(error: RegistryError) -> Self {
        Refusal::unavailable(format!("the master could not persist the change: {error}"))
    }
}

pub struct Connection {
    pub stream_id: String,
    events: mpsc::UnboundedSender<Event>,
}

/// A status update waiting for the framework's acknowledgement.
#[derive(Debug, Clone)]
struct PendingUpdate {
    status: TaskStatus,
    sent_at: Option<Instant>,
    backoff: Duration,
}

pub struct TaskEntry {
    pub task: Task,
    pub role: String,
    pub resources: Resources,
    /// Updates not yet acknowledged, oldest first; only the oldest is in flight.
    pending: VecDeque<PendingUpdate>,
    /// Recently acknowledged uuids, to re-acknowledge an agent's resend.
    acknowledged: VecDeque<Vec<u8>>,
    resources_recovered: bool,
}

impl TaskEntry {
    pub fn state(&self) -> TaskState {
        self.task.state()
    }
}

pub struct Framework {
    pub info: FrameworkInfo,
    pub connection: Option<Connection>,
    pub disconnected_since: Option<Instant>,
    pub registered_time: f64,
    pub reregistered_time: Option<f64>,
    pub tasks: BTreeMap<String, TaskEntry>,
    pub completed_tasks: VecDeque<Task>,
    pub offers: HashSet<String>,
}

impl Framework {
    pub fn id(&self) -> &str {
        self.info.id.as_ref().map_or("", |f| f.value.as_str())
    }

    pub fn roles(&self) -> Vec<String> {
        roles_of(&self.info)
    }

    pub fn has_capability(&self, kind: capability::Type) -> bool {
        has_capability(&self.info, kind)
    }
}

fn has_capability(info: &FrameworkInfo, kind: capability::Type) -> bool {
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

pub struct AgentLinkHandle {
    epoch: u64,
    messages: mpsc::UnboundedSender<link::MasterMessage>,
}

pub struct Agent {
    pub info: AgentInfo,
    pub total: Resources,
    pub version: String,
    pub link: Option<AgentLinkHandle>,
    pub last_seen: Instant,
    pub registered_time: f64,
    pub reregistered_time: Option<f64>,
    pub disconnected_since: Option<Instant>,
    pub unreachable: bool,
}

impl Agent {
    pub fn id(&self) -> &str {
        self.info.id.as_ref().map_or("", |a| a.value.as_str())
    }

    pub fn connected(&self) -> bool {
        self.link.is_some()
    }
}

pub struct OutstandingOffer {
    pub id: String,
    pub framework_id: String,
    pub agent_id: String,
    pub role: String,
    pub resources: Resources,
    pub created: Instant,
}

/// What a successful SUBSCRIBE hands to the HTTP layer.
pub struct Subscription {
    pub framework_id: String,
    pub stream_id: String,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Monotonic counters for /metrics.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub offers_sent: u64,
    pub offers_declined: u64,
    pub offers_rescinded: u64,
    pub offers_accepted: u64,
    pub tasks_launched: u64,
    pub tasks_invalid: u64,
    pub status_updates: u64,
    pub allocation_runs: u64,
    pub allocation_last_ms: f64,
    pub registry_errors: u64,
}

pub struct Master {
    pub config: Arc<MasterConfig>,
    pub info: MasterInfo,
    offer_prefix: String,
    registry: Registry,
    pub allocator: Allocator,
    pub frameworks: HashMap<String, Framework>,
    pub completed_frameworks: VecDeque<FrameworkInfo>,
    pub agents: HashMap<String, Agent>,
    pub offers: HashMap<String, OutstandingOffer>,
    next_offer: u64,
    next_framework: u64,
    next_agent: u64,
    next_epoch: u64,
    pub started: Instant,
    pub start_time: f64,
    pub counters: Counters,
    allocation_wanted: Arc<Notify>,
    /// Per-task telemetry the agents stream.
    pub telemetry: crate::telemetry::TelemetryStore,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn new_uuid_bytes() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

fn refuse_duration(filters: Option<&butte_api::mesos::v1::Filters>) -> Duration {
    let seconds = filters.and_then(|f| f.refuse_seconds).unwrap_or(5.0);
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(5))
}

impl Master {
    /// Opens the registry under the work dir and restores what it holds.
    pub fn open(config: MasterConfig, listen: std::net::SocketAddr) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(&config.work_dir).map_err(|e| RegistryError::Store {
            what: "open",
            detail: format!("cannot create work dir {}: {e}", config.work_dir.display()),
        })?;
        let registry = Registry::open(&config.work_dir.join("registry.redb"))?;
        let recovered = registry.recover()?;
        let master_id = match recovered.master_id {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                registry.put_meta("master_id", &id)?;
                id
            }
        };
        let hostname = listen.ip().to_string();
        let ip = match listen.ip() {
            std::net::IpAddr::V4(v4) => u32::from_le_bytes(v4.octets()),
            std::net::IpAddr::V6(_) => 0,
        };
        let info = MasterInfo {
            id: master_id.clone(),
            ip,
            port: u32::from(listen.port()),
            pid: Some(format!("master@{listen}")),
            hostname: Some(hostname.clone()),
            version: Some(butte_api::MESOS_VERSION.to_owned()),
            address: Some(butte_api::mesos::v1::Address {
                hostname: Some(hostname),
                ip: Some(listen.ip().to_string()),
                port: i32::from(listen.port()),
            }),
            ..Default::default()
        };
        let mut allocator = Allocator::new();
        for (role, weight) in config
            .role_weights()
            .map_err(|detail| RegistryError::Store {
                what: "open",
                detail,
            })?
        {
            allocator.set_weight(&role, weight);
        }
        let now = Instant::now();
        let mut master = Master {
            config: Arc::new(config),
            info,
            offer_prefix: format!(
                "{master_id}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            registry,
            allocator,
            frameworks: HashMap::new(),
            completed_frameworks: VecDeque::new(),
            agents: HashMap::new(),
            offers: HashMap::new(),
            next_offer: 0,
            next_framework: recovered.next_framework,
            next_agent: recovered.next_agent,
            next_epoch: 0,
            started: now,
            start_time: unix_now(),
            counters: Counters::default(),
            allocation_wanted: Arc::new(Notify::new()),
            telemetry: crate::telemetry::TelemetryStore::default(),
        };
        // Recovered frameworks wait for their schedulers (failover_timeout from now);
        // recovered agents wait to re-register and are not offered until then.
        for info in recovered.frameworks {
            let id = info.id.as_ref().map_or(String::new(), |f| f.value.clone());
            master.allocator.add_framework(
                &id,
                &roles_of(&info),
                has_capability(&info, capability::Type::GpuResources),
            );
            master.allocator.set_framework_active(&id, false);
            master.frameworks.insert(
                id,
                Framework {
                    info,
                    connection: None,
                    disconnected_since: Some(now),
                    registered_time: master.start_time,
                    reregistered_time: None,
                    tasks: BTreeMap::new(),
                    completed_tasks: VecDeque::new(),
                    offers: HashSet::new(),
                },
            );
        }
        for info in recovered.agents {
            let total = Resources::from_proto(&info.resources).unwrap_or_default();
            let id = info.id.as_ref().map_or(String::new(), |a| a.value.clone());
            master.agents.insert(
                id,
                Agent {
                    info,
                    total,
                    version: String::new(),
                    link: None,
                    last_seen: now,
                    registered_time: master.start_time,
                    reregistered_time: None,
                    disconnected_since: Some(now),
                    unreachable: false,
                },
            );
        }
        for task in recovered.tasks {
            let framework_id = task.framework_id.value.clone();
            let Some(framework) = master.frameworks.get_mut(&framework_id) else {
                continue;
            };
            let resources = Resources::from_proto(&task.resources).unwrap_or_default();
            let role = task
                .resources
                .iter()
                .find_map(|r| r.allocation_info.as_ref().and_then(|a| a.role.clone()))
                .unwrap_or_else(|| "*".to_owned());
            let task_id = task.task_id.value.clone();
            framework.tasks.insert(
                task_id,
                TaskEntry {
                    task,
                    role,
                    resources,
                    pending: VecDeque::new(),
                    acknowledged: VecDeque::new(),
                    resources_recovered: true,
                },
            );
        }
        Ok(master)
    }

    pub fn master_id(&self) -> &str {
        &self.info.id
    }

    fn persist(&mut self, result: Result<(), RegistryError>) {
        if let Err(error) = result {
            self.counters.registry_errors += 1;
            tracing::error!(%error, "registry write failed; the change is live but would not survive a restart");
        }
    }

    fn want_allocation(&self) {
        self.allocation_wanted.notify_one();
    }

    fn send_event(&self, framework_id: &str, event: Event) {
        if let Some(connection) = self
            .frameworks
            .get(framework_id)
            .and_then(|f| f.connection.as_ref())
        {
            // A closed stream is noticed by its guard; nothing to do here.
            let _ = connection.events.send(event);
        }
    }

    /// Tells the agent its update with `uuid` needs no resending.
    fn ack_agent(&self, agent_id: &str, framework_id: &str, task_id: &TaskId, uuid: Vec<u8>) {
        self.send_to_agent(
            agent_id,
            link::master_message::Kind::StatusAck(link::StatusAck {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                task_id: task_id.clone(),
                uuid,
            }),
        );
    }

    fn send_to_agent(&self, agent_id: &str, message: link::master_message::Kind) -> bool {
        match self.agents.get(agent_id).and_then(|a| a.link.as_ref()) {
            Some(handle) => handle
                .messages
                .send(link::MasterMessage {
                    kind: Some(message),
                })
                .is_ok(),
            None => false,
        }
    }

    // ---- frameworks ----------------------------------------------------------------

    /// SUBSCRIBE: a new framework, or a known one re-subscribing (failover).
    pub fn subscribe(
        &mut self,
        call_framework_id: Option<String>,
        subscribe: call::Subscribe,
    ) -> Result<Subscription, Refusal> {
        let mut info = subscribe.framework_info;
        let info_id = info.id.as_ref().map(|f| f.value.clone());
        if call_framework_id.is_some() && call_framework_id != info_id {
            return Err(Refusal::bad_request(
                "'framework_id' differs from 'subscribe.framework_info.id'; send the same id in both",
            ));
        }
        validate_roles(&info)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let stream_id = uuid::Uuid::new_v4().to_string();

        if let Some(id) = &info_id
            && self
                .completed_frameworks
                .iter()
                .any(|f| f.id.as_ref().is_some_and(|i| &i.value == id))
        {
            let _ = sender.send(error_event(&format!(
                "Framework {id} has been removed; subscribe without an id"
            )));
            return Ok(Subscription {
                framework_id: id.clone(),
                stream_id,
                events: receiver,
            });
        }

        let framework_id = match info_id {
            Some(id) => id,
            None => {
                let id = format!("{}-{:04}", self.master_id(), self.next_framework);
                self.next_framework += 1;
                let counter = self.next_framework.to_string();
                let result = self.registry.put_meta("next_framework", &counter);
                self.persist(result);
                info.id = Some(FrameworkId { value: id.clone() });
                id
            }
        };
        self.registry.put_framework(&info)?;

        let now = unix_now();
        let roles = roles_of(&info);
        let gpu_aware = has_capability(&info, capability::Type::GpuResources);
        let resubscribe = self.frameworks.contains_key(&framework_id);
        if resubscribe {
            // Offers made to the old scheduler instance are void (as in Mesos).
            self.rescind_framework_offers(&framework_id, false);
        }
        let framework = self
            .frameworks
            .entry(framework_id.clone())
            .or_insert_with(|| Framework {
                info: info.clone(),
                connection: None,
                disconnected_since: None,
                registered_time: now,
                reregistered_time: None,
                tasks: BTreeMap::new(),
                completed_tasks: VecDeque::new(),
                offers: HashSet::new(),
            });
        if resubscribe {
            framework.reregistered_time = Some(now);
        }
        framework.info = info;
        framework.connection = Some(Connection {
            stream_id: stream_id.clone(),
            events: sender,
        });
        framework.disconnected_since = None;
        // A new stream has seen none of the pending updates: send each task's oldest again.
        for entry in framework.tasks.values_mut() {
            if let Some(head) = entry.pending.front_mut() {
                head.sent_at = None;
            }
        }

        self.allocator
            .add_framework(&framework_id, &roles, gpu_aware);
        self.allocator.revive(&framework_id, &[]);
        if !subscribe.suppressed_roles.is_empty() {
            self.allocator
                .suppress(&framework_id, &subscribe.suppressed_roles);
        }
        self.send_event(
            &framework_id,
            Event {
                r#type: Some(event::Type::Subscribed as i32),
                subscribed: Some(event::Subscribed {
                    framework_id: FrameworkId {
                        value: framework_id.clone(),
                    },
                    heartbeat_interval_seconds: Some(self.config.heartbeat_interval.as_secs_f64()),
                    master_info: Some(self.info.clone()),
                }),
                ..Default::default()
            },
        );
        self.resend_pending_updates(Instant::now());
        tracing::info!(framework_id, resubscribe, "framework subscribed");
        self.want_allocation();
        Ok(Subscription {
            framework_id,
            stream_id,
            events: receiver,
        })
    }

    /// Checks that a call comes from the framework's current stream.
    pub fn check_stream(&self, framework_id: &str, stream_id: Option<&str>) -> Result<(), Refusal> {
        let framework = self.frameworks.get(framework_id).ok_or_else(|| {
            Refusal::forbidden(format!(
                "framework {framework_id} is not subscribed; SUBSCRIBE first"
            ))
        })?;
        let connection = framework.connection.as_ref().ok_or_else(|| {
            Refusal::forbidden(format!(
                "framework {framework_id} is not subscribed; SUBSCRIBE first"
            ))
        })?;
        match stream_id {
            None => Err(Refusal::forbidden(
                "all non-subscribe calls must include the 'Mesos-Stream-Id' header from the SUBSCRIBE response",
            )),
            Some(id) if id != connection.stream_id => Err(Refusal::forbidden(format!(
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
        if framework
            .connection
            .as_ref()
            .is_none_or(|c| c.stream_id != stream_id)
        {
            return;
        }
        framework.connection = None;
        framework.disconnected_since = Some(Instant::now());
        self.allocator.set_framework_active(framework_id, false);
        self.rescind_framework_offers(framework_id, false);
        tracing::info!(
            framework_id,
            "framework disconnected; waiting failover_timeout for it to come back"
        );
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
            if !entry.resources_recovered {
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
            push_bounded(&mut framework.completed_tasks, entry.task);
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
        push_bounded(&mut self.completed_frameworks, framework.info);
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

    // ---- offers --------------------------------------------------------------------

    /// Runs one allocation cycle and sends the offers it made.
    pub fn allocate(&mut self) {
        let started = Instant::now();
        let allocations = self.allocator.allocate(started);
        let mut by_framework: HashMap<String, Vec<Offer>> = HashMap::new();
        for allocation in allocations {
            let Some(agent) = self.agents.get(&allocation.agent_id) else {
                continue;
            };
            let id = format!("{}-O{}", self.offer_prefix, self.next_offer);
            self.next_offer += 1;
            let offer = Offer {
                id: OfferId { value: id.clone() },
                framework_id: FrameworkId {
                    value: allocation.framework_id.clone(),
                },
                agent_id: AgentId {
                    value: allocation.agent_id.clone(),
                },
                hostname: agent.info.hostname.clone(),
                resources: allocation.resources.to_proto(Some(&allocation.role)),
                attributes: agent.info.attributes.clone(),
                allocation_info: Some(AllocationInfo {
                    role: Some(allocation.role.clone()),
                }),
                ..Default::default()
            };
            if let Some(framework) = self.frameworks.get_mut(&allocation.framework_id) {
                framework.offers.insert(id.clone());
            }
            self.offers.insert(
                id.clone(),
                OutstandingOffer {
                    id,
                    framework_id: allocation.framework_id.clone(),
                    agent_id: allocation.agent_id,
                    role: allocation.role,
                    resources: allocation.resources,
                    created: started,
                },
            );
            by_framework
                .entry(allocation.framework_id)
                .or_default()
                .push(offer);
        }
        for (framework_id, offers) in by_framework {
            self.counters.offers_sent += offers.len() as u64;
            self.send_event(
                &framework_id,
                Event {
                    r#type: Some(event::Type::Offers as i32),
                    offers: Some(event::Offers { offers }),
                    ..Default::default()
                },
            );
        }
        self.counters.allocation_runs += 1;
        self.counters.allocation_last_ms = started.elapsed().as_secs_f64() * 1e3;
    }

    /// Takes an offer back: its resources return to the allocator.
    fn rescind_offer(
        &mut self,
        offer_id: &str,
        notify: bool,
        refuse: Option<Duration>,
    ) -> Option<OutstandingOffer> {
        let offer = self.offers.remove(offer_id)?;
        if let Some(framework) = self.frameworks.get_mut(&offer.framework_id) {
            framework.offers.remove(offer_id);
        }
        self.allocator.recover(
            &offer.framework_id,
            &offer.agent_id,
            &offer.role,
            &offer.resources,
            refuse,
            Instant::now(),
        );
        if notify {
            self.counters.offers_rescinded += 1;
            self.send_event(
                &offer.framework_id,
                Event {
                    r#type: Some(event::Type::Rescind as i32),
                    rescind: Some(event::Rescind {
                        offer_id: OfferId {
                            value: offer_id.to_owned(),
                        },
                    }),
                    ..Default::default()
                },
            );
        }
        Some(offer)
    }

    fn rescind_framework_offers(&mut self, framework_id: &str, notify: bool) {
        let ids: Vec<String> = self
            .frameworks
            .get(framework_id)
            .map(|f| f.offers.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.rescind_offer(&id, notify, None);
        }
    }

    fn rescind_agent_offers(&mut self, agent_id: &str) {
        let ids: Vec<String> = self
            .offers
            .values()
            .filter(|o| o.agent_id == agent_id)
            .map(|o| o.id.clone())
            .collect();
        for id in ids {
            self.rescind_offer(&id, true, None);
        }
    }

    pub fn decline(&mut self, framework_id: &str, decline: &call::Decline) {
        let refuse = refuse_duration(decline.filters.as_ref());
        for offer_id in &decline.offer_ids {
            let owned = self
                .offers
                .get(&offer_id.value)
                .is_some_and(|o| o.framework_id == framework_id);
            if owned
                && self
                    .rescind_offer(&offer_id.value, false, Some(refuse))
                    .is_some()
            {
                self.counters.offers_declined += 1;
            }
        }
        self.want_allocation();
    }

    /// ACCEPT: validates the offers and each operation, launches what is
    /// valid, answers what is not with TASK_ERROR / TASK_DROPPED, and gives
    /// back what is left of the offers (filtered for `refuse_seconds`).
    pub fn accept(&mut self, framework_id: &str, accept: call::Accept) {
        let refuse = refuse_duration(accept.filters.as_ref());
        let partition_aware = self
            .frameworks
            .get(framework_id)
            .is_some_and(|f| f.has_capability(capability::Type::PartitionAware));

        // The offers must exist, be ours, be distinct and be on one agent in one role.
        let mut offer_error = None;
        let mut seen = HashSet::new();
        let mut taken = Vec::new();
        for offer_id in &accept.offer_ids {
            let id = offer_id.value.as_str();
            match self.offers.get(id) {
                _ if !seen.insert(id) => {
                    offer_error = Some(format!("offer {id} appears twice in the call"))
                }
                None => offer_error = Some(format!("offer {id} is no longer valid")),
                Some(o) if o.framework_id != framework_id => {
                    offer_error = Some(format!("offer {id} belongs to another framework"))
                }
                Some(_) => taken.push(id.to_owned()),
            }
        }
        if accept.offer_ids.is_empty() {
            offer_error = Some("ACCEPT names no offers".to_owned());
        }
        let offers: Vec<OutstandingOffer> = taken
            .iter()
            .filter_map(|id| self.rescind_offer(id, false, None))
            .collect();
        // Rescinding above returned the resources; book them again while we use them.
        let now = Instant::now();
        if offer_error.is_none() {
            let agents: HashSet<&str> = offers.iter().map(|o| o.agent_id.as_str()).collect();
            let roles: HashSet<&str> = offers.iter().map(|o| o.role.as_str()).collect();
            if agents.len() > 1 {
                offer_error = Some(
                    "the offers are from different agents; accept offers of one agent per call"
                        .into(),
                );
            } else if roles.len() > 1 {
                offer_error = Some(
                    "the offers are allocated to different roles; accept one role per call".into(),
                );
            }
        }
        let tasks_of = |op: &butte_api::mesos::v1::offer::Operation| -> Vec<TaskInfo> {
            let mut tasks = op
                .launch
                .as_ref()
                .map(|l| l.task_infos.clone())
                .unwrap_or_default();
            if let Some(group) = op.launch_group.as_ref().map(|g| &g.task_group) {
                tasks.extend(group.tasks.iter().cloned());
            }
            tasks
        };
        if let Some(message) = offer_error {
            let (state, reason) = if partition_aware {
                (TaskState::TaskDropped, task_status::Reason::InvalidOffers)
            } else {
                (TaskState::TaskLost, task_status::Reason::InvalidOffers)
            };
            for op in &accept.operations {
                for task in tasks_of(op) {
                    self.counters.tasks_invalid += 1;
                    let status =
                        master_status(&task.task_id, Some(&task.agent_id), state, reason, &message);
                    self.send_update_without_ack(framework_id, status);
                }
            }
            // Offers that were valid went back unfiltered above: a mistake is not a refusal.
            self.want_allocation();
            return;
        }
        let Some(first) = offers.first() else { return };
        let agent_id = first.agent_id.clone();
        let role = first.role.clone();
        let mut remaining = Resources::new();
        for offer in &offers {
            remaining.add(&offer.resources);
        }
        self.allocator
            .mark_allocated(framework_id, &agent_id, &role, &remaining);
        self.counters.offers_accepted += offers.len() as u64;

        let mut launched_ids: HashSet<String> = HashSet::new();
        for op in accept.operations {
            match op.r#type() {
                operation::Type::Launch => {
                    let Some(launch) = op.launch else { continue };
                    let mut valid = Vec::new();
                    for task in launch.task_infos {
                        match self.validate_task(
                            framework_id,
                            &agent_id,
                            &task,
                            &remaining,
                            &launched_ids,
                            false,
                        ) {
                            Ok(resources) => {
                                remaining.subtract_contained(&resources);
                                launched_ids.insert(task.task_id.value.clone());
                                valid.push((task, resources));
                            }
                            Err(message) => self.task_error(
                                framework_id,
                                &task,
                                task_status::Reason::TaskInvalid,
                                &message,
                            ),
                        }
                    }
                    if !valid.is_empty() {
                        self.launch(framework_id, &agent_id, &role, valid, None, None);
                    }
                }
                operation::Type::LaunchGroup => {
                    let Some(group_op) = op.launch_group else {
                        continue;
                    };
                    let group = group_op.task_group.clone();
                    let executor = group_op.executor;
                    let executor_error = if executor.executor_id.value.is_empty() {
                        Some("the task group's executor has an empty 'executor_id'".to_owned())
                    } else if group.tasks.is_empty() {
                        Some("the task group has no tasks".to_owned())
                    } else {
                        None
                    };
                    // A group launches whole or not at all.
                    let mut budget = remaining.clone();
                    let mut ids = launched_ids.clone();
                    let mut valid = Vec::new();
                    let mut group_error = executor_error;
                    if group_error.is_none() {
                        match Resources::from_proto(&executor.resources) {
                            Ok(r) if budget.contains(&r) => budget.subtract_contained(&r),
                            Ok(r) => {
                                group_error = Some(format!(
                                    "the executor uses {r}, more than the offers hold ({budget})"
                                ))
                            }
                            Err(e) => group_error = Some(e.to_string()),
                        }
                    }
                    if group_error.is_none() {
                        for task in &group.tasks {
                            match self.validate_task(
                                framework_id,
                                &agent_id,
                                task,
                                &budget,
                                &ids,
                                true,
                            ) {
                                Ok(resources) => {
                                    budget.subtract_contained(&resources);
                                    ids.insert(task.task_id.value.clone());
                                    valid.push((task.clone(), resources));
                                }
                                Err(message) => {
                                    group_error =
                                        Some(format!("task {}: {message}", task.task_id.value));
                                    break;
                                }
                            }
                        }
                    }
                    match group_error {
                        Some(message) => {
                            for task in &group.tasks {
                                self.task_error(
                                    framework_id,
                                    task,
                                    task_status::Reason::TaskGroupInvalid,
                                    &message,
                                );
                            }
                        }
                        None => {
                            remaining = budget;
                            launched_ids = ids;
                            let executor_resources =
                                Resources::from_proto(&executor.resources).unwrap_or_default();
                            // The executor's own resources stay allocated with the first task.
                            if let Some(first) = valid.first_mut() {
                                first.1.add(&executor_resources);
                            }
                            self.launch(
                                framework_id,
                                &agent_id,
                                &role,
                                valid,
                                Some(executor),
                                Some(group),
                            );
                        }
                    }
                }
                other => {
                    tracing::warn!(framework_id, operation = ?other, "offer operation not supported yet; ignored");
                }
            }
        }
        if !remaining.is_empty() {
            self.allocator.recover(
                framework_id,
                &agent_id,
                &role,
                &remaining,
                Some(refuse),
                now,
            );
        }
        self.want_allocation();
    }

    fn validate_task(
        &self,
        framework_id: &str,
        agent_id: &str,
        task: &TaskInfo,
        available: &Resources,
        launching: &HashSet<String>,
        in_group: bool,
    ) -> Result<Resources, String> {
        let id = task.task_id.value.as_str();
        if id.is_empty() || id.contains('/') || id.chars().any(char::is_control) {
            return Err(format!(
                "task id {id:?} is invalid: use a non-empty id without '/' or control characters"
            ));
        }
        let known = self
            .frameworks
            .get(framework_id)
            .is_some_and(|f| f.tasks.contains_key(id));
        if known || launching.contains(id) {
            return Err(format!(
                "task id {id:?} is already in use by this framework"
            ));
        }
        if task.agent_id.value != agent_id {
            return Err(format!(
                "task {id} names agent {} but the offers are from agent {agent_id}",
                task.agent_id.value
            ));
        }
        match (&task.command, &task.executor, in_group) {
            (None, None, _) => {
                return Err(format!("task {id} has neither 'command' nor 'executor'"));
            }
            (Some(_), Some(_), _) => {
                return Err(format!(
                    "task {id} has both 'command' and 'executor'; give one"
                ));
            }
            (_, Some(_), true) => {
                return Err(format!(
                    "task {id} in a group must not have its own 'executor'"
                ));
            }
            (Some(command), None, _) => {
                let value = command.value.as_deref().unwrap_or("");
                if value.trim().is_empty() {
                    return Err(format!(
                        "task {id} has an empty command: set 'command.value'"
                    ));
                }
            }
            (None, Some(executor), false) => {
                if executor.executor_id.value.is_empty() {
                    return Err(format!(
                        "task {id} has an executor with an empty 'executor_id'"
                    ));
                }
            }
        }
        let mut resources =
            Resources::from_proto(&task.resources).map_err(|e| format!("task {id}: {e}"))?;
        if let Some(executor) = task.executor.as_ref().filter(|_| !in_group) {
            resources.add(
                &Resources::from_proto(&executor.resources)
                    .map_err(|e| format!("task {id}'s executor: {e}"))?,
            );
        }
        if resources.is_empty() {
            return Err(format!(
                "task {id} uses no resources; ask for at least cpus or mem"
            ));
        }
        if !available.contains(&resources) {
            return Err(format!(
                "task {id} uses {resources}, more than the offers hold ({available})"
            ));
        }
        Ok(resources)
    }

    fn task_error(
        &mut self,
        framework_id: &str,
        task: &TaskInfo,
        reason: task_status::Reason,
        message: &str,
    ) {
        self.counters.tasks_invalid += 1;
        tracing::info!(
            framework_id,
            task_id = task.task_id.value,
            message,
            "task refused"
        );
        let status = master_status(
            &task.task_id,
            Some(&task.agent_id),
            TaskState::TaskError,
            reason,
            message,
        );
        self.send_update_without_ack(framework_id, status);
    }

    fn launch(
        &mut self,
        framework_id: &str,
        agent_id: &str,
        role: &str,
        tasks: Vec<(TaskInfo, Resources)>,
        executor: Option<butte_api::mesos::v1::ExecutorInfo>,
        group: Option<butte_api::mesos::v1::TaskGroupInfo>,
    ) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        let framework_info = framework.info.clone();
        let mut to_persist = Vec::new();
        for (info, resources) in &tasks {
            let task = Task {
                name: info.name.clone(),
                task_id: info.task_id.clone(),
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                executor_id: executor
                    .as_ref()
                    .map(|e| e.executor_id.clone())
                    .or_else(|| info.executor.as_ref().map(|e| e.executor_id.clone())),
                agent_id: AgentId {
                    value: agent_id.to_owned(),
                },
                state: TaskState::TaskStaging as i32,
                resources: resources.to_proto(Some(role)),
                labels: info.labels.clone(),
                container: info.container.clone(),
                user: framework_info.user.clone().into(),
                ..Default::default()
            };
            to_persist.push(task.clone());
            framework.tasks.insert(
                info.task_id.value.clone(),
                TaskEntry {
                    task,
                    role: role.to_owned(),
                    resources: resources.clone(),
                    pending: VecDeque::new(),
                    acknowledged: VecDeque::new(),
                    resources_recovered: false,
                },
            );
        }
        for task in &to_persist {
            let result = self.registry.put_task(task);
            self.persist(result);
        }
        self.counters.tasks_launched += tasks.len() as u64;
        let message = link::LaunchTasks {
            framework_info,
            tasks: if group.is_some() {
                Vec::new()
            } else {
                tasks.into_iter().map(|(t, _)| t).collect()
            },
            executor,
            task_group: group,
        };
        if !self.send_to_agent(agent_id, link::master_message::Kind::LaunchTasks(message)) {
            // The agent went away between offer and launch: the tasks are lost.
            for task in to_persist {
                let status = TaskStatus {
                    uuid: Some(new_uuid_bytes()),
                    ..master_status(
                        &task.task_id,
                        Some(&task.agent_id),
                        TaskState::TaskLost,
                        task_status::Reason::AgentDisconnected,
                        "the agent disconnected before the launch reached it",
                    )
                };
                self.apply_update(framework_id, status, false);
            }
        }
    }

    // ---- tasks -------------------------------------------------------------------------

    /// KILL: asks the agent to kill the task; an unknown task is answered
    /// with its reconciled state so the scheduler learns it is gone.
    pub fn kill(&mut self, framework_id: &str, kill: &call::Kill) {
        let task_id = kill.task_id.value.as_str();
        let entry = self
            .frameworks
            .get(framework_id)
            .and_then(|f| f.tasks.get(task_id));
        match entry {
            Some(entry) if !is_terminal(entry.state()) => {
                let agent_id = entry.task.agent_id.value.clone();
                let sent = self.send_to_agent(
                    &agent_id,
                    link::master_message::Kind::KillTask(link::KillTask {
                        framework_id: FrameworkId {
                            value: framework_id.to_owned(),
                        },
                        task_id: kill.task_id.clone(),
                        kill_policy: kill.kill_policy,
                    }),
                );
                if !sent {
                    tracing::info!(
                        framework_id,
                        task_id,
                        "kill for a task on a disconnected agent; it is killed when the agent returns"
                    );
                }
            }
            Some(_) => {}
            None => {
                let status =
                    self.reconciled_status(framework_id, &kill.task_id, kill.agent_id.as_ref());
                self.send_update_without_ack(framework_id, status);
            }
        }
    }

    pub fn shutdown_executor(&mut self, framework_id: &str, shutdown: &call::Shutdown) {
        self.send_to_agent(
            &shutdown.agent_id.value,
            link::master_message::Kind::ShutdownExecutor(link::ShutdownExecutor {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                executor_id: shutdown.executor_id.clone(),
            }),
        );
    }

    pub fn message(&mut self, framework_id: &str, message: &call::Message) {
        let sent = self.send_to_agent(
            &message.agent_id.value,
            link::master_message::Kind::FrameworkMessage(link::FrameworkMessage {
                framework_id: FrameworkId {
                    value: framework_id.to_owned(),
                },
                executor_id: message.executor_id.clone(),
                data: message.data.clone(),
            }),
        );
        if !sent {
            tracing::info!(
                framework_id,
                agent_id = message.agent_id.value,
                "message dropped: agent not connected"
            );
        }
    }

    /// RECONCILE: the latest state of the named tasks, or of all tasks when none are named.
    pub fn reconcile(&mut self, framework_id: &str, reconcile: &call::Reconcile) {
        let statuses: Vec<TaskStatus> = if reconcile.tasks.is_empty() {
            self.frameworks
                .get(framework_id)
                .map(|f| f.tasks.values().map(|e| latest_status(&e.task)).collect())
                .unwrap_or_default()
        } else {
            reconcile
                .tasks
                .iter()
                .map(|t| self.reconciled_status(framework_id, &t.task_id, t.agent_id.as_ref()))
                .collect()
        };
        for status in statuses {
            self.send_update_without_ack(framework_id, status);
        }
    }

    fn reconciled_status(
        &self,
        framework_id: &str,
        task_id: &TaskId,
        agent_id: Option<&AgentId>,
    ) -> TaskStatus {
        let framework = self.frameworks.get(framework_id);
        if let Some(entry) = framework.and_then(|f| f.tasks.get(&task_id.value)) {
            return latest_status(&entry.task);
        }
        let partition_aware =
            framework.is_some_and(|f| f.has_capability(capability::Type::PartitionAware));
        let agent_known = agent_id
            .and_then(|a| self.agents.get(&a.value))
            .is_some_and(|a| a.connected());
        let state = match (partition_aware, agent_known) {
            (false, _) => TaskState::TaskLost,
            (true, true) => TaskState::TaskGone,
            (true, false) => TaskState::TaskUnknown,
        };
        master_status(
            task_id,
            agent_id,
            state,
            task_status::Reason::Reconciliation,
            "reconciliation: the master does not know this task",
        )
    }

    /// ACKNOWLEDGE: the framework has the update with `uuid`; tell the agent
    /// and send the task's next pending update.
    pub fn acknowledge(
        &mut self,
        framework_id: &str,
        ack: &call::Acknowledge,
    ) -> Result<(), Refusal> {
        if uuid::Uuid::from_slice(&ack.uuid).is_err() {
            return Err(Refusal::bad_request(
                "'uuid' in ACKNOWLEDGE is not a valid UUID; send back the update's uuid unchanged",
            ));
        }
        let task_id = ack.task_id.value.clone();
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return Ok(());
        };
        let Some(entry) = framework.tasks.get_mut(&task_id) else {
            return Ok(());
        };
        let is_head = entry
            .pending
            .front()
            .is_some_and(|p| p.status.uuid.as_deref() == Some(ack.uuid.as_slice()));
        if !is_head {
            return Ok(());
        }
        entry.pending.pop_front();
        push_bounded_n(&mut entry.acknowledged, ack.uuid.clone(), 16);
        let agent_id = entry.task.agent_id.value.clone();
        let finished = entry.pending.is_empty() && is_terminal(entry.state());
        self.ack_agent(&agent_id, framework_id, &ack.task_id, ack.uuid.clone());
        if finished {
            self.complete_task(framework_id, &task_id);
        } else {
            self.send_due_update(framework_id, &task_id, Instant::now());
        }
        Ok(())
    }

    fn complete_task(&mut self, framework_id: &str, task_id: &str) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        let Some(entry) = framework.tasks.remove(task_id) else {
            return;
        };
        let result = self.registry.remove_task(&entry.task);
        push_bounded(&mut framework.completed_tasks, entry.task);
        self.persist(result);
    }

    /// An update the framework need not acknowledge (reconciliation, refused launches).
    fn send_update_without_ack(&self, framework_id: &str, status: TaskStatus) {
        self.send_event(framework_id, update_event(status));
    }

    /// Applies a status update to the task and queues it for the framework.
    /// `from_agent`: the agent waits for our acknowledgement of this uuid.
    fn apply_update(&mut self, framework_id: &str, mut status: TaskStatus, from_agent: bool) {
        let task_id = status.task_id.value.clone();
        let now = Instant::now();
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        let Some(entry) = framework.tasks.get_mut(&task_id) else {
            return;
        };
        let uuid = status.uuid.clone().unwrap_or_default();
        if entry
            .pending
            .iter()
            .any(|p| p.status.uuid.as_deref() == Some(uuid.as_slice()))
        {
            return; // a resend of what we already hold
        }
        if entry.acknowledged.contains(&uuid) {
            let agent_id = entry.task.agent_id.value.clone();
            if from_agent {
                self.ack_agent(&agent_id, framework_id, &status.task_id, uuid);
            }
            return;
        }
        let state = status.state();
        let current = entry.state();
        if !may_transition(current, state) && current != state {
            tracing::warn!(
                framework_id,
                task_id,
                ?current,
                ?state,
                "ignoring a status update that does not follow the task's state"
            );
            // Acknowledge it anyway, or the agent would resend it forever.
            if from_agent {
                let agent_id = entry.task.agent_id.value.clone();
                self.ack_agent(&agent_id, framework_id, &status.task_id, uuid);
            }
            return;
        }
        status.agent_id = Some(entry.task.agent_id.clone());
        if status.timestamp.is_none() {
            status.timestamp = Some(unix_now());
        }
        entry.task.state = state as i32;
        entry.task.status_update_state = Some(state as i32);
        entry.task.status_update_uuid = status.uuid.clone();
        entry.task.statuses.push(status.clone());
        if entry.task.statuses.len() > 8 {
            entry.task.statuses.remove(0);
        }
        entry.pending.push_back(PendingUpdate {
            status,
            sent_at: None,
            backoff: self.config.status_update_retry,
        });
        let release = is_terminal(state) && !entry.resources_recovered;
        if release {
            entry.resources_recovered = true;
        }
        let (role, resources, agent_id) = (
            entry.role.clone(),
            entry.resources.clone(),
            entry.task.agent_id.value.clone(),
        );
        let task = entry.task.clone();
        self.counters.status_updates += 1;
        let result = self.registry.put_task(&task);
        self.persist(result);
        if release {
            self.allocator
                .recover(framework_id, &agent_id, &role, &resources, None, now);
            self.want_allocation();
        }
        self.send_due_update(framework_id, &task_id, now);
    }

    /// Sends each task's oldest unacknowledged update when it is due (timer
    /// and re-subscription: every task may be due).
    fn resend_pending_updates(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (framework_id, framework) in &mut self.frameworks {
            if framework.connection.is_none() {
                continue;
            }
            for entry in framework.tasks.values_mut() {
                if let Some(status) = take_due(entry, now) {
                    due.push((framework_id.clone(), status));
                }
            }
        }
        for (framework_id, status) in due {
            self.send_event(&framework_id, update_event(status));
        }
    }

    /// The same for one task, after its own update or acknowledgement: no
    /// other task can have become due, so none is scanned.
    fn send_due_update(&mut self, framework_id: &str, task_id: &str, now: Instant) {
        let Some(framework) = self.frameworks.get_mut(framework_id) else {
            return;
        };
        if framework.connection.is_none() {
            return;
        }
        let Some(status) = framework
            .tasks
            .get_mut(task_id)
            .and_then(|entry| take_due(entry, now))
        else {
            return;
        };
        self.send_event(framework_id, update_event(status));
    }

    // ---- agents ------------------------------------------------------------------------

    /// An agent opened its link and registered (or re-registered with its id).
    pub fn register_agent(
        &mut self,
        register: link::Register,
        messages: mpsc::UnboundedSender<link::MasterMessage>,
    ) -> Result<(String, u64), String> {
        let total = Resources::from_proto(&register.total_resources)
            .map_err(|e| format!("invalid agent resources: {e}"))?;
        if register.agent_info.hostname.is_empty() {
            return Err("agent_info.hostname is empty; set the agent's --hostname or --ip".into());
        }
        let mut info = register.agent_info;
        let now = Instant::now();
        let (agent_id, reregister) = match info
            .id
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
        {
            Some(id) => (id, true),
            None => {
                let id = format!("{}-S{}", self.master_id(), self.next_agent);
                self.next_agent += 1;
                let counter = self.next_agent.to_string();
                let result = self.registry.put_meta("next_agent", &counter);
                self.persist(result);
                (id, false)
            }
        };
        info.id = Some(AgentId {
            value: agent_id.clone(),
        });
        info.resources = total.to_proto(None);
        self.registry.put_agent(&info).map_err(|e| e.to_string())?;

        // A previous link of this agent is replaced; its offers are void.
        self.rescind_agent_offers(&agent_id);
        self.allocator.add_agent(&agent_id, total.clone());
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let registered_time = unix_now();
        let previous = self.agents.remove(&agent_id);
        self.agents.insert(
            agent_id.clone(),
            Agent {
                info,
                total,
                version: register.version.unwrap_or_default(),
                link: Some(AgentLinkHandle { epoch, messages }),
                last_seen: now,
                registered_time: previous
                    .as_ref()
                    .map_or(registered_time, |p| p.registered_time),
                reregistered_time: reregister.then_some(registered_time),
                disconnected_since: None,
                unreachable: false,
            },
        );
        self.reconcile_agent_tasks(&agent_id, &register.running_tasks);
        let _ = self.send_to_agent(
            &agent_id,
            link::master_message::Kind::Registered(link::Registered {
                agent_id: AgentId {
                    value: agent_id.clone(),
                },
                heartbeat_interval_seconds: AGENT_HEARTBEAT_SECONDS,
                master_info: self.info.clone(),
            }),
        );
        tracing::info!(agent_id, reregister, "agent registered");
        self.want_allocation();
        Ok((agent_id, epoch))
    }

    /// Brings the master's view of an agent's tasks in line with what the agent runs.
    fn reconcile_agent_tasks(&mut self, agent_id: &str, running: &[Task]) {
        let reported: HashSet<(String, String)> = running
            .iter()
            .map(|t| (t.framework_id.value.clone(), t.task_id.value.clone()))
            .collect();
        // Tasks the agent runs: book their resources, bring unreachable ones back.
        for task in running {
            let framework_id = task.framework_id.value.clone();
            if !self.frameworks.contains_key(&framework_id) {
                self.send_to_agent(
                    agent_id,
                    link::master_message::Kind::ShutdownFramework(link::ShutdownFramework {
                        framework_id: task.framework_id.clone(),
                    }),
                );
                continue;
            }
            let resources = Resources::from_proto(&task.resources).unwrap_or_default();
            let role = task
                .resources
                .iter()
                .find_map(|r| r.allocation_info.as_ref().and_then(|a| a.role.clone()))
                .unwrap_or_else(|| "*".to_owned());
            if let Some(framework) = self.frameworks.get_mut(&framework_id) {
                let entry = framework
                    .tasks
                    .entry(task.task_id.value.clone())
                    .or_insert_with(|| TaskEntry {
                        task: task.clone(),
                        role: role.clone(),
                        resources: resources.clone(),
                        pending: VecDeque::new(),
                        acknowledged: VecDeque::new(),
                        resources_recovered: true,
                    });
                if entry.state() == TaskState::TaskUnreachable || is_terminal(entry.state()) {
                    entry.task.state = task.state;
                }
                if entry.resources_recovered && !is_terminal(task.state()) {
                    entry.resources_recovered = false;
                    self.allocator.mark_allocated(
                        &framework_id,
                        agent_id,
                        &entry.role,
                        &entry.resources,
                    );
                } else if !entry.resources_recovered {
                    self.allocator.mark_allocated(
                        &framework_id,
                        agent_id,
                        &entry.role,
                        &entry.resources,
                    );
                }
            }
        }
        // Tasks the master placed here that the agent does not know are gone.
        let mut gone = Vec::new();
        for (framework_id, framework) in &self.frameworks {
            for (task_id, entry) in &framework.tasks {
                if entry.task.agent_id.value == agent_id
                    && !is_terminal(entry.state())
                    && entry.state() != TaskState::TaskStaging
                    && !reported.contains(&(framework_id.clone(), task_id.clone()))
                {
                    gone.push((framework_id.clone(), entry.task.task_id.clone()));
                }
            }
        }
        for (framework_id, task_id) in gone {
            let status = TaskStatus {
                uuid: Some(new_uuid_bytes()),
                ..master_status(
                    &task_id,
                    Some(&AgentId {
                        value: agent_id.to_owned(),
                    }),
                    TaskState::TaskLost,
                    task_status::Reason::AgentRestarted,
                    "the agent re-registered without this task",
                )
            };
            self.apply_update(&framework_id, status, false);
        }
    }

    pub fn agent_heartbeat(&mut self, agent_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.last_seen = Instant::now();
        }
    }

    /// The agent's total changed (e.g. a faulty GPU withdrawn): its
    /// outstanding offers are rescinded, since they may hold what is gone,
    /// and the next offers come from the new total.
    pub fn agent_resources_changed(&mut self, agent_id: &str, changed: link::ResourcesChanged) {
        self.agent_heartbeat(agent_id);
        let total = match Resources::from_proto(&changed.total_resources) {
            Ok(total) => total,
            Err(error) => {
                tracing::warn!(agent_id, %error, "invalid resource change from the agent; ignored");
                return;
            }
        };
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        agent.total = total.clone();
        agent.info.resources = total.to_proto(None);
        let info = agent.info.clone();
        let result = self.registry.put_agent(&info);
        self.persist(result);
        self.rescind_agent_offers(agent_id);
        self.allocator.set_agent_total(agent_id, total.clone());
        tracing::info!(agent_id, resources = %total, "agent resources changed");
        self.want_allocation();
    }

    pub fn agent_status_update(&mut self, agent_id: &str, update: link::StatusUpdate) {
        self.agent_heartbeat(agent_id);
        let framework_id = update.framework_id.value.clone();
        let mut status = update.status;
        let known = self
            .frameworks
            .get(&framework_id)
            .and_then(|f| f.tasks.get(&status.task_id.value))
            .is_some_and(|e| e.task.agent_id.value == agent_id);
        if status.uuid.as_ref().is_none_or(|u| u.is_empty()) {
            status.uuid = Some(new_uuid_bytes());
        }
        if !known {
            // Nobody will acknowledge it: acknowledge it ourselves so the agent stops resending.
            self.ack_agent(
                agent_id,
                &update.framework_id.value,
                &status.task_id,
                status.uuid.clone().unwrap_or_default(),
            );
            return;
        }
        self.apply_update(&framework_id, status, true);
    }

    /// The agent's link closed.
    pub fn agent_disconnected(&mut self, agent_id: &str, epoch: u64) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.link.as_ref().is_none_or(|l| l.epoch != epoch) {
            return;
        }
        agent.link = None;
        agent.disconnected_since = Some(Instant::now());
        self.allocator.set_agent_active(agent_id, false);
        self.rescind_agent_offers(agent_id);
        tracing::info!(agent_id, "agent disconnected; its offers are rescinded");
    }

    /// An agent gone past its re-register timeout: its tasks are unreachable
    /// (TASK_LOST for frameworks that are not partition-aware) and its
    /// resources leave the cluster until it comes back.
    fn mark_agent_unreachable(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        agent.unreachable = true;
        let mut updates = Vec::new();
        for (framework_id, framework) in &self.frameworks {
            let state = if framework.has_capability(capability::Type::PartitionAware) {
                TaskState::TaskUnreachable
            } else {
                TaskState::TaskLost
            };
            for entry in framework.tasks.values() {
                if entry.task.agent_id.value == agent_id && !is_terminal(entry.state()) {
                    updates.push((framework_id.clone(), entry.task.task_id.clone(), state));
                }
            }
        }
        for (framework_id, task_id, state) in updates {
            let status = TaskStatus {
                uuid: Some(new_uuid_bytes()),
                unreachable_time: None,
                ..master_status(
                    &task_id,
                    Some(&AgentId {
                        value: agent_id.to_owned(),
                    }),
                    state,
                    task_status::Reason::AgentRemoved,
                    "the agent is unreachable",
                )
            };
            // Unreachable is not terminal: release its resources by hand.
            if state == TaskState::TaskUnreachable
                && let Some(entry) = self
                    .frameworks
                    .get_mut(&framework_id)
                    .and_then(|f| f.tasks.get_mut(&task_id.value))
                && !entry.resources_recovered
            {
                entry.resources_recovered = true;
                let (role, resources) = (entry.role.clone(), entry.resources.clone());
                self.allocator.recover(
                    &framework_id,
                    agent_id,
                    &role,
                    &resources,
                    None,
                    Instant::now(),
                );
            }
            self.apply_update(&framework_id, status, false);
        }
        self.allocator.remove_agent(agent_id);
        tracing::warn!(
            agent_id,
            "agent unreachable; its tasks are reported unreachable or lost"
        );
    }

    // ---- time ----------------------------------------------------------------------------

    /// Everything driven by time: offer timeouts, update resends, framework
    /// failover timeouts, agents gone silent or unreachable.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if !self.config.offer_timeout.is_zero() {
            let expired: Vec<String> = self
                .offers
                .values()
                .filter(|o| now.duration_since(o.created) >= self.config.offer_timeout)
                .map(|o| o.id.clone())
                .collect();
            for id in expired {
                self.rescind_offer(&id, true, None);
            }
        }
        self.resend_pending_updates(now);

        let failed_over: Vec<String> = self
            .frameworks
            .iter()
            .filter(|(_, f)| {
                let timeout = Duration::try_from_secs_f64(f.info.failover_timeout.unwrap_or(0.0))
                    .unwrap_or(Duration::MAX);
                f.disconnected_since
                    .is_some_and(|since| now.duration_since(since) >= timeout)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in failed_over {
            self.remove_framework(
                &id,
                "failover_timeout passed without the scheduler re-subscribing",
            );
        }

        let silent: Vec<(String, u64)> = self
            .agents
            .iter()
            .filter(|(_, a)| now.duration_since(a.last_seen) >= self.config.agent_ping_timeout)
            .filter_map(|(id, a)| a.link.as_ref().map(|l| (id.clone(), l.epoch)))
            .collect();
        for (id, epoch) in silent {
            tracing::warn!(
                agent_id = id,
                "no word from the agent within the ping timeout; dropping its link"
            );
            self.agent_disconnected(&id, epoch);
        }
        let unreachable: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| {
                !a.unreachable
                    && a.disconnected_since.is_some_and(|s| {
                        now.duration_since(s) >= self.config.agent_reregister_timeout
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in unreachable {
            self.mark_agent_unreachable(&id);
        }
    }

    /// Ends every scheduler stream and agent link (the master is stopping);
    /// frameworks and agents keep their state for the next start.
    pub fn close_streams(&mut self) {
        for framework in self.frameworks.values_mut() {
            framework.connection = None;
        }
        for agent in self.agents.values_mut() {
            agent.link = None;
        }
    }

    /// Removes an agent for good (operator action or tests).
    pub fn remove_agent(&mut self, agent_id: &str) {
        self.mark_agent_unreachable(agent_id);
        self.agents.remove(agent_id);
        let result = self.registry.remove_agent(agent_id);
        self.persist(result);
    }
}

/// The task's oldest pending update if it is due now, marked as sent (each
/// resend doubles the wait, up to MAX_UPDATE_BACKOFF).
fn take_due(entry: &mut TaskEntry, now: Instant) -> Option<TaskStatus> {
    let head = entry.pending.front_mut()?;
    let ready = head
        .sent_at
        .is_none_or(|at| now.duration_since(at) >= head.backoff);
    if !ready {
        return None;
    }
    if head.sent_at.is_some() {
        head.backoff = (head.backoff * 2).min(MAX_UPDATE_BACKOFF);
    }
    head.sent_at = Some(now);
    Some(head.status.clone())
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T) {
    push_bounded_n(queue, item, COMPLETED_KEPT);
}

fn push_bounded_n<T>(queue: &mut VecDeque<T>, item: T, limit: usize) {
    if queue.len() >= limit {
        queue.pop_front();
    }
    queue.push_back(item);
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
        let bad = role.is_empty()
            || role == "."
            || role == ".."
            || role.starts_with('-')
            || role.starts_with('/')
            || role.ends_with('/')
            || role.contains("//")
            || role.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
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

fn error_event(message: &str) -> Event {
    Event {
        r#type: Some(event::Type::Error as i32),
        error: Some(event::Error {
            message: message.to_owned(),
        }),
        ..Default::default()
    }
}

fn update_event(status: TaskStatus) -> Event {
    Event {
        r#type: Some(event::Type::Update as i32),
        update: Some(event::Update { status }),
        ..Default::default()
    }
}

/// A status the master itself writes (no uuid unless the caller adds one).
fn master_status(
    task_id: &TaskId,
    agent_id: Option<&AgentId>,
    state: TaskState,
    reason: task_status::Reason,
    message: &str,
) -> TaskStatus {
    TaskStatus {
        task_id: task_id.clone(),
        state: state as i32,
        message: Some(message.to_owned()),
        source: Some(task_status::Source::Master as i32),
        reason: Some(reason as i32),
        agent_id: agent_id.cloned(),
        timestamp: Some(unix_now()),
        ..Default::default()
    }
}

/// The task's latest state as a reconciliation answer (no uuid: nothing to acknowledge).
fn latest_status(task: &Task) -> TaskStatus {
    let mut status = task.statuses.last().cloned().unwrap_or_else(|| TaskStatus {
        task_id: task.task_id.clone(),
        state: task.state,
        agent_id: Some(task.agent_id.clone()),
        ..Default::default()
    });
    status.state = task.state;
    status.uuid = None;
    status.source = Some(task_status::Source::Master as i32);
    status.reason = Some(task_status::Reason::Reconciliation as i32);
    status.timestamp = Some(unix_now());
    status
}
