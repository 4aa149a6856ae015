//! What the dashboard plots and lists: a bounded ring buffer of per-round records
//! ([`History`], served as `/history`) and a bounded table of the peers this node has heard
//! from ([`PeerBook`], served as `/peers`).
//!
//! Both are filled by the event loop and only read by the HTTP server. Neither grows without
//! limit over a long run: the history keeps the last [`HISTORY_ROUNDS`] rounds, the peer table
//! the [`MAX_PEERS`] peers heard from most recently (a stranger inventing peer ids can only
//! push older rows out, never grow the table).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Rounds the history keeps (about 100 bytes of JSON each).
pub const HISTORY_ROUNDS: usize = 4096;
/// Peers the peer table keeps.
pub const MAX_PEERS: usize = 512;
/// Records one `/history` answer carries at most (the page asks again with `since`).
pub const MAX_PAGE: usize = HISTORY_ROUNDS;

/// One decided round as this node saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundRecord {
    /// The decided round.
    pub round: u64,
    /// Seconds since this node started, at the decision.
    pub at_s: f64,
    /// Members of the round after it (the group that trains next).
    pub members: usize,
    /// Peers whose outer gradients the decided round averaged.
    pub contributors: usize,
    /// Seconds from the previous decision to this one.
    pub round_s: Option<f64>,
    /// Seconds from this node's READY to the decision, if it contributed.
    pub averaging_s: Option<f64>,
    /// This node's mean training loss in the round, if it trained it.
    pub train_loss: Option<f32>,
    /// This node's training throughput in the round, if it trained it.
    pub tokens_per_s: Option<f64>,
    /// Eval loss of the global parameters this round produced (filled in when the eval ends).
    pub eval_loss: Option<f32>,
    /// Application bytes this node sent since the previous decision.
    pub bytes_sent: u64,
    /// Application bytes this node received since the previous decision.
    pub bytes_received: u64,
}

/// The last [`HISTORY_ROUNDS`] decided rounds, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    cap: usize,
    records: VecDeque<RoundRecord>,
    /// Totals at the last decision, to turn counters into per-round amounts.
    sent_at_last: u64,
    received_at_last: u64,
    /// What the trainer reported for a round not decided yet: (round, loss, tokens/s).
    trained: Option<(u64, f32, f64)>,
}

impl Default for History {
    fn default() -> Self {
        Self::with_capacity(HISTORY_ROUNDS)
    }
}

impl History {
    /// An empty history keeping at most `cap` rounds (at least one).
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.max(1);
        History {
            cap,
            records: VecDeque::with_capacity(cap.min(1024)),
            sent_at_last: 0,
            received_at_last: 0,
            trained: None,
        }
    }

    /// Rounds held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no round is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// This node finished training `round` with mean loss `loss` at `tokens_per_s`.
    pub fn trained(&mut self, round: u64, loss: f32, tokens_per_s: f64) {
        self.trained = Some((round, loss, tokens_per_s));
    }

    /// `rec.round` was decided; `sent`/`received` are the node's byte counters now. The
    /// record's train loss and throughput come from [`History::trained`] when it was for this
    /// round, its byte counts from the counters' growth since the last decision. A round at
    /// or below the newest one held (a node that abandoned a fork replays its rounds)
    /// replaces the records from there on.
    pub fn decided(&mut self, mut rec: RoundRecord, sent: u64, received: u64) {
        if let Some((r, loss, tps)) = self.trained {
            if r == rec.round {
                rec.train_loss = Some(loss);
                rec.tokens_per_s = Some(tps);
                self.trained = None;
            }
        }
        rec.bytes_sent = sent.saturating_sub(self.sent_at_last);
        rec.bytes_received = received.saturating_sub(self.received_at_last);
        self.sent_at_last = sent;
        self.received_at_last = received;
        while self.records.back().is_some_and(|b| b.round >= rec.round) {
            self.records.pop_back();
        }
        if self.records.len() == self.cap {
            self.records.pop_front();
        }
        self.records.push_back(rec);
    }

    /// The eval after `round` was decided ended with `loss`; false if that round is not held.
    pub fn evaluated(&mut self, round: u64, loss: f32) -> bool {
        match self.records.iter_mut().rev().find(|r| r.round == round) {
            Some(r) => {
                r.eval_loss = Some(loss);
                true
            }
            None => false,
        }
    }

    /// Records of rounds after `since` (all with `None`), oldest first, at most `limit`: the
    /// newest ones when there are more.
    pub fn after(&self, since: Option<u64>, limit: usize) -> Vec<RoundRecord> {
        let from = match since {
            None => 0,
            Some(s) => self.records.partition_point(|r| r.round <= s),
        };
        let n = self.records.len() - from;
        let skip = from + n.saturating_sub(limit);
        self.records.iter().skip(skip).cloned().collect()
    }
}

/// One peer as this node knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerRow {
    /// libp2p peer id.
    pub peer_id: String,
    /// Seconds since this node started, when it last heard from the peer.
    pub last_seen_s: f64,
    /// The round the peer last said it was in (HELLO or a signed message).
    pub round: Option<u64>,
    /// Decided rounds whose average included this peer's outer gradient.
    pub contributions: u64,
    /// Messages from this peer this node rejected.
    pub rejections: u64,
    /// Whether the peer is a member of the current round.
    pub member: bool,
}

/// The peers heard from most recently, at most [`MAX_PEERS`].
#[derive(Debug, Clone)]
pub struct PeerBook {
    cap: usize,
    rows: BTreeMap<String, PeerRow>,
}

impl Default for PeerBook {
    fn default() -> Self {
        Self::with_capacity(MAX_PEERS)
    }
}

impl PeerBook {
    /// An empty table of at most `cap` peers (at least one).
    pub fn with_capacity(cap: usize) -> Self {
        PeerBook {
            cap: cap.max(1),
            rows: BTreeMap::new(),
        }
    }

    /// Peers held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no peer is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row of `peer`, created (evicting the peer heard from longest ago when full).
    fn row(&mut self, peer: &str, now_s: f64) -> &mut PeerRow {
        if !self.rows.contains_key(peer) && self.rows.len() >= self.cap {
            let oldest = self
                .rows
                .values()
                .min_by(|a, b| a.last_seen_s.total_cmp(&b.last_seen_s))
                .map(|r| r.peer_id.clone());
            if let Some(o) = oldest {
                self.rows.remove(&o);
            }
        }
        self.rows
            .entry(peer.to_string())
            .or_insert_with(|| PeerRow {
                peer_id: peer.to_string(),
                last_seen_s: now_s,
                ..PeerRow::default()
            })
    }

    /// Heard from `peer` at `now_s`, which says it is in `round` (if the message says).
    pub fn seen(&mut self, peer: &str, now_s: f64, round: Option<u64>) {
        let row = self.row(peer, now_s);
        row.last_seen_s = row.last_seen_s.max(now_s);
        if round.is_some() {
            row.round = round;
        }
    }

    /// A message from `peer` was rejected at `now_s`.
    pub fn rejected(&mut self, peer: &str, now_s: f64) {
        let row = self.row(peer, now_s);
        row.last_seen_s = row.last_seen_s.max(now_s);
        row.rejections += 1;
    }

    /// A round was decided at `now_s` with these contributors; `members` are the next round's.
    pub fn decided(&mut self, contributors: &[String], members: &[String], now_s: f64) {
        for c in contributors {
            self.row(c, now_s).contributions += 1;
        }
        for row in self.rows.values_mut() {
            row.member = false;
        }
        for m in members {
            self.row(m, now_s).member = true;
        }
    }

    /// Every row, heard from most recently first.
    pub fn rows(&self) -> Vec<PeerRow> {
        let mut v: Vec<PeerRow> = self.rows.values().cloned().collect();
        v.sort_by(|a, b| b.last_seen_s.total_cmp(&a.last_seen_s));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(round: u64) -> RoundRecord {
        RoundRecord {
            round,
            ..RoundRecord::default()
        }
    }

    #[test]
    fn history_is_a_ring_buffer_of_the_newest_rounds() {
        let mut h = History::with_capacity(3);
        for r in 0..10 {
            h.decided(rec(r), 0, 0);
        }
        assert_eq!(h.len(), 3);
        let rounds: Vec<u64> = h.after(None, 100).iter().map(|r| r.round).collect();
        assert_eq!(rounds, vec![7, 8, 9]);
    }

    #[test]
    fn history_pages_by_round_and_limit() {
        let mut h = History::with_capacity(100);
        for r in 0..10 {
            h.decided(rec(r), 0, 0);
        }
        let after = |s, l| -> Vec<u64> { h.after(s, l).iter().map(|r| r.round).collect() };
        assert_eq!(after(Some(6), 100), vec![7, 8, 9]);
        assert_eq!(after(Some(9), 100), Vec::<u64>::new());
        assert_eq!(after(Some(100), 100), Vec::<u64>::new());
        assert_eq!(after(None, 2), vec![8, 9]);
        assert_eq!(after(Some(2), 3), vec![7, 8, 9]);
    }

    #[test]
    fn history_turns_counters_into_per_round_bytes_and_keeps_the_training_of_that_round() {
        let mut h = History::default();
        h.trained(0, 3.5, 1000.0);
        h.decided(rec(0), 100, 40);
        // Training reported for round 2 does not belong to round 1.
        h.trained(2, 3.0, 900.0);
        h.decided(rec(1), 250, 100);
        h.decided(rec(2), 300, 100);
        let v = h.after(None, 10);
        assert_eq!((v[0].bytes_sent, v[0].bytes_received), (100, 40));
        assert_eq!((v[1].bytes_sent, v[1].bytes_received), (150, 60));
        assert_eq!((v[2].bytes_sent, v[2].bytes_received), (50, 0));
        assert_eq!(v[0].train_loss, Some(3.5));
        assert_eq!(v[1].train_loss, None);
        assert_eq!(v[2].train_loss, Some(3.0));
        assert_eq!(v[2].tokens_per_s, Some(900.0));
    }

    #[test]
    fn history_takes_evals_late_and_replaces_a_replayed_fork() {
        let mut h = History::default();
        for r in 0..5 {
            h.decided(rec(r), 0, 0);
        }
        assert!(h.evaluated(3, 2.5));
        assert!(!h.evaluated(9, 2.0));
        assert_eq!(h.after(Some(2), 1)[0].eval_loss, None);
        assert_eq!(h.after(Some(2), 2)[0].eval_loss, Some(2.5));
        // Another history from round 2 on replaces ours.
        h.decided(rec(2), 0, 0);
        let rounds: Vec<u64> = h.after(None, 10).iter().map(|r| r.round).collect();
        assert_eq!(rounds, vec![0, 1, 2]);
    }

    #[test]
    fn peer_book_is_bounded_and_evicts_the_longest_silent() {
        let mut b = PeerBook::with_capacity(3);
        b.seen("a", 1.0, Some(1));
        b.seen("b", 2.0, None);
        b.seen("c", 3.0, None);
        b.seen("a", 4.0, None);
        b.rejected("d", 5.0);
        assert_eq!(b.len(), 3);
        let ids: Vec<String> = b.rows().into_iter().map(|r| r.peer_id).collect();
        assert_eq!(ids, vec!["d", "a", "c"]);
        let a = b.rows().into_iter().find(|r| r.peer_id == "a").unwrap();
        assert_eq!(
            a.round,
            Some(1),
            "a message without a round keeps the last known"
        );
        // A flood of invented ids keeps the table at its cap.
        for i in 0..1000 {
            b.seen(&format!("x{i}"), 10.0 + i as f64, None);
        }
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn peer_book_counts_contributions_rejections_and_membership() {
        let mut b = PeerBook::default();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        b.decided(&s(&["a", "b"]), &s(&["a", "b", "c"]), 1.0);
        b.decided(&s(&["a"]), &s(&["a", "c"]), 2.0);
        b.rejected("b", 3.0);
        b.rejected("b", 3.5);
        let row = |id: &str| b.rows().into_iter().find(|r| r.peer_id == id).unwrap();
        assert_eq!((row("a").contributions, row("a").member), (2, true));
        assert_eq!((row("b").contributions, row("b").rejections), (1, 2));
        assert!(!row("b").member);
        assert_eq!((row("c").contributions, row("c").member), (0, true));
    }
}
