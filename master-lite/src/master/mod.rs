//! The master's state and every change to it: frameworks, agents, offers and
//! tasks. All changes run under one lock and never wait; what must leave the
//! process (events to frameworks, messages to agents) is queued on channels.

mod agents;
mod frameworks;
mod launch;
mod offers;
mod updates;

pub use agents::{AGENT_LINK_QUEUE, Agent, AgentLink, MarkGoneError, RegisterError};
pub use frameworks::{Connection, EventStream, Framework, Subscription, roles_of};
pub use launch::check_launch_resources;
pub use offers::OutstandingOffer;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1 as link;
use butte_api::mesos::v1::scheduler::Event;
use butte_api::mesos::v1::{
    FrameworkId, FrameworkInfo, MasterInfo, Task, TaskId, TaskState, TaskStatus,
};
use butte_api::resources::Resources;
use butte_api::update_queue::{Retry, UpdateQueue, unix_now};
use tokio::sync::Notify;

use crate::allocator::Allocator;
use crate::config::MasterConfig;
use crate::registry::{Recovered, Registry, RegistryError};

/// Seconds between heartbeats an agent is told to send.
pub const AGENT_HEARTBEAT_SECONDS: f64 = 5.0;
/// Completed tasks and frameworks kept for the views.
const COMPLETED_KEPT: usize = 1000;
/// Acknowledged uuids a task keeps, to re-acknowledge an agent's resend.
const ACKNOWLEDGED_KEPT: usize = 16;
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

/// A task the master placed (or found on an agent), with its update queue.
pub struct TaskEntry {
    pub task: Task,
    pub role: String,
    pub resources: Resources,
    /// Updates not yet acknowledged by the framework; only the oldest is in flight.
    updates: UpdateQueue<TaskStatus>,
    /// Recently acknowledged uuids, to re-acknowledge an agent's resend.
    acknowledged: VecDeque<Vec<u8>>,
    /// The task's resources are not booked in the allocator (never were, or given back).
    resources_recovered: bool,
    /// The launch that sent it, kept while it is staging: if its agent
    /// re-registers without it (the message was lost with a link), it is
    /// sent again. Not in the registry: after a master restart such a task
    /// is lost (dropped, for partition-aware frameworks).
    pub(super) launch: Option<std::sync::Arc<butte_api::agent_link::v1::LaunchTasks>>,
}

impl TaskEntry {
    /// A task just launched: its resources are booked.
    fn launched(task: Task, role: &str, resources: Resources, retry: Retry) -> Self {
        Self {
            task,
            role: role.to_owned(),
            resources,
            updates: UpdateQueue::new(retry),
            acknowledged: VecDeque::new(),
            resources_recovered: false,
            launch: None,
        }
    }

    /// A task read back from the registry or an agent: booked only once its
    /// agent reports it running.
    fn restored(task: Task, retry: Retry) -> Self {
        let resources = Resources::from_proto(&task.resources).unwrap_or_default();
        let role = task
            .resources
            .iter()
            .find_map(|r| r.allocation_info.as_ref().and_then(|a| a.role.clone()))
            .unwrap_or_else(|| "*".to_owned());
        Self {
            task,
            role,
            resources,
            updates: UpdateQueue::new(retry),
            acknowledged: VecDeque::new(),
            resources_recovered: true,
            launch: None,
        }
    }

    pub fn state(&self) -> TaskState {
        self.task.state()
    }

    /// Whether the task's resources are to go back to the allocator now:
    /// true once, the first time it is asked while they are booked.
    fn take_booked(&mut self) -> bool {
        !std::mem::replace(&mut self.resources_recovered, true)
    }
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
    pub allocation_durations: crate::metrics::AllocationDurations,
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
    /// Agents the operator marked gone: their registrations are refused.
    pub gone_agents: std::collections::BTreeSet<String>,
    /// The identity each agent id is bound to (its first registration's
    /// client certificate), where agents present one.
    agent_identities: HashMap<String, String>,
    next_epoch: u64,
    pub started: Instant,
    pub start_time: f64,
    pub counters: Counters,
    allocation_wanted: Arc<Notify>,
    /// Per-task telemetry the agents stream.
    pub telemetry: crate::telemetry::TelemetryStore,
    /// Who may do what (`--acls`); all is allowed without.
    pub acls: crate::acls::Acls,
}

/// What one requester may see in the state views (the view_frameworks and
/// view_tasks ACLs, by the framework's and the task's user).
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    acls: &'a crate::acls::Acls,
    principal: Option<&'a str>,
}

impl Viewer<'_> {
    pub fn framework(&self, info: &FrameworkInfo) -> bool {
        self.acls.allows(
            crate::acls::Action::ViewFrameworks,
            self.principal,
            Some(&info.user),
        )
    }

    pub fn task(&self, task: &butte_api::mesos::v1::Task, framework: &FrameworkInfo) -> bool {
        let user = task.user.as_deref().unwrap_or(&framework.user);
        self.acls
            .allows(crate::acls::Action::ViewTasks, self.principal, Some(user))
    }
}

impl Master {
    /// What `principal` (None: unauthenticated) may see.
    pub fn viewer<'a>(&'a self, principal: Option<&'a str>) -> Viewer<'a> {
        Viewer {
            acls: &self.acls,
            principal,
        }
    }
}

impl Master {
    /// Opens the registry under the work dir and restores what it holds.
    pub fn open(config: MasterConfig, listen: std::net::SocketAddr) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(&config.work_dir).map_err(|e| RegistryError::Store {
            what: "open",
            detail: format!("cannot create work dir {}: {e}", config.work_dir.display()),
        })?;
        let registry = Registry::open(&config.work_dir.join("registry.redb"))?;
        let mut recovered = registry.recover()?;
        let master_id = match recovered.master_id.take() {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                registry.put_meta("master_id", &id)?;
                id
            }
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
        let mut master = Master {
            config: Arc::new(config),
            info: master_info(&master_id, listen),
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
            gone_agents: recovered.gone_agents.iter().cloned().collect(),
            agent_identities: std::mem::take(&mut recovered.agent_identities)
                .into_iter()
                .collect(),
            next_epoch: 0,
            started: Instant::now(),
            start_time: unix_now(),
            counters: Counters::default(),
            allocation_wanted: Arc::new(Notify::new()),
            telemetry: crate::telemetry::TelemetryStore::default(),
            acls: crate::acls::Acls::default(),
        };
        master.restore(recovered);
        Ok(master)
    }

    /// Recovered frameworks wait for their schedulers (failover_timeout from now);
    /// recovered agents wait to re-register and are not offered until then.
    fn restore(&mut self, recovered: Recovered) {
        let now = Instant::now();
        for info in recovered.frameworks {
            self.restore_framework(info, now);
        }
        let unreachable: HashMap<String, f64> = recovered.unreachable.into_iter().collect();
        for info in recovered.agents {
            let id = info.id.as_ref().map_or("", |a| a.value.as_str());
            let since = unreachable.get(id).copied();
            let agent = Agent::restored(info, self.start_time, since, now);
            self.agents.insert(agent.id().to_owned(), agent);
        }
        let retry = self.update_retry();
        for task in recovered.tasks {
            let Some(framework) = self.frameworks.get_mut(&task.framework_id.value) else {
                continue;
            };
            let task_id = task.task_id.value.clone();
            framework
                .tasks
                .insert(task_id, TaskEntry::restored(task, retry));
        }
        // A staging task keeps its launch: if its agent comes back without
        // it, the launch goes again.
        for launch in recovered.launches {
            let framework_id = launch.framework_info.id.clone().unwrap_or_default().value;
            let launch = std::sync::Arc::new(launch);
            let task_ids: Vec<String> = launch
                .tasks
                .iter()
                .chain(launch.task_group.iter().flat_map(|g| g.tasks.iter()))
                .map(|t| t.task_id.value.clone())
                .collect();
            let Some(framework) = self.frameworks.get_mut(&framework_id) else {
                continue;
            };
            for task_id in task_ids {
                if let Some(entry) = framework.tasks.get_mut(&task_id)
                    && entry.state() == TaskState::TaskStaging
                {
                    entry.launch = Some(launch.clone());
                }
            }
        }
    }

    pub fn master_id(&self) -> &str {
        &self.info.id
    }

    /// How a task's unacknowledged update is resent to its framework.
    fn update_retry(&self) -> Retry {
        Retry {
            first: self.config.status_update_retry,
            longest: MAX_UPDATE_BACKOFF,
        }
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
        if let Some(framework) = self.frameworks.get(framework_id) {
            framework.connection.send(event);
        }
    }

    /// Tells the agent its update with `uuid` needs no resending.
    fn ack_agent(&mut self, agent_id: &str, framework_id: &str, task_id: &TaskId, uuid: Vec<u8>) {
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

    fn send_to_agent(&mut self, agent_id: &str, message: link::master_message::Kind) -> bool {
        let Some(agent) = self.agents.get(agent_id) else {
            return false;
        };
        match agent.link.send(message) {
            agents::Sent::Queued => true,
            agents::Sent::NoLink => false,
            agents::Sent::Full(epoch) => {
                tracing::error!(
                    agent_id,
                    bound = agents::AGENT_LINK_QUEUE,
                    "the agent's link queue is full (the agent reads too slowly); its link is closed, and it re-registers"
                );
                self.agent_disconnected(agent_id, epoch);
                false
            }
        }
    }

    /// Everything driven by time: offer timeouts, update resends, framework
    /// failover timeouts, agents gone silent or unreachable.
    pub fn tick(&mut self) {
        let now = Instant::now();
        self.expire_offers(now);
        self.resend_pending_updates(now);
        self.fail_over_frameworks(now);
        self.check_agents(now);
    }

    /// Ends every scheduler stream and agent link (the master is stopping);
    /// frameworks and agents keep their state for the next start.
    pub fn close_streams(&mut self) {
        let now = Instant::now();
        for framework in self.frameworks.values_mut() {
            framework.connection.close(now);
        }
        for agent in self.agents.values_mut() {
            agent.link.close();
        }
    }
}

fn master_info(master_id: &str, listen: std::net::SocketAddr) -> MasterInfo {
    let hostname = listen.ip().to_string();
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) => u32::from_le_bytes(v4.octets()),
        std::net::IpAddr::V6(_) => 0,
    };
    MasterInfo {
        id: master_id.to_owned(),
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
    }
}

/// A master on a fresh work dir, and agents and frameworks on plain channels,
/// for the unit tests of this module's parts.
#[cfg(test)]
mod fixture {
    use butte_api::agent_link::v1 as link;
    use butte_api::mesos::v1::scheduler::call;
    use butte_api::mesos::v1::{AgentId, AgentInfo, FrameworkInfo, framework_info};
    use butte_api::resources::Resources;
    use tokio::sync::mpsc;

    use super::{Master, Subscription};
    use crate::config::MasterConfig;

    pub fn master(name: &str, configure: impl FnOnce(&mut MasterConfig)) -> Master {
        let dir = std::env::temp_dir().join(format!(
            "butte-master-unit-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let mut config = MasterConfig::for_work_dir(dir);
        configure(&mut config);
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 5050));
        Master::open(config, listen).expect("the master opens a registry in a fresh dir")
    }

    /// An agent registered on a channel link; `id` re-registers a known one.
    pub fn agent(
        master: &mut Master,
        id: Option<&str>,
        resources: &str,
    ) -> (String, u64, mpsc::Receiver<link::MasterMessage>) {
        agent_running(master, id, resources, Vec::new())
    }

    /// The same, (re-)registering with the tasks it runs.
    pub fn agent_running(
        master: &mut Master,
        id: Option<&str>,
        resources: &str,
        running_tasks: Vec<butte_api::mesos::v1::Task>,
    ) -> (String, u64, mpsc::Receiver<link::MasterMessage>) {
        let (messages, receiver) = mpsc::channel(super::agents::AGENT_LINK_QUEUE);
        let register = link::Register {
            agent_info: AgentInfo {
                hostname: "127.0.0.1".into(),
                id: id.map(|value| AgentId {
                    value: value.to_owned(),
                }),
                ..Default::default()
            },
            total_resources: Resources::parse(resources)
                .expect("the test's resources parse")
                .to_proto(None),
            running_tasks,
            ..Default::default()
        };
        let (agent_id, epoch) = master
            .register_agent(register, messages, None)
            .expect("the agent registers");
        (agent_id, epoch, receiver)
    }

    pub fn framework(master: &mut Master, failover_timeout: Option<f64>) -> Subscription {
        framework_with(master, failover_timeout, &[])
    }

    /// The same, with capabilities (e.g. PARTITION_AWARE).
    pub fn framework_with(
        master: &mut Master,
        failover_timeout: Option<f64>,
        capabilities: &[framework_info::capability::Type],
    ) -> Subscription {
        let capabilities = capabilities
            .iter()
            .map(|kind| framework_info::Capability {
                r#type: Some(*kind as i32),
            })
            .collect();
        let subscribe = call::Subscribe {
            framework_info: FrameworkInfo {
                user: "test".into(),
                name: "test".into(),
                failover_timeout,
                capabilities,
                ..Default::default()
            },
            ..Default::default()
        };
        master
            .subscribe(None, subscribe, None)
            .expect("the framework subscribes")
    }
}
