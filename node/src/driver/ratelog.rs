//! Rate limits for warnings a remote peer can trigger at will (rejected and malformed
//! messages): at most one line per (peer, kind, reason) every [`WINDOW`], the next one saying
//! how many were left out, so a peer that floods the node with junk cannot flood its log (or its
//! disk) too, while each new reason a peer earns is still logged at once (reasons are a fixed
//! set of labels). Every rejection is still counted in `/status` and `/metrics`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most one warning per (peer, kind, reason) in this window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Most (peer, kind, reason) keys remembered; beyond it the oldest are forgotten (they log again).
pub const MAX_KEYS: usize = 4096;

/// Per (peer, kind, reason): when a line was last written, and how many were left out since.
#[derive(Debug, Default)]
pub struct RateLog {
    last: HashMap<(String, &'static str, &'static str), (Instant, u64)>,
}

impl RateLog {
    /// Whether to write a warning about `peer`, `kind` and `reason` now; `Some(n)` with the
    /// number left out since the last one written, `None` to leave this one out.
    pub fn allow(
        &mut self,
        peer: &str,
        kind: &'static str,
        reason: &'static str,
        now: Instant,
    ) -> Option<u64> {
        let key = (peer.to_string(), kind, reason);
        if let Some((t, skipped)) = self.last.get_mut(&key) {
            if now.saturating_duration_since(*t) < WINDOW {
                *skipped += 1;
                return None;
            }
            let n = *skipped;
            *t = now;
            *skipped = 0;
            return Some(n);
        }
        if self.last.len() >= MAX_KEYS {
            self.last
                .retain(|_, (t, _)| now.saturating_duration_since(*t) < WINDOW);
            if self.last.len() >= MAX_KEYS {
                self.last.clear();
            }
        }
        self.last.insert(key, (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_peer_kind_and_reason_per_window_then_the_count_left_out() {
        let mut r = RateLog::default();
        let t0 = Instant::now();
        assert_eq!(r.allow("a", "SEAL", "x", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                r.allow("a", "SEAL", "x", t0 + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(r.allow("a", "JOIN", "x", t0), Some(0));
        assert_eq!(r.allow("b", "SEAL", "x", t0), Some(0));
        // Another reason from the same peer and kind is news: logged at once.
        assert_eq!(
            r.allow("a", "SEAL", "y", t0 + Duration::from_millis(9)),
            Some(0)
        );
        assert_eq!(r.allow("a", "SEAL", "x", t0 + WINDOW), Some(5));
        assert_eq!(r.allow("a", "SEAL", "x", t0 + WINDOW), None);
    }

    #[test]
    fn memory_stays_bounded_under_many_peers() {
        let mut r = RateLog::default();
        let t0 = Instant::now();
        for i in 0..3 * MAX_KEYS {
            assert_eq!(r.allow(&i.to_string(), "READY", "x", t0), Some(0));
        }
        assert!(r.last.len() <= MAX_KEYS);
    }
}
