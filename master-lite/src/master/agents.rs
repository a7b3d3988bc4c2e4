//! Agents: registration on the gRPC link (and re-registration with the
//! tasks they still run), heartbeats, resource changes, and what happens
//! when a link closes or an agent stays away: unreachable past
//! `--agent-ping-timeout` x `--max-agent-ping-timeouts` (or, after a master
//! restart, `--agent-reregister-timeout`), forgotten past
//! `--registry-max-agent-age`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use butte_api::agent_link::v1 as link;
use butte_api::mesos::v1::{
    AgentId, AgentInfo, Task, TaskId, TaskState, TaskStatus, framework_info::capability,
    task_status,
};
use butte_api::resources::{ResourceError, Resources};
use butte_api::task_state::is_terminal;
use butte_api::update_queue::{new_uuid, unix_now};
use tokio::sync::mpsc;

use super::updates::master_status;
use super::{AGENT_HEARTBEAT_SECONDS, Master, TaskEntry};
use crate::registry::RegistryError;

/// How many messages may wait on an agent's link; an agent that falls this
/// far behind has its link closed (it re-registers and is reconciled).
pub const AGENT_LINK_QUEUE: usize = 16_384;

/// The master's link to an agent, or how long the agent has been without one.
pub enum AgentLink {
    /// Registered on a live link; `epoch` tells this link from the agent's earlier ones.
    Connected {
        epoch: u64,
        messages: mpsc::Sender<link::MasterMessage>,
    },
    /// The link closed (or went silent); the agent is unreachable once
    /// silent (since its `last_seen`) for the ping timeouts.
    Disconnected,
    /// Read back from the registry at `since`, after a master restart: the
    /// agent has `--agent-reregister-timeout` to come back.
    Recovered { since: Instant },
    /// Away too long: its tasks were reported unreachable or lost and its
    /// resources left the cluster, at `since` (Unix seconds, as recorded).
    Unreachable { since: f64 },
}

/// What became of a message for an agent.
pub(super) enum Sent {
    Queued,
    /// No live link.
    NoLink,
    /// The link's queue is full: the link (`epoch`) is to be closed.
    Full(u64),
}

impl AgentLink {
    pub fn is_connected(&self) -> bool {
        matches!(self, AgentLink::Connected { .. })
    }

    pub fn epoch(&self) -> Option<u64> {
        match self {
            AgentLink::Connected { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// Queues `message` on the link.
    pub(super) fn send(&self, message: link::master_message::Kind) -> Sent {
        let AgentLink::Connected { epoch, messages } = self else {
            return Sent::NoLink;
        };
        let message = link::MasterMessage {
            kind: Some(message),
        };
        match messages.try_send(message) {
            Ok(()) => Sent::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Sent::Full(*epoch),
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::NoLink,
        }
    }

    /// The link of `epoch` closed; true when it was the current one (a
    /// replaced link's close changes nothing).
    fn disconnect(&mut self, epoch: u64) -> bool {
        let current = self.epoch() == Some(epoch);
        if current {
            *self = AgentLink::Disconnected;
        }
        current
    }

    /// The master ends the link itself (it is stopping).
    pub(super) fn close(&mut self) {
        if self.is_connected() {
            *self = AgentLink::Disconnected;
        }
    }

    /// Whether the agent is to be marked unreachable: silent since
    /// `last_seen` for `silence`, or read back from the registry and not
    /// re-registered within `reregister`.
    fn overdue(
        &self,
        last_seen: Instant,
        silence: Duration,
        reregister: Duration,
        now: Instant,
    ) -> bool {
        match self {
            AgentLink::Disconnected => now.duration_since(last_seen) >= silence,
            AgentLink::Recovered { since } => now.duration_since(*since) >= reregister,
            _ => false,
        }
    }
}

pub struct Agent {
    pub info: AgentInfo,
    pub total: Resources,
    pub version: String,
    pub link: AgentLink,
    pub last_seen: Instant,
    pub registered_time: f64,
    pub reregistered_time: Option<f64>,
}

impl Agent {
    /// An agent read back from the registry: waiting to re-register, or
    /// still unreachable since `unreachable_since` (Unix seconds).
    pub(super) fn restored(
        info: AgentInfo,
        registered_time: f64,
        unreachable_since: Option<f64>,
        now: Instant,
    ) -> Self {
        let total = Resources::from_proto(&info.resources).unwrap_or_default();
        let link = match unreachable_since {
            Some(since) => AgentLink::Unreachable { since },
            None => AgentLink::Recovered { since: now },
        };
        Self {
            info,
            total,
            version: String::new(),
            link,
            last_seen: now,
            registered_time,
            reregistered_time: None,
        }
    }

    pub fn id(&self) -> &str {
        self.info.id.as_ref().map_or("", |a| a.value.as_str())
    }

    pub fn connected(&self) -> bool {
        self.link.is_connected()
    }

    pub fn unreachable(&self) -> bool {
        matches!(self.link, AgentLink::Unreachable { .. })
    }
}

/// Why an agent's registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The resources the agent declares do not parse.
    #[error("invalid agent resources: {0}")]
    Resources(#[from] ResourceError),
    /// The agent names no host.
    #[error("agent_info.hostname is empty; set the agent's --hostname or --ip")]
    NoHostname,
    /// The registry could not record the agent.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The agent's id breaks the id rule.
    #[error(transparent)]
    Id(#[from] butte_api::ids::IdError),
    /// The operator marked this agent gone.
    #[error(
        "the operator marked agent {0} gone (MARK_AGENT_GONE); start the agent on a new --work-dir to join as a new agent"
    )]
    Gone(String),
    /// Agents authenticate and this one presented no client certificate.
    #[error(
        "this master authenticates agents: connect over TLS with a client certificate signed by its --agent-ca (the agent's --tls-cert and --tls-key)"
    )]
    Unauthenticated,
    /// The id is bound to another identity.
    #[error(
        "agent id {agent_id} belongs to the agent whose certificate names {bound}, not {presented}"
    )]
    Impostor {
        agent_id: String,
        bound: String,
        presented: String,
    },
}

/// Why MARK_AGENT_GONE was refused.
#[derive(Debug, thiserror::Error)]
pub enum MarkGoneError {
    #[error("no agent {0} is known to this master")]
    Unknown(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl Master {
    /// An agent opened its link and registered (or re-registered with its id).
    /// Registers an agent on a new link; `identity`: what its client
    /// certificate names, where it presented one (required where agents
    /// authenticate). An agent id stays bound to the identity that first
    /// registered it.
    pub fn register_agent(
        &mut self,
        register: link::Register,
        messages: mpsc::Sender<link::MasterMessage>,
        identity: Option<&str>,
    ) -> Result<(String, u64), RegisterError> {
        if self.config.authenticate_agents && identity.is_none() {
            return Err(RegisterError::Unauthenticated);
        }
        let total = Resources::from_proto(&register.total_resources)?;
        if register.agent_info.hostname.is_empty() {
            return Err(RegisterError::NoHostname);
        }
        let mut info = register.agent_info;
        if let Some(id) = info
            .id
            .as_ref()
            .filter(|id| self.gone_agents.contains(&id.value))
        {
            return Err(RegisterError::Gone(id.value.clone()));
        }
        let now = Instant::now();
        let (agent_id, reregister) = self.agent_id_of(&info);
        if let (Some(presented), Some(bound)) = (identity, self.agent_identities.get(&agent_id))
            && presented != bound
        {
            return Err(RegisterError::Impostor {
                agent_id,
                bound: bound.clone(),
                presented: presented.to_owned(),
            });
        }
        info.id = Some(AgentId {
            value: agent_id.clone(),
        });
        info.resources = total.to_proto(None);
        self.registry.put_agent(&info, identity)?;
        if let Some(identity) = identity {
            self.agent_identities
                .entry(agent_id.clone())
                .or_insert_with(|| identity.to_owned());
        }

        // A previous link of this agent is replaced; its offers are void.
        self.rescind_agent_offers(&agent_id);
        self.allocator.add_agent(&agent_id, total.clone());
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let registered_time = unix_now();
        let previous = self.agents.remove(&agent_id);
        // An id this master does not know: forgotten past
        // --registry-max-agent-age, or from a lost registry.
        let forgotten = reregister && previous.is_none();
        let agent = Agent {
            info,
            total,
            version: register.version.unwrap_or_default(),
            link: AgentLink::Connected { epoch, messages },
            last_seen: now,
            registered_time: previous.map_or(registered_time, |p| p.registered_time),
            reregistered_time: reregister.then_some(registered_time),
        };
        self.agents.insert(agent_id.clone(), agent);
        // Registered goes first: the agent takes nothing else before it, and
        // reconciling may already send it kills and shutdowns.
        let _ = self.send_to_agent(
            &agent_id,
            link::master_message::Kind::Registered(link::Registered {
                agent_id: AgentId {
                    value: agent_id.clone(),
                },
                heartbeat_interval_seconds: self.agent_heartbeat_seconds(),
                master_info: self.info.clone(),
            }),
        );
        self.reconcile_agent_tasks(&agent_id, &register.running_tasks, forgotten);
        tracing::info!(agent_id, reregister, "agent registered");
        self.want_allocation();
        Ok((agent_id, epoch))
    }

    /// How often agents heartbeat: every `AGENT_HEARTBEAT_SECONDS`, or
    /// three times within `--agent-ping-timeout` when that is shorter, so
    /// that a short timeout never drops a healthy agent.
    fn agent_heartbeat_seconds(&self) -> f64 {
        AGENT_HEARTBEAT_SECONDS.min(self.config.agent_ping_timeout.as_secs_f64() / 3.0)
    }

    /// The agent's id, and whether it is re-registering; a new agent gets the next id.
    fn agent_id_of(&mut self, info: &AgentInfo) -> (String, bool) {
        if let Some(id) = info.id.as_ref().filter(|a| !a.value.is_empty()) {
            return (id.value.clone(), true);
        }
        let id = format!("{}-S{}", self.master_id(), self.next_agent);
        self.next_agent += 1;
        let counter = self.next_agent.to_string();
        let result = self.registry.put_meta("next_agent", &counter);
        self.persist(result);
        (id, false)
    }

    /// Brings the master's view of an agent's tasks in line with what the agent runs.
    fn reconcile_agent_tasks(&mut self, agent_id: &str, running: &[Task], forgotten: bool) {
        self.book_running_tasks(agent_id, running, forgotten);
        let reported: HashSet<(&str, &str)> = running
            .iter()
            .map(|t| (t.framework_id.value.as_str(), t.task_id.value.as_str()))
            .collect();
        // Tasks the master placed here that the agent does not know are
        // gone; a staging one's launch was lost on the way (with a link) and
        // goes again, where the master still has it.
        let mut gone = Vec::new();
        let mut relaunch: Vec<std::sync::Arc<link::LaunchTasks>> = Vec::new();
        let mut rebook = Vec::new();
        for (framework_id, framework) in &self.frameworks {
            let aware = framework.has_capability(capability::Type::PartitionAware);
            for (task_id, entry) in &framework.tasks {
                if entry.task.agent_id.value != agent_id
                    || is_terminal(entry.state())
                    || reported.contains(&(framework_id.as_str(), task_id.as_str()))
                {
                    continue;
                }
                match (&entry.launch, entry.state()) {
                    (Some(launch), TaskState::TaskStaging) => {
                        if !relaunch.iter().any(|l| std::sync::Arc::ptr_eq(l, launch)) {
                            relaunch.push(launch.clone());
                        }
                        if entry.resources_recovered {
                            // Read back after a restart: booked again as it goes.
                            rebook.push((framework_id.clone(), task_id.clone()));
                        }
                    }
                    (None, TaskState::TaskStaging) => {
                        let state = if aware {
                            TaskState::TaskDropped
                        } else {
                            TaskState::TaskLost
                        };
                        gone.push((framework_id.clone(), entry.task.task_id.clone(), state));
                    }
                    _ => gone.push((
                        framework_id.clone(),
                        entry.task.task_id.clone(),
                        TaskState::TaskLost,
                    )),
                }
            }
        }
        for (framework_id, task_id) in rebook {
            if let Some(entry) = self
                .frameworks
                .get_mut(&framework_id)
                .and_then(|f| f.tasks.get_mut(&task_id))
            {
                entry.resources_recovered = false;
                self.allocator.mark_allocated(
                    &framework_id,
                    agent_id,
                    &entry.role,
                    &entry.resources,
                );
            }
        }
        for launch in relaunch {
            tracing::info!(
                agent_id,
                "the agent registered without tasks launched on it; their launch goes again"
            );
            self.send_to_agent(
                agent_id,
                link::master_message::Kind::LaunchTasks((*launch).clone()),
            );
        }
        for (framework_id, task_id, state) in gone {
            let status = lost_on(
                agent_id,
                &task_id,
                state,
                task_status::Reason::AgentRestarted,
                "the agent re-registered without this task",
            );
            self.apply_update(&framework_id, status, false);
        }
    }

    /// Tasks a re-registering agent runs: their resources are booked and
    /// unreachable ones come back; a removed framework's are shut down. On
    /// an agent this master had `forgotten`, a task it does not know of a
    /// framework that is not partition-aware is killed: that framework may
    /// have been told it was lost, and a terminal state is never taken back.
    fn book_running_tasks(&mut self, agent_id: &str, running: &[Task], forgotten: bool) {
        let retry = self.update_retry();
        for task in running {
            let framework_id = task.framework_id.value.as_str();
            let Some(framework) = self.frameworks.get_mut(framework_id) else {
                self.send_to_agent(
                    agent_id,
                    link::master_message::Kind::ShutdownFramework(link::ShutdownFramework {
                        framework_id: task.framework_id.clone(),
                    }),
                );
                continue;
            };
            // Ended here: still in the books as terminal, or already moved
            // to the completed tasks once its end was acknowledged.
            let ended_here = framework.tasks.get(&task.task_id.value).map_or_else(
                || {
                    framework
                        .completed_tasks
                        .iter()
                        .any(|t| t.task_id == task.task_id)
                },
                |entry| is_terminal(entry.state()),
            );
            let unknown = !ended_here && !framework.tasks.contains_key(&task.task_id.value);
            let killed_as_lost =
                forgotten && unknown && !framework.has_capability(capability::Type::PartitionAware);
            if (ended_here || killed_as_lost) && !is_terminal(task.state()) {
                // The framework was told it ended (LOST while its agent was
                // away): a terminal state is never taken back. The agent
                // kills it, as Mesos does for frameworks that are not
                // partition-aware; its resources were already given back.
                tracing::info!(
                    agent_id,
                    framework_id,
                    task_id = task.task_id.value,
                    "a returning agent still runs a task that has ended here; it is killed there"
                );
                self.send_to_agent(
                    agent_id,
                    link::master_message::Kind::KillTask(link::KillTask {
                        framework_id: task.framework_id.clone(),
                        task_id: task.task_id.clone(),
                        kill_policy: None,
                    }),
                );
                continue;
            }
            if (ended_here || killed_as_lost) && !framework.tasks.contains_key(&task.task_id.value)
            {
                continue; // completed and acknowledged (or forgotten): nothing left to book
            }
            let entry = framework
                .tasks
                .entry(task.task_id.value.clone())
                .or_insert_with(|| TaskEntry::restored(task.clone(), retry));
            if entry.state() == TaskState::TaskUnreachable {
                entry.task.state = task.state;
            }
            // Already given back and now over: nothing to book.
            if entry.resources_recovered && is_terminal(task.state()) {
                continue;
            }
            // The agent's free resources were reset at its registration:
            // what its tasks hold is taken again there. The framework's
            // share is counted once: only where it was given back before.
            if !entry.resources_recovered {
                self.allocator.take_from_agent(agent_id, &entry.resources);
                continue;
            }
            entry.resources_recovered = false;
            self.allocator
                .mark_allocated(framework_id, agent_id, &entry.role, &entry.resources);
        }
    }

    /// The agent's heartbeat: it is alive, and it hears back that we are
    /// (an agent that hears nothing for a while opens a new link).
    pub fn agent_heartbeat(&mut self, agent_id: &str) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.last_seen = Instant::now();
        }
        let _ = self.send_to_agent(
            agent_id,
            link::master_message::Kind::Heartbeat(link::Heartbeat {}),
        );
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
        let result = self.registry.put_agent(&info, None);
        self.persist(result);
        self.rescind_agent_offers(agent_id);
        self.allocator.set_agent_total(agent_id, total.clone());
        tracing::info!(agent_id, resources = %total, "agent resources changed");
        self.want_allocation();
    }

    /// The agent's link closed.
    pub fn agent_disconnected(&mut self, agent_id: &str, epoch: u64) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if !agent.link.disconnect(epoch) {
            return;
        }
        self.allocator.set_agent_active(agent_id, false);
        self.rescind_agent_offers(agent_id);
        tracing::info!(agent_id, "agent disconnected; its offers are rescinded");
    }

    /// Drops the links of agents gone silent past the ping timeout, marks
    /// unreachable those silent past all their ping timeouts (or not back
    /// within the re-register timeout after a master restart), and forgets
    /// unreachable agents past the registry's bounds.
    pub(super) fn check_agents(&mut self, now: Instant) {
        let silent: Vec<(String, u64)> = self
            .agents
            .iter()
            .filter(|(_, a)| now.duration_since(a.last_seen) >= self.config.agent_ping_timeout)
            .filter_map(|(id, a)| a.link.epoch().map(|epoch| (id.clone(), epoch)))
            .collect();
        for (id, epoch) in silent {
            tracing::warn!(
                agent_id = id,
                "no word from the agent within the ping timeout; dropping its link"
            );
            self.agent_disconnected(&id, epoch);
        }
        let silence = self
            .config
            .agent_ping_timeout
            .saturating_mul(self.config.max_agent_ping_timeouts);
        let reregister = self.config.agent_reregister_timeout;
        let overdue: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.link.overdue(a.last_seen, silence, reregister, now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in overdue {
            self.mark_agent_unreachable(&id);
        }
        self.forget_old_unreachable_agents(unix_now());
    }

    /// Forgets unreachable agents older than `--registry-max-agent-age`,
    /// and the longest unreachable beyond `--registry-max-agent-count`.
    fn forget_old_unreachable_agents(&mut self, now: f64) {
        let mut unreachable: Vec<(f64, String)> = self
            .agents
            .iter()
            .filter_map(|(id, a)| match a.link {
                AgentLink::Unreachable { since } => Some((since, id.clone())),
                _ => None,
            })
            .collect();
        unreachable.sort_by(|a, b| a.0.total_cmp(&b.0));
        let max_age = self.config.registry_max_agent_age.as_secs_f64();
        let excess = unreachable
            .len()
            .saturating_sub(self.config.registry_max_agent_count);
        for (index, (since, id)) in unreachable.into_iter().enumerate() {
            let too_old = now - since >= max_age;
            if !too_old && index >= excess {
                break;
            }
            self.forget_agent(&id);
        }
    }

    /// Forgets an unreachable agent, as Mesos's registry does: the agent and
    /// its unreachable tasks leave the books (reconciling them answers
    /// TASK_UNKNOWN). Should it come back, it is admitted again, and the
    /// tasks of frameworks that are not partition-aware are killed there.
    fn forget_agent(&mut self, agent_id: &str) {
        let mut forgotten = Vec::new();
        for framework in self.frameworks.values_mut() {
            let open: Vec<String> = framework
                .tasks
                .iter()
                .filter(|(_, e)| e.task.agent_id.value == agent_id && !is_terminal(e.state()))
                .map(|(id, _)| id.clone())
                .collect();
            for task_id in open {
                if let Some(entry) = framework.tasks.remove(&task_id) {
                    forgotten.push(entry.task);
                }
            }
        }
        self.agents.remove(agent_id);
        self.agent_identities.remove(agent_id);
        let result = self.registry.remove_agent(agent_id, &forgotten);
        self.persist(result);
        tracing::warn!(
            agent_id,
            tasks = forgotten.len(),
            "unreachable agent forgotten (--registry-max-agent-age / --registry-max-agent-count)"
        );
    }

    /// An agent gone past its re-register timeout: its tasks are unreachable
    /// (TASK_LOST for frameworks that are not partition-aware) and its
    /// resources leave the cluster until it comes back.
    fn mark_agent_unreachable(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let since = unix_now();
        agent.link = AgentLink::Unreachable { since };
        let result = self.registry.put_unreachable(agent_id, since);
        self.persist(result);
        let updates = self.open_tasks_on(agent_id, TaskState::TaskUnreachable);
        for (framework_id, task_id, state) in updates {
            // Unreachable is not terminal: release its resources by hand.
            if state == TaskState::TaskUnreachable {
                self.release_task(&framework_id, &task_id.value);
            }
            let reason = task_status::Reason::AgentRemoved;
            let status = lost_on(
                agent_id,
                &task_id,
                state,
                reason,
                "the agent is unreachable",
            );
            self.apply_update(&framework_id, status, false);
        }
        self.allocator.remove_agent(agent_id);
        tracing::warn!(
            agent_id,
            "agent unreachable; its tasks are reported unreachable or lost"
        );
    }

    /// The operator says an agent is gone for good (MARK_AGENT_GONE, e.g.
    /// its machine was decommissioned): its tasks end as
    /// TASK_GONE_BY_OPERATOR (TASK_LOST for frameworks that are not
    /// partition-aware), its resources leave, its link closes, and it is
    /// never admitted again. Marking a gone agent again changes nothing.
    pub fn mark_agent_gone(&mut self, agent_id: &str) -> Result<(), MarkGoneError> {
        if self.gone_agents.contains(agent_id) {
            return Ok(());
        }
        if !self.agents.contains_key(agent_id) {
            return Err(MarkGoneError::Unknown(agent_id.to_owned()));
        }
        // Recorded first: an agent marked gone must stay gone after a restart.
        let mut gone = self.gone_agents.clone();
        gone.insert(agent_id.to_owned());
        let list: Vec<&str> = gone.iter().map(String::as_str).collect();
        // One per line: ids hold no control characters (the id rule).
        self.registry.put_meta("gone_agents", &list.join("\n"))?;
        self.gone_agents = gone;
        self.rescind_agent_offers(agent_id);
        self.allocator.remove_agent(agent_id);
        let updates = self.open_tasks_on(agent_id, TaskState::TaskGoneByOperator);
        for (framework_id, task_id, state) in updates {
            let status = lost_on(
                agent_id,
                &task_id,
                state,
                task_status::Reason::AgentRemovedByOperator,
                "the operator marked the agent gone",
            );
            self.apply_update(&framework_id, status, false);
        }
        // Dropping the agent drops its link's sender: the link closes.
        self.agents.remove(agent_id);
        let result = self.registry.remove_agent(agent_id, &[]);
        self.persist(result);
        tracing::warn!(agent_id, "the operator marked the agent gone");
        self.want_allocation();
        Ok(())
    }

    /// The tasks on `agent_id` not ended yet, each with the state it is to
    /// take: `aware` for partition-aware frameworks, TASK_LOST for others.
    fn open_tasks_on(&self, agent_id: &str, aware: TaskState) -> Vec<(String, TaskId, TaskState)> {
        let mut open = Vec::new();
        for (framework_id, framework) in &self.frameworks {
            let state = if framework.has_capability(capability::Type::PartitionAware) {
                aware
            } else {
                TaskState::TaskLost
            };
            for entry in framework.tasks.values() {
                if entry.task.agent_id.value == agent_id && !is_terminal(entry.state()) {
                    open.push((framework_id.clone(), entry.task.task_id.clone(), state));
                }
            }
        }
        open
    }

    /// Gives a task's resources back to the allocator, if they are booked.
    fn release_task(&mut self, framework_id: &str, task_id: &str) {
        let Some(entry) = self
            .frameworks
            .get_mut(framework_id)
            .and_then(|f| f.tasks.get_mut(task_id))
        else {
            return;
        };
        if entry.take_booked() {
            let agent_id = &entry.task.agent_id.value;
            self.allocator.recover(
                framework_id,
                agent_id,
                &entry.role,
                &entry.resources,
                None,
                Instant::now(),
            );
        }
    }
}

/// The master's own update for a task on `agent_id` that the agent cannot report.
fn lost_on(
    agent_id: &str,
    task_id: &TaskId,
    state: TaskState,
    reason: task_status::Reason,
    message: &str,
) -> TaskStatus {
    let agent_id = AgentId {
        value: agent_id.to_owned(),
    };
    TaskStatus {
        uuid: Some(new_uuid()),
        ..master_status(task_id, Some(&agent_id), state, reason, message)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use butte_api::agent_link::v1 as link;
    use butte_api::mesos::v1::{AgentId, Task, TaskId, TaskState, framework_info::capability};

    use super::{AGENT_LINK_QUEUE, AgentLink};
    use crate::master::{Master, TaskEntry, fixture};

    fn link_of<'a>(master: &'a Master, agent_id: &str) -> &'a AgentLink {
        &master
            .agents
            .get(agent_id)
            .unwrap_or_else(|| panic!("agent {agent_id} is known"))
            .link
    }

    #[test]
    fn agent_link_goes_disconnected_then_unreachable_and_back_on_reregistration() {
        let mut master = fixture::master("agent-link", |config| {
            config.agent_ping_timeout = Duration::ZERO;
        });
        let (agent_id, epoch, _messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        assert_eq!(link_of(&master, &agent_id).epoch(), Some(epoch));

        master.agent_disconnected(&agent_id, epoch + 1);
        assert!(
            link_of(&master, &agent_id).is_connected(),
            "the close of a link that is not the current one changes nothing"
        );

        master.agent_disconnected(&agent_id, epoch);
        assert!(matches!(
            link_of(&master, &agent_id),
            AgentLink::Disconnected
        ));
        assert!(master.allocator.free(&agent_id).is_some());

        master.tick();
        assert!(matches!(
            link_of(&master, &agent_id),
            AgentLink::Unreachable { .. }
        ));
        assert!(master.agents[&agent_id].unreachable());
        assert!(
            master.allocator.free(&agent_id).is_none(),
            "an unreachable agent's resources leave the cluster"
        );

        let (again, new_epoch, _messages) =
            fixture::agent(&mut master, Some(&agent_id), "cpus:4;mem:4096");
        assert_eq!(again, agent_id);
        assert!(new_epoch > epoch);
        assert_eq!(link_of(&master, &agent_id).epoch(), Some(new_epoch));
        assert!(master.agents[&agent_id].reregistered_time.is_some());
        assert!(master.allocator.free(&agent_id).is_some());
    }

    #[test]
    fn a_silent_agent_is_unreachable_after_all_its_ping_timeouts_not_one() {
        let mut master = fixture::master("ping-timeouts", |config| {
            config.agent_ping_timeout = Duration::from_secs(10);
            config.max_agent_ping_timeouts = 3;
            config.agent_reregister_timeout = Duration::ZERO;
        });
        let (agent_id, epoch, _messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        let seen = master.agents[&agent_id].last_seen;

        master.check_agents(seen + Duration::from_secs(11));
        assert!(
            matches!(link_of(&master, &agent_id), AgentLink::Disconnected),
            "one ping timeout drops the link, no more"
        );
        master.check_agents(seen + Duration::from_secs(29));
        assert!(
            !master.agents[&agent_id].unreachable(),
            "the re-register timeout is for agents read back after a restart, not live ones"
        );
        master.check_agents(seen + Duration::from_secs(30));
        assert!(master.agents[&agent_id].unreachable());
        assert!(link_of(&master, &agent_id).epoch().is_none());
        let _ = epoch;
    }

    #[test]
    fn events_a_slow_reader_cannot_take_close_its_link_not_the_master() {
        let mut master = fixture::master("link-queue", |_| {});
        let (agent_id, epoch, messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        // Registered waits there already.
        for _ in messages.len()..AGENT_LINK_QUEUE {
            master.agent_heartbeat(&agent_id);
        }
        assert_eq!(link_of(&master, &agent_id).epoch(), Some(epoch));
        master.agent_heartbeat(&agent_id);
        assert!(
            matches!(link_of(&master, &agent_id), AgentLink::Disconnected),
            "past the bound the link is closed"
        );
        assert_eq!(
            messages.len(),
            AGENT_LINK_QUEUE,
            "nothing past the bound was queued"
        );
        assert!(
            messages.is_closed(),
            "the link's sender is dropped: its stream ends"
        );
    }

    #[test]
    fn unreachable_agents_are_remembered_across_a_restart_then_forgotten_past_their_age() {
        let dir = std::env::temp_dir().join(format!(
            "butte-master-unit-forget-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let open = |max_age: Duration| {
            let mut config = crate::config::MasterConfig::for_work_dir(dir.clone());
            config.agent_ping_timeout = Duration::ZERO;
            config.registry_max_agent_age = max_age;
            let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 5050));
            Master::open(config, listen).expect("the master opens its registry")
        };
        let hour = Duration::from_secs(3600);
        let mut master = open(hour);
        let aware = fixture::framework_with(
            &mut master,
            Some(3600.0),
            &[capability::Type::PartitionAware],
        );
        let plain = fixture::framework(&mut master, Some(3600.0));
        let (agent_id, epoch, _messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        let running = |framework_id: &str, task_id: &str| Task {
            name: task_id.into(),
            task_id: TaskId {
                value: task_id.into(),
            },
            framework_id: butte_api::mesos::v1::FrameworkId {
                value: framework_id.into(),
            },
            agent_id: AgentId {
                value: agent_id.clone(),
            },
            state: TaskState::TaskRunning as i32,
            ..Default::default()
        };
        let aware_task = running(&aware.framework_id, "aware-task");
        let plain_task = running(&plain.framework_id, "plain-task");
        for task in [&aware_task, &plain_task] {
            master.registry.put_task(task).expect("registry write");
            let retry = master.update_retry();
            master
                .frameworks
                .get_mut(&task.framework_id.value)
                .expect("framework")
                .tasks
                .insert(
                    task.task_id.value.clone(),
                    TaskEntry::restored(task.clone(), retry),
                );
        }
        master.agent_disconnected(&agent_id, epoch);
        master.tick();
        assert!(master.agents[&agent_id].unreachable());
        let state_of = |master: &Master, task: &Task| {
            master.frameworks[&task.framework_id.value]
                .tasks
                .get(&task.task_id.value)
                .map(TaskEntry::state)
        };
        assert_eq!(
            state_of(&master, &aware_task),
            Some(TaskState::TaskUnreachable)
        );
        assert_eq!(state_of(&master, &plain_task), Some(TaskState::TaskLost));
        drop(master);

        // A restart within the age: still unreachable, not waiting to re-register.
        let mut master = open(hour);
        assert!(master.agents[&agent_id].unreachable());
        master.tick();
        assert!(master.agents.contains_key(&agent_id));
        drop(master);

        // Past the age: the agent and its unreachable task are forgotten, for good.
        let mut master = open(Duration::ZERO);
        master.tick();
        assert!(!master.agents.contains_key(&agent_id));
        assert_eq!(state_of(&master, &aware_task), None);
        drop(master);
        let mut master = open(hour);
        assert!(!master.agents.contains_key(&agent_id));
        assert_eq!(state_of(&master, &aware_task), None);

        // It comes back: admitted, the partition-aware task is adopted, and
        // the other, which its framework was told was lost, is killed.
        master
            .frameworks
            .get_mut(&plain.framework_id)
            .expect("framework")
            .tasks
            .clear(); // its LOST acknowledged and long out of the books
        let (again, _, mut messages) = fixture::agent_running(
            &mut master,
            Some(&agent_id),
            "cpus:4;mem:4096",
            vec![aware_task.clone(), plain_task.clone()],
        );
        assert_eq!(again, agent_id);
        assert_eq!(state_of(&master, &aware_task), Some(TaskState::TaskRunning));
        assert_eq!(state_of(&master, &plain_task), None);
        let mut killed = Vec::new();
        while let Ok(message) = messages.try_recv() {
            if let Some(link::master_message::Kind::KillTask(kill)) = message.kind {
                killed.push(kill.task_id.value);
            }
        }
        assert_eq!(killed, vec!["plain-task".to_owned()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
