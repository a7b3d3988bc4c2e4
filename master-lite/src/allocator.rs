//! The allocator: which framework gets each agent's free resources, by
//! Dominant Resource Fairness across roles (scaled by role weight) and then
//! across the frameworks of a role, as in Mesos's hierarchical allocator.
//!
//! Offered resources count as allocated until they are used or recovered.
//! Like Mesos, a cycle offers all of an agent's free resources to one
//! framework; agents are visited in random order so that no agent is always
//! first. Filters are per (framework, agent) until an instant (Mesos filters
//! by the refused resources; the agent-wide filter is the common case).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use butte_api::resources::Resources;

/// The smallest free resources worth offering (Mesos's defaults).
const MIN_CPUS: f64 = 0.01;
const MIN_MEM: f64 = 32.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub framework_id: String,
    pub agent_id: String,
    pub role: String,
    pub resources: Resources,
}

#[derive(Debug)]
struct AgentSlot {
    total: Resources,
    free: Resources,
    /// GPUs (whole or MIG instances): such agents are offered only to
    /// frameworks with GPU_RESOURCES, as in Mesos, so CPU-only work does not
    /// fill GPU nodes.
    has_gpus: bool,
    active: bool,
}

#[derive(Debug, Default)]
struct FrameworkSlot {
    roles: BTreeSet<String>,
    suppressed: BTreeSet<String>,
    gpu_aware: bool,
    active: bool,
    filters: HashMap<String, Instant>,
    allocated: BTreeMap<String, Resources>,
}

impl FrameworkSlot {
    fn accepts(&self, agent_id: &str, agent: &AgentSlot, now: Instant) -> bool {
        (self.gpu_aware || !agent.has_gpus)
            && self.filters.get(agent_id).is_none_or(|&until| until <= now)
    }
}

#[derive(Debug, Default)]
struct RoleSlot {
    allocated: Resources,
    frameworks: BTreeSet<String>,
}

/// A share as an order-preserving key (non-negative floats sort like their bits).
fn share_key(share: f64) -> u64 {
    share.max(0.0).to_bits()
}

/// The dominant share of `allocated` in `total`: its largest scalar fraction.
pub fn dominant_share(allocated: &Resources, total: &Resources) -> f64 {
    allocated
        .scalars()
        .filter_map(|(name, value)| {
            let of = total.scalar(name);
            (of > 0.0).then(|| value / of)
        })
        .fold(0.0, f64::max)
}

fn allocatable(free: &Resources) -> bool {
    free.scalar("cpus") >= MIN_CPUS || free.scalar("mem") >= MIN_MEM
}

#[derive(Debug, Default)]
pub struct Allocator {
    total: Resources,
    agents: HashMap<String, AgentSlot>,
    frameworks: HashMap<String, FrameworkSlot>,
    roles: HashMap<String, RoleSlot>,
    weights: HashMap<String, f64>,
}

impl Allocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a role's weight (default 1); a role's share is divided by it.
    pub fn set_weight(&mut self, role: &str, weight: f64) {
        if weight.is_finite() && weight > 0.0 {
            self.weights.insert(role.to_owned(), weight);
        }
    }

    pub fn weight(&self, role: &str) -> f64 {
        self.weights.get(role).copied().unwrap_or(1.0)
    }

    /// The resources of every agent, active or not.
    pub fn total(&self) -> &Resources {
        &self.total
    }

    /// Resources allocated (offered or in use) to `framework_id` in each of its roles.
    pub fn allocated(&self, framework_id: &str) -> Option<&BTreeMap<String, Resources>> {
        self.frameworks.get(framework_id).map(|f| &f.allocated)
    }

    pub fn free(&self, agent_id: &str) -> Option<&Resources> {
        self.agents.get(agent_id).map(|a| &a.free)
    }

    pub fn add_agent(&mut self, agent_id: &str, total: Resources) {
        self.remove_agent(agent_id);
        self.total.add(&total);
        let has_gpus = total.has_gpus();
        self.agents.insert(
            agent_id.to_owned(),
            AgentSlot {
                free: total.clone(),
                total,
                has_gpus,
                active: true,
            },
        );
    }

    /// The agent's resources changed (e.g. a faulty GPU withdrawn): what is
    /// in use stays in use, the rest of the new total is free. Something in
    /// use that is no longer in the total is not free again when it is
    /// given back (`recover` caps free at the total).
    pub fn set_agent_total(&mut self, agent_id: &str, total: Resources) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let mut used = agent.total.clone();
        used.subtract_contained(&agent.free);
        let mut free = total.clone();
        free.subtract_contained(&used);
        self.total.subtract_contained(&agent.total);
        self.total.add(&total);
        agent.has_gpus = total.has_gpus();
        agent.total = total;
        agent.free = free;
    }

    /// Forgets an agent; the caller recovers what frameworks held on it first.
    pub fn remove_agent(&mut self, agent_id: &str) {
        if let Some(agent) = self.agents.remove(agent_id) {
            self.total.subtract_contained(&agent.total);
            for framework in self.frameworks.values_mut() {
                framework.filters.remove(agent_id);
            }
        }
    }

    /// An inactive agent keeps its books but gets no offers (e.g. disconnected).
    pub fn set_agent_active(&mut self, agent_id: &str, active: bool) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.active = active;
        }
    }

    pub fn add_framework(&mut self, framework_id: &str, roles: &[String], gpu_aware: bool) {
        let framework = self.frameworks.entry(framework_id.to_owned()).or_default();
        framework.gpu_aware = gpu_aware;
        framework.active = true;
        let roles: BTreeSet<String> = roles.iter().cloned().collect();
        for role in framework.roles.difference(&roles) {
            if let Some(slot) = self.roles.get_mut(role) {
                slot.frameworks.remove(framework_id);
            }
        }
        for role in &roles {
            self.roles
                .entry(role.clone())
                .or_default()
                .frameworks
                .insert(framework_id.to_owned());
        }
        framework.roles = roles;
    }

    /// Forgets a framework; the caller recovers its resources first.
    pub fn remove_framework(&mut self, framework_id: &str) {
        if let Some(framework) = self.frameworks.remove(framework_id) {
            for role in &framework.roles {
                if let Some(slot) = self.roles.get_mut(role) {
                    slot.frameworks.remove(framework_id);
                }
            }
            for (role, resources) in &framework.allocated {
                if let Some(slot) = self.roles.get_mut(role) {
                    slot.allocated.subtract_contained(resources);
                }
            }
        }
    }

    /// An inactive framework keeps its allocation but gets no offers (e.g. disconnected).
    pub fn set_framework_active(&mut self, framework_id: &str, active: bool) {
        if let Some(framework) = self.frameworks.get_mut(framework_id) {
            framework.active = active;
        }
    }

    /// Stops offers for `roles` (all of the framework's roles when empty).
    pub fn suppress(&mut self, framework_id: &str, roles: &[String]) {
        if let Some(framework) = self.frameworks.get_mut(framework_id) {
            let roles: Vec<String> = if roles.is_empty() {
                framework.roles.iter().cloned().collect()
            } else {
                roles.to_vec()
            };
            framework.suppressed.extend(roles);
        }
    }

    /// Resumes offers for `roles` (all when empty) and clears the framework's filters.
    pub fn revive(&mut self, framework_id: &str, roles: &[String]) {
        if let Some(framework) = self.frameworks.get_mut(framework_id) {
            if roles.is_empty() {
                framework.suppressed.clear();
            } else {
                for role in roles {
                    framework.suppressed.remove(role);
                }
            }
            framework.filters.clear();
        }
    }

    /// Books resources already in use (tasks found on a re-registering agent).
    pub fn mark_allocated(
        &mut self,
        framework_id: &str,
        agent_id: &str,
        role: &str,
        resources: &Resources,
    ) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.free.subtract_contained(resources);
        }
        self.book(framework_id, role, resources);
    }

    /// What an agent's running task holds, taken from its free resources
    /// again (the agent registered anew; the framework's share already
    /// counts the task).
    pub fn take_from_agent(&mut self, agent_id: &str, resources: &Resources) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.free.subtract_contained(resources);
        }
    }

    fn book(&mut self, framework_id: &str, role: &str, resources: &Resources) {
        if let Some(framework) = self.frameworks.get_mut(framework_id) {
            framework
                .allocated
                .entry(role.to_owned())
                .or_default()
                .add(resources);
        }
        self.roles
            .entry(role.to_owned())
            .or_default()
            .allocated
            .add(resources);
    }

    /// Gives resources back to the agent (declined, rescinded, or the task
    /// ended), optionally refusing this agent to the framework for `refuse`.
    pub fn recover(
        &mut self,
        framework_id: &str,
        agent_id: &str,
        role: &str,
        resources: &Resources,
        refuse: Option<Duration>,
        now: Instant,
    ) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.free.add(resources);
            // Never more free than the agent has, whatever the caller's books say.
            if !agent.total.contains(&agent.free) {
                agent.free = agent.total.clone();
            }
        }
        if let Some(framework) = self.frameworks.get_mut(framework_id) {
            if let Some(held) = framework.allocated.get_mut(role) {
                held.subtract_contained(resources);
                if held.is_empty() {
                    framework.allocated.remove(role);
                }
            }
            if let Some(refuse) = refuse.filter(|d| !d.is_zero()) {
                framework.filters.insert(agent_id.to_owned(), now + refuse);
            }
        }
        if let Some(slot) = self.roles.get_mut(role) {
            slot.allocated.subtract_contained(resources);
        }
    }

    /// One allocation cycle: every active agent with allocatable free
    /// resources goes to the eligible framework of the lowest-share role,
    /// lowest share first within the role.
    pub fn allocate(&mut self, now: Instant) -> Vec<Allocation> {
        let mut queues = Queues::new(&self.roles, &self.frameworks, &self.weights, &self.total);
        if queues.roles.is_empty() {
            return Vec::new();
        }
        let mut order: Vec<&String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.active && allocatable(&a.free))
            .map(|(id, _)| id)
            .collect();
        order.sort_unstable();
        fastrand::shuffle(&mut order);
        let order: Vec<String> = order.into_iter().cloned().collect();

        let mut allocations = Vec::new();
        for agent_id in order {
            let Some(agent) = self.agents.get_mut(&agent_id) else {
                continue;
            };
            let frameworks = &self.frameworks;
            let Some(pick) = queues.pick(|framework_id| {
                frameworks
                    .get(framework_id)
                    .is_some_and(|f| f.accepts(&agent_id, agent, now))
            }) else {
                continue;
            };
            let resources = std::mem::take(&mut agent.free);
            let (Some(framework), Some(role_slot)) = (
                self.frameworks.get_mut(&pick.framework_id),
                self.roles.get_mut(&pick.role),
            ) else {
                continue;
            };
            let held = framework.allocated.entry(pick.role.clone()).or_default();
            held.add(&resources);
            let framework_share = dominant_share(held, &self.total);
            role_slot.allocated.add(&resources);
            let weight = self.weights.get(&pick.role).copied().unwrap_or(1.0);
            let role_share = dominant_share(&role_slot.allocated, &self.total) / weight;
            queues.requeue(&pick, framework_share, role_share);
            allocations.push(Allocation {
                framework_id: pick.framework_id,
                agent_id,
                role: pick.role,
                resources,
            });
        }
        allocations
    }
}

/// One cycle's DRF queues of (share key, name), lowest share first: the
/// roles by weighted dominant share, and each role's frameworks by theirs,
/// holding only what can receive offers.
struct Queues {
    roles: BTreeSet<(u64, String)>,
    frameworks: HashMap<String, BTreeSet<(u64, String)>>,
}

/// The role and framework an agent goes to, with the keys they were queued under.
struct Pick {
    role_key: u64,
    role: String,
    framework_key: u64,
    framework_id: String,
}

impl Queues {
    fn new(
        roles: &HashMap<String, RoleSlot>,
        frameworks: &HashMap<String, FrameworkSlot>,
        weights: &HashMap<String, f64>,
        total: &Resources,
    ) -> Self {
        let mut queues = Queues {
            roles: BTreeSet::new(),
            frameworks: HashMap::new(),
        };
        for (role, slot) in roles {
            let queue: BTreeSet<(u64, String)> = slot
                .frameworks
                .iter()
                .filter_map(|id| {
                    let framework = frameworks.get(id)?;
                    let wants = framework.active && !framework.suppressed.contains(role);
                    let held = framework
                        .allocated
                        .get(role)
                        .map(|r| dominant_share(r, total));
                    wants.then(|| (share_key(held.unwrap_or(0.0)), id.clone()))
                })
                .collect();
            if !queue.is_empty() {
                let weight = weights.get(role).copied().unwrap_or(1.0);
                queues.roles.insert((
                    share_key(dominant_share(&slot.allocated, total) / weight),
                    role.clone(),
                ));
                queues.frameworks.insert(role.clone(), queue);
            }
        }
        queues
    }

    /// The lowest-share framework of the lowest-share role that `accepts`.
    fn pick(&self, accepts: impl Fn(&str) -> bool) -> Option<Pick> {
        for (role_key, role) in &self.roles {
            let Some(queue) = self.frameworks.get(role) else {
                continue;
            };
            if let Some((framework_key, framework_id)) = queue.iter().find(|(_, id)| accepts(id)) {
                return Some(Pick {
                    role_key: *role_key,
                    role: role.clone(),
                    framework_key: *framework_key,
                    framework_id: framework_id.clone(),
                });
            }
        }
        None
    }

    /// Moves the picked framework and role to their shares after the offer.
    fn requeue(&mut self, pick: &Pick, framework_share: f64, role_share: f64) {
        if let Some(queue) = self.frameworks.get_mut(&pick.role) {
            queue.remove(&(pick.framework_key, pick.framework_id.clone()));
            queue.insert((share_key(framework_share), pick.framework_id.clone()));
        }
        self.roles.remove(&(pick.role_key, pick.role.clone()));
        self.roles
            .insert((share_key(role_share), pick.role.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(text: &str) -> Resources {
        Resources::parse(text).unwrap()
    }

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lowest_dominant_share_gets_the_next_agent() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        for i in 0..4 {
            allocator.add_agent(&format!("a{i}"), res("cpus:4;mem:4096"));
        }
        allocator.add_framework("big", &roles(&["*"]), false);
        allocator.add_framework("small", &roles(&["*"]), false);
        // "big" already holds most of agent a0.
        allocator.mark_allocated("big", "a0", "*", &res("cpus:3;mem:100"));
        let allocations = allocator.allocate(now);
        let to_small = allocations
            .iter()
            .filter(|a| a.framework_id == "small")
            .count();
        // Small catches up first: it gets at least two of the three whole agents.
        assert!(to_small >= 2, "{allocations:?}");
        assert_eq!(
            allocator.allocate(now),
            Vec::new(),
            "everything is offered already"
        );
    }

    #[test]
    fn weights_divide_role_shares() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        for i in 0..10 {
            allocator.add_agent(&format!("a{i}"), res("cpus:1;mem:1024"));
        }
        allocator.set_weight("heavy", 4.0);
        allocator.add_framework("h", &roles(&["heavy"]), false);
        allocator.add_framework("l", &roles(&["light"]), false);
        let allocations = allocator.allocate(now);
        let heavy = allocations.iter().filter(|a| a.role == "heavy").count();
        assert_eq!(
            heavy, 8,
            "weight 4 against 1 gets 4/5 of 10 agents: {allocations:?}"
        );
    }

    #[test]
    fn refused_agent_is_not_offered_again_until_filter_expires() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("a0", res("cpus:2;mem:2048"));
        allocator.add_framework("f", &roles(&["*"]), false);
        let first = allocator.allocate(now);
        assert_eq!(first.len(), 1);
        allocator.recover(
            "f",
            "a0",
            "*",
            &first[0].resources,
            Some(Duration::from_secs(5)),
            now,
        );
        assert!(allocator.allocate(now + Duration::from_secs(1)).is_empty());
        assert_eq!(allocator.allocate(now + Duration::from_secs(6)).len(), 1);
    }

    #[test]
    fn revive_clears_filters_and_suppression() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("a0", res("cpus:2;mem:2048"));
        allocator.add_framework("f", &roles(&["*"]), false);
        let first = allocator.allocate(now);
        allocator.recover(
            "f",
            "a0",
            "*",
            &first[0].resources,
            Some(Duration::from_secs(60)),
            now,
        );
        allocator.suppress("f", &[]);
        assert!(allocator.allocate(now).is_empty());
        allocator.revive("f", &[]);
        assert_eq!(allocator.allocate(now).len(), 1);
    }

    #[test]
    fn gpu_agents_go_only_to_gpu_aware_frameworks() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("gpu", res("cpus:8;mem:8192;gpus:2"));
        allocator.add_agent("mig", res("cpus:8;mem:8192;mig-1g.10gb:7"));
        allocator.add_framework("plain", &roles(&["*"]), false);
        assert!(allocator.allocate(now).is_empty());
        allocator.add_framework("aware", &roles(&["*"]), true);
        let allocations = allocator.allocate(now);
        assert_eq!(allocations.len(), 2, "the GPU agent and the MIG agent");
        assert!(allocations.iter().all(|a| a.framework_id == "aware"));
    }

    #[test]
    fn a_changed_total_keeps_what_is_in_use_and_frees_the_rest() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("a0", res("cpus:8;mem:8192;gpus:8"));
        allocator.add_framework("f", &roles(&["*"]), true);
        allocator.mark_allocated("f", "a0", "*", &res("cpus:1;mem:128;gpus:2"));
        // A faulty GPU is withdrawn: 7 left, 2 of them in use.
        allocator.set_agent_total("a0", res("cpus:8;mem:8192;gpus:7"));
        assert_eq!(allocator.free("a0"), Some(&res("cpus:7;mem:8064;gpus:5")));
        assert_eq!(allocator.total().scalar("gpus"), 7.0);
        allocator.recover("f", "a0", "*", &res("cpus:1;mem:128;gpus:2"), None, now);
        assert_eq!(allocator.free("a0"), Some(&res("cpus:8;mem:8192;gpus:7")));
    }

    #[test]
    fn recovered_resources_never_exceed_the_agent() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("a0", res("cpus:2;mem:2048"));
        allocator.add_framework("f", &roles(&["*"]), false);
        allocator.recover("f", "a0", "*", &res("cpus:5"), None, now);
        assert_eq!(allocator.free("a0"), Some(&res("cpus:2;mem:2048")));
    }

    #[test]
    fn inactive_agents_and_frameworks_get_nothing() {
        let mut allocator = Allocator::new();
        let now = Instant::now();
        allocator.add_agent("a0", res("cpus:2;mem:2048"));
        allocator.add_framework("f", &roles(&["*"]), false);
        allocator.set_agent_active("a0", false);
        assert!(allocator.allocate(now).is_empty());
        allocator.set_agent_active("a0", true);
        allocator.set_framework_active("f", false);
        assert!(allocator.allocate(now).is_empty());
        allocator.set_framework_active("f", true);
        assert_eq!(allocator.allocate(now).len(), 1);
    }
}
