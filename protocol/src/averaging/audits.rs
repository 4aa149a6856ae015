//! Aggregate audits (see [`crate::audit`]): contributors project their own shards for each AGG
//! that includes them and gossip AUDIT; the collecting leader checks every candidate aggregate
//! against those projections before it seals one.

use std::collections::BTreeSet;

use crate::audit;
use crate::codec;
use crate::wire::{Agg, Audit, AuditEntry, Body, Hash, PeerKey};

use super::{bit, CloseInfo, Leading, Reject, Rule, State};

impl State {
    pub(super) fn audited_rule(&self) -> bool {
        matches!(self.cfg.rule, Rule::Mean | Rule::NormScreen { .. })
    }

    /// A contributor included in an AGG projects its own shard for it (see [`crate::audit`]).
    pub(super) fn audit_agg(&mut self, a: &Agg) {
        if !self.audited_rule() || !self.r.audited.insert((a.close, a.shard, a.data)) {
            return;
        }
        let Some(info) = self.r.closes.get(&a.close) else {
            return;
        };
        let Some(c) = self.r.contrib.as_ref() else {
            return;
        };
        let me = self.me;
        let Some(idx) = info
            .close
            .contributors
            .iter()
            .position(|x| x.peer == me && x.ready == c.ready_id)
        else {
            return;
        };
        if !bit(&a.included, idx) {
            return;
        }
        let range = self.shard_range(a.shard as usize);
        let Some(Ok(v)) = c
            .shards
            .get(a.shard as usize)
            .map(|d| codec::decode(d, range.len()))
        else {
            return;
        };
        let seed = audit::seed(&a.close, a.shard, &a.data);
        let proj = audit::project(&seed, &v, audit::AUDIT_PROJECTIONS);
        let entries = self.r.audit_out.entry(a.close).or_default();
        entries.push(AuditEntry {
            shard: a.shard,
            agg: a.data,
            proj: proj.into_iter().map(f64::to_bits).collect(),
        });
        let shards: BTreeSet<u32> = self
            .r
            .audited
            .iter()
            .filter(|(c, ..)| *c == a.close)
            .map(|(_, s, _)| *s)
            .collect();
        if shards.len() >= self.k() {
            self.flush_audits();
        }
    }

    pub(super) fn flush_audits(&mut self) {
        let pending = std::mem::take(&mut self.r.audit_out);
        for (close, entries) in pending {
            if !entries.is_empty() {
                self.gossip(Body::Audit(Audit { close, entries }));
            }
        }
    }

    pub(super) fn on_audit(&mut self, signer: PeerKey, a: &Audit) {
        // Only the leader collecting for this CLOSE checks aggregates; everyone else drops the
        // AUDITs (storing n x K projections on every peer costs gigabytes at n = 1000).
        if !matches!(self.r.leading, Some(Leading::Collecting { close_id, .. }) if close_id == a.close)
        {
            return;
        }
        let Some(info) = self.r.closes.get(&a.close) else {
            return;
        };
        let Some(idx) = info
            .close
            .contributors
            .iter()
            .position(|c| c.peer == signer)
        else {
            self.reject(signer, "AUDIT", Reject::NotAllowed("AUDIT"));
            return;
        };
        let k = self.k();
        if a.entries.len() > 2 * k {
            self.reject(signer, "AUDIT", Reject::Malformed("AUDIT entries"));
            return;
        }
        for e in &a.entries {
            let proj: Vec<f64> = e.proj.iter().map(|b| f64::from_bits(*b)).collect();
            if e.shard as usize >= k
                || proj.len() != audit::AUDIT_PROJECTIONS
                || proj.iter().any(|x| !x.is_finite())
            {
                self.reject(signer, "AUDIT", Reject::Malformed("AUDIT entry"));
                return;
            }
            let slot = self.r.audits.entry((a.close, e.shard, e.agg)).or_default();
            slot.entry(idx).or_insert(proj);
        }
        self.leader_progress();
    }

    /// Whether every included contributor of every AGG for `close_id` has sent its AUDIT.
    pub(super) fn audits_complete(&self, close_id: Hash) -> bool {
        if !self.audited_rule() {
            return true;
        }
        let Some(info) = self.r.closes.get(&close_id) else {
            return true;
        };
        let n = info.close.contributors.len();
        (0..self.k() as u32).all(|s| {
            self.r
                .aggs
                .get(&(close_id, s))
                .into_iter()
                .flatten()
                .all(|(_, a, _)| {
                    let got = self.r.audits.get(&(close_id, s, a.data));
                    (0..n).all(|i| !bit(&a.included, i) || got.is_some_and(|g| g.contains_key(&i)))
                })
        })
    }

    /// Checks an aggregate against its contributors' projections. `None`: not auditable (rule,
    /// or some included contributor sent no AUDIT); `Some(Err(..))`: it fails. An owner that
    /// includes itself must audit its own aggregate (an honest one always does): one that
    /// withholds its AUDIT to make its aggregate unauditable fails.
    pub(super) fn audit_check(
        &self,
        info: &CloseInfo,
        close_id: Hash,
        shard: u32,
        owner: PeerKey,
        a: &Agg,
        values: &[f32],
    ) -> Option<Result<(), Reject>> {
        if !self.audited_rule() {
            return None;
        }
        let got = self.r.audits.get(&(close_id, shard, a.data));
        let owner_idx = info.close.contributors.iter().position(|c| c.peer == owner);
        if let Some(i) = owner_idx.filter(|i| bit(&a.included, *i)) {
            if !got.is_some_and(|g| g.contains_key(&i)) {
                return Some(Err(Reject::Malformed("AGG not audited by its own owner")));
            }
        }
        let got = got?;
        let mut inputs: Vec<(&[f64], u64)> = Vec::new();
        let mut max_norm = 0f32;
        for (i, c) in info.close.contributors.iter().enumerate() {
            if !bit(&a.included, i) {
                continue;
            }
            inputs.push((got.get(&i)?.as_slice(), self.weight(c.info.tokens)));
            max_norm = max_norm.max(f32::from_bits(c.info.norm_bits));
        }
        let want = audit::expected(&inputs)?;
        let seed = audit::seed(&close_id, shard, &a.data);
        let actual = audit::project(&seed, values, audit::AUDIT_PROJECTIONS);
        let tolerance = audit::tolerance(self.cfg.codec, values, inputs.len(), max_norm);
        Some(
            audit::check(&actual, &want, tolerance).map_err(|deviation| Reject::AuditFailed {
                deviation,
                tolerance,
            }),
        )
    }
}
