//! Offers: each allocation cycle's offers, their rescinding, DECLINE, and
//! ACCEPT, which claims the named offers and gives back only what its
//! operations leave unused.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use butte_api::mesos::v1::scheduler::{Event, call, event};
use butte_api::mesos::v1::{
    AgentId, Filters, FrameworkId, Offer, OfferId, offer::Operation, resource::AllocationInfo,
};
use butte_api::resources::Resources;

use super::Master;
use super::launch::{Budget, Placement};

pub struct OutstandingOffer {
    pub id: String,
    pub framework_id: String,
    pub agent_id: String,
    pub role: String,
    pub resources: Resources,
    pub created: Instant,
}

/// The offers an ACCEPT names, taken out of the outstanding ones. Their
/// resources stay booked to the framework in the allocator while the
/// operations use them.
struct Claim {
    agent_id: String,
    role: String,
    offers: usize,
    resources: Resources,
}

fn refuse_duration(filters: Option<&Filters>) -> Duration {
    let seconds = filters.and_then(|f| f.refuse_seconds).unwrap_or(5.0);
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(5))
}

impl Master {
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
        let took = started.elapsed().as_secs_f64();
        self.counters.allocation_last_ms = took * 1e3;
        self.counters.allocation_durations.observe(took);
    }

    /// Takes an offer out of the outstanding ones; its resources stay booked.
    fn take_offer(&mut self, offer_id: &str) -> Option<OutstandingOffer> {
        let offer = self.offers.remove(offer_id)?;
        if let Some(framework) = self.frameworks.get_mut(&offer.framework_id) {
            framework.offers.remove(offer_id);
        }
        Some(offer)
    }

    /// Gives an offer's resources back to the allocator.
    fn recover_offer(&mut self, offer: &OutstandingOffer, refuse: Option<Duration>) {
        self.allocator.recover(
            &offer.framework_id,
            &offer.agent_id,
            &offer.role,
            &offer.resources,
            refuse,
            Instant::now(),
        );
    }

    /// Takes an offer back: its resources return to the allocator.
    fn rescind_offer(&mut self, offer_id: &str, notify: bool, refuse: Option<Duration>) -> bool {
        let Some(offer) = self.take_offer(offer_id) else {
            return false;
        };
        self.recover_offer(&offer, refuse);
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
        true
    }

    pub(super) fn rescind_framework_offers(&mut self, framework_id: &str, notify: bool) {
        let ids: Vec<String> = self
            .frameworks
            .get(framework_id)
            .map(|f| f.offers.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.rescind_offer(&id, notify, None);
        }
    }

    pub(super) fn rescind_agent_offers(&mut self, agent_id: &str) {
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

    /// Rescinds the offers older than the offer timeout (none when it is 0).
    pub(super) fn expire_offers(&mut self, now: Instant) {
        if self.config.offer_timeout.is_zero() {
            return;
        }
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

    pub fn decline(&mut self, framework_id: &str, decline: &call::Decline) {
        let refuse = refuse_duration(decline.filters.as_ref());
        for offer_id in &decline.offer_ids {
            let owned = self
                .offers
                .get(&offer_id.value)
                .is_some_and(|o| o.framework_id == framework_id);
            if owned && self.rescind_offer(&offer_id.value, false, Some(refuse)) {
                self.counters.offers_declined += 1;
            }
        }
        self.want_allocation();
    }

    /// ACCEPT: claims the offers, applies each operation to what they hold
    /// (answering invalid tasks with TASK_ERROR, or every task with
    /// TASK_LOST / TASK_DROPPED when the offers are not valid), and gives
    /// back what is left of the offers, filtered for `refuse_seconds`.
    pub fn accept(&mut self, framework_id: &str, accept: call::Accept) {
        let refuse = refuse_duration(accept.filters.as_ref());
        let now = Instant::now();
        let claim = match self.claim_offers(framework_id, &accept.offer_ids) {
            Ok(claim) => claim,
            Err(message) => {
                self.drop_launches(framework_id, &accept.operations, &message);
                self.want_allocation();
                return;
            }
        };
        self.counters.offers_accepted += claim.offers as u64;
        let at = Placement {
            framework_id,
            agent_id: &claim.agent_id,
            role: &claim.role,
        };
        let mut budget = Budget::new(claim.resources.clone());
        for operation in accept.operations {
            self.apply_operation(&at, operation, &mut budget);
        }
        if !budget.remaining.is_empty() {
            self.allocator.recover(
                framework_id,
                &claim.agent_id,
                &claim.role,
                &budget.remaining,
                Some(refuse),
                now,
            );
        }
        self.want_allocation();
    }

    /// Takes the named offers when they exist, are the framework's, are
    /// distinct and are of one agent in one role; otherwise says why, and
    /// the valid ones go back unfiltered (a mistake is not a refusal).
    fn claim_offers(&mut self, framework_id: &str, offer_ids: &[OfferId]) -> Result<Claim, String> {
        let mut error = None;
        let mut seen = HashSet::new();
        let mut taken = Vec::new();
        for offer_id in offer_ids {
            let id = offer_id.value.as_str();
            match self.offers.get(id) {
                _ if !seen.insert(id) => {
                    error = Some(format!("offer {id} appears twice in the call"))
                }
                None => error = Some(format!("offer {id} is no longer valid")),
                Some(o) if o.framework_id != framework_id => {
                    error = Some(format!("offer {id} belongs to another framework"))
                }
                Some(_) => taken.push(id.to_owned()),
            }
        }
        if offer_ids.is_empty() {
            error = Some("ACCEPT names no offers".to_owned());
        }
        let offers: Vec<OutstandingOffer> =
            taken.iter().filter_map(|id| self.take_offer(id)).collect();
        let claim = match error {
            Some(message) => Err(message),
            None => claim_of(&offers),
        };
        if claim.is_err() {
            for offer in &offers {
                self.recover_offer(offer, None);
            }
        }
        claim
    }
}

/// The offers as one claim, when they are of one agent in one role.
fn claim_of(offers: &[OutstandingOffer]) -> Result<Claim, String> {
    let agents: HashSet<&str> = offers.iter().map(|o| o.agent_id.as_str()).collect();
    let roles: HashSet<&str> = offers.iter().map(|o| o.role.as_str()).collect();
    if agents.len() > 1 {
        return Err(
            "the offers are from different agents; accept offers of one agent per call".into(),
        );
    }
    if roles.len() > 1 {
        return Err("the offers are allocated to different roles; accept one role per call".into());
    }
    let Some(first) = offers.first() else {
        return Err("ACCEPT names no offers".to_owned());
    };
    let mut resources = Resources::new();
    for offer in offers {
        resources.add(&offer.resources);
    }
    Ok(Claim {
        agent_id: first.agent_id.clone(),
        role: first.role.clone(),
        offers: offers.len(),
        resources,
    })
}

/// The operations' tasks, as ACCEPT carries them.
pub(super) fn tasks_of(
    operation: &Operation,
) -> impl Iterator<Item = &butte_api::mesos::v1::TaskInfo> {
    let launched = operation.launch.iter().flat_map(|l| l.task_infos.iter());
    let grouped = operation
        .launch_group
        .iter()
        .flat_map(|g| g.task_group.tasks.iter());
    launched.chain(grouped)
}

#[cfg(test)]
mod tests {
    use butte_api::agent_link::v1 as link;
    use butte_api::mesos::v1::scheduler::call;
    use butte_api::mesos::v1::{
        AgentId, CommandInfo, Filters, OfferId, TaskId, TaskInfo, offer::Operation,
        offer::operation,
    };
    use butte_api::resources::Resources;

    use crate::master::{Master, fixture};

    fn resources(text: &str) -> Resources {
        Resources::parse(text).expect("the test's resources parse")
    }

    fn launch(agent_id: &str, task_id: &str, uses: &str) -> Operation {
        Operation {
            r#type: Some(operation::Type::Launch as i32),
            launch: Some(operation::Launch {
                task_infos: vec![TaskInfo {
                    name: task_id.into(),
                    task_id: TaskId {
                        value: task_id.into(),
                    },
                    agent_id: AgentId {
                        value: agent_id.into(),
                    },
                    resources: resources(uses).to_proto(Some("*")),
                    command: Some(CommandInfo {
                        value: Some("sleep 1000".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
    }

    fn only_offer(master: &Master) -> String {
        let mut ids = master.offers.keys();
        let id = ids.next().expect("the cycle made an offer").clone();
        assert!(ids.next().is_none(), "one agent, one framework: one offer");
        id
    }

    #[test]
    fn accept_books_exactly_what_the_launch_uses_and_returns_the_rest_filtered() {
        let mut master = fixture::master("accept", |_| {});
        let (agent_id, _, mut messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        let framework = fixture::framework(&mut master, None);
        let framework_id = framework.framework_id.as_str();
        master.allocate();
        let offer_id = only_offer(&master);
        assert_eq!(master.allocator.free(&agent_id), Some(&Resources::new()));

        master.accept(
            framework_id,
            call::Accept {
                offer_ids: vec![OfferId { value: offer_id }],
                operations: vec![launch(&agent_id, "t1", "cpus:1;mem:512")],
                filters: Some(Filters {
                    refuse_seconds: Some(3600.0),
                }),
            },
        );

        assert_eq!(
            master.allocator.free(&agent_id),
            Some(&resources("cpus:3;mem:3584")),
            "what the task does not use is back with the allocator"
        );
        let held = master
            .allocator
            .allocated(framework_id)
            .and_then(|a| a.get("*"));
        assert_eq!(held, Some(&resources("cpus:1;mem:512")));
        assert!(master.offers.is_empty() && master.frameworks[framework_id].offers.is_empty());
        assert!(master.frameworks[framework_id].tasks.contains_key("t1"));
        let launched = std::iter::from_fn(|| messages.try_recv().ok())
            .any(|m| matches!(m.kind, Some(link::master_message::Kind::LaunchTasks(_))));
        assert!(launched, "the agent is told to launch the task");

        master.allocate();
        assert!(
            master.offers.is_empty(),
            "the remainder is refused to the framework for refuse_seconds"
        );
    }

    #[test]
    fn accept_naming_an_unknown_offer_gives_the_valid_ones_back_unfiltered() {
        let mut master = fixture::master("accept-invalid", |_| {});
        let (agent_id, _, _messages) = fixture::agent(&mut master, None, "cpus:4;mem:4096");
        let mut framework = fixture::framework(&mut master, None);
        let framework_id = framework.framework_id.clone();
        master.allocate();
        let offer_id = only_offer(&master);

        master.accept(
            &framework_id,
            call::Accept {
                offer_ids: vec![
                    OfferId { value: offer_id },
                    OfferId {
                        value: "no-such-offer".into(),
                    },
                ],
                operations: vec![launch(&agent_id, "t1", "cpus:1;mem:512")],
                filters: Some(Filters {
                    refuse_seconds: Some(3600.0),
                }),
            },
        );

        assert_eq!(
            master.allocator.free(&agent_id),
            Some(&resources("cpus:4;mem:4096"))
        );
        let held = master.allocator.allocated(&framework_id);
        assert!(held.is_some_and(|a| a.is_empty()), "{held:?}");
        assert!(master.frameworks[&framework_id].tasks.is_empty());
        let lost = std::iter::from_fn(|| framework.events.try_recv().ok())
            .filter_map(|e| e.update)
            .any(|u| {
                u.status.task_id.value == "t1"
                    && u.status.state() == butte_api::mesos::v1::TaskState::TaskLost
            });
        assert!(
            lost,
            "the task is answered TASK_LOST (the framework is not partition-aware)"
        );
        master.allocate();
        assert_eq!(master.offers.len(), 1, "the valid offer was not filtered");
    }
}
