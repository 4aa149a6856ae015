//! The averaging protocol's timers on the node's monotonic clock: the state machine asks for
//! a timer at a time in milliseconds since the node started, the event loop sleeps until the
//! earliest and feeds those that are due back in order.

use diloco_protocol::averaging::{Time, Timer};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most pending timers; beyond it new ones are dropped (the protocol re-arms its retries).
pub const MAX_TIMERS: usize = 100_000;

/// Pending timers.
pub struct Timers {
    clock: Instant,
    pending: BTreeMap<(Time, u64), Timer>,
    seq: u64,
}

impl Timers {
    /// No timers; the clock starts now.
    pub fn new() -> Self {
        Timers {
            clock: Instant::now(),
            pending: BTreeMap::new(),
            seq: 0,
        }
    }

    /// Milliseconds since the clock started.
    pub fn now(&self) -> Time {
        self.clock.elapsed().as_millis() as Time
    }

    /// Arms `timer` for `at`.
    pub fn set(&mut self, at: Time, timer: Timer) {
        self.seq += 1;
        if self.pending.len() < MAX_TIMERS {
            self.pending.insert((at, self.seq), timer);
        }
    }

    /// Drops every pending timer (the state they belong to is gone).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// The earliest timer that is due, removed.
    pub fn pop_due(&mut self) -> Option<Timer> {
        let now = self.now();
        let (&(at, seq), _) = self.pending.iter().next()?;
        if at > now {
            return None;
        }
        self.pending.remove(&(at, seq))
    }

    /// When the event loop must wake up next (in an hour when nothing is pending).
    pub fn next_wake(&self) -> tokio::time::Instant {
        let base = tokio::time::Instant::from_std(self.clock);
        match self.pending.keys().next() {
            Some(&(at, _)) => base + Duration::from_millis(at),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }
}

impl Default for Timers {
    fn default() -> Self {
        Self::new()
    }
}
