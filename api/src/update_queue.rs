//! At-least-once, in-order delivery of one task's status updates: only the
//! oldest is in flight; it is resent, with a growing wait, until its receiver
//! acknowledges its uuid. The agent (towards the master) and the master
//! (towards the framework) each keep one queue per task.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::mesos::v1::TaskStatus;

/// How long to wait before resending an unacknowledged update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// The wait after the first send.
    pub first: Duration,
    /// Each resend doubles the wait, up to this (equal to `first`: no backoff).
    pub longest: Duration,
}

impl Retry {
    /// The same wait every time.
    pub fn fixed(wait: Duration) -> Self {
        Self {
            first: wait,
            longest: wait,
        }
    }
}

/// Something delivered at least once and acknowledged by its uuid.
pub trait Update: Clone {
    fn uuid(&self) -> &[u8];
}

impl Update for TaskStatus {
    fn uuid(&self) -> &[u8] {
        self.uuid.as_deref().unwrap_or_default()
    }
}

impl Update for crate::agent_link::v1::StatusUpdate {
    fn uuid(&self) -> &[u8] {
        self.status.uuid()
    }
}

/// One task's unacknowledged updates, oldest first.
#[derive(Debug, Clone)]
pub struct UpdateQueue<U> {
    pending: VecDeque<U>,
    retry: Retry,
    /// When the head was last sent (None: not since it became the head, or
    /// since the receiver's link was renewed).
    sent_at: Option<Instant>,
    wait: Duration,
}

impl<U: Update> UpdateQueue<U> {
    pub fn new(retry: Retry) -> Self {
        // A first wait beyond the longest would grow the wait past it.
        let retry = Retry {
            first: retry.first.min(retry.longest),
            ..retry
        };
        Self {
            pending: VecDeque::new(),
            retry,
            sent_at: None,
            wait: retry.first,
        }
    }

    pub fn push(&mut self, update: U) {
        self.pending.push_back(update);
    }

    /// The head, marked as sent, when it has never been sent or its wait has
    /// passed (each resend doubles the wait, up to `Retry::longest`).
    pub fn due(&mut self, now: Instant) -> Option<U> {
        let head = self.pending.front()?;
        match self.sent_at {
            Some(at) if now.duration_since(at) < self.wait => return None,
            Some(_) => self.wait = self.wait.saturating_mul(2).min(self.retry.longest),
            None => {}
        }
        self.sent_at = Some(now);
        Some(head.clone())
    }

    /// The receiver has the update with `uuid`: if it is the head, it is
    /// dropped and returned, and the next one becomes due at once.
    pub fn acknowledge(&mut self, uuid: &[u8]) -> Option<U> {
        if self.pending.front()?.uuid() != uuid {
            return None;
        }
        self.sent_at = None;
        self.wait = self.retry.first;
        self.pending.pop_front()
    }

    /// Whether an update with `uuid` waits here (a resend of it is a duplicate).
    pub fn holds(&self, uuid: &[u8]) -> bool {
        self.pending.iter().any(|u| u.uuid() == uuid)
    }

    /// The receiver's link is new and has seen nothing: the head is due now.
    pub fn resend_now(&mut self) {
        self.sent_at = None;
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Every update not yet acknowledged, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &U> {
        self.pending.iter()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// A fresh random uuid (v4) as the 16 bytes that status updates carry.
pub fn new_uuid() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

/// Seconds since the Unix epoch, as Mesos timestamps are written.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends to a history that keeps at most `limit` items, dropping the oldest.
pub fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, limit: usize) {
    while queue.len() >= limit.max(1) {
        queue.pop_front();
    }
    queue.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(uuid: u8) -> TaskStatus {
        TaskStatus {
            uuid: Some(vec![uuid; 16]),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_head_is_in_flight_until_acknowledged_in_order() {
        let mut queue = UpdateQueue::new(Retry::fixed(Duration::from_secs(10)));
        let now = Instant::now();
        queue.push(status(1));
        queue.push(status(2));
        assert_eq!(queue.due(now).map(|s| s.uuid), Some(Some(vec![1; 16])));
        assert!(queue.due(now).is_none(), "the head waits for its retry");
        assert!(
            queue.acknowledge(&[2; 16]).is_none(),
            "only the head is acked"
        );
        assert!(queue.acknowledge(&[1; 16]).is_some());
        assert_eq!(queue.due(now).map(|s| s.uuid), Some(Some(vec![2; 16])));
        assert!(queue.holds(&[2; 16]) && !queue.holds(&[1; 16]));
    }

    #[test]
    fn resends_double_the_wait_up_to_the_longest() {
        let retry = Retry {
            first: Duration::from_secs(1),
            longest: Duration::from_secs(3),
        };
        let mut queue = UpdateQueue::new(retry);
        queue.push(status(1));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(queue.due(at(0)).is_some());
        assert!(queue.due(at(1)).is_some(), "first resend after 1 s");
        assert!(queue.due(at(2)).is_none(), "then 2 s");
        assert!(queue.due(at(3)).is_some());
        assert!(queue.due(at(5)).is_none(), "then 3 s, not 4");
        assert!(queue.due(at(6)).is_some());
        queue.resend_now();
        assert!(
            queue.due(at(6)).is_some(),
            "a new link gets the head at once"
        );
    }

    #[test]
    fn an_enormous_wait_saturates_instead_of_overflowing() {
        let mut queue = UpdateQueue::new(Retry {
            first: Duration::MAX,
            longest: Duration::from_secs(60),
        });
        queue.push(status(1));
        let start = Instant::now();
        assert!(queue.due(start).is_some());
        assert!(
            queue.due(start + Duration::from_secs(60)).is_some(),
            "the first wait is held to the longest"
        );
        let mut huge = UpdateQueue::new(Retry::fixed(Duration::MAX / 2));
        huge.push(status(2));
        assert!(huge.due(start).is_some());
        assert!(huge.due(start + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn bounded_history_drops_the_oldest() {
        let mut history = VecDeque::new();
        for i in 0..5 {
            push_bounded(&mut history, i, 3);
        }
        assert_eq!(history, VecDeque::from([2, 3, 4]));
    }
}
