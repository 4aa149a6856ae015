//! Run configuration shared by every peer of a run ([`Config`], [`Quorum`], [`Rule`]) and the
//! protocol's fixed limits.

use crate::codec::Quantization;
use crate::outer::OuterConfig;
use crate::wire::{self, Hash, Join, PeerKey};

use super::Time;

/// A peer accepts ballot `b` from `attempt_timeout / BALLOT_EARLY` before its own clock says
/// ballot `b`'s leader may start: this covers peers whose rounds started up to half a slot
/// apart, and no more (a leader of ballot `b + 1` that runs early cannot cut ballot `b` short).
pub const BALLOT_EARLY: u64 = 2;

/// Rounds of decision proofs and aggregates a peer keeps to serve catch-up.
pub const RETAIN_ROUNDS: u64 = 8;
/// Most messages for the next round buffered while this round finishes.
pub const MAX_BUFFERED: usize = 4096;
/// Most State candidates a joiner keeps while cross-checking donors (each holds theta and
/// momentum).
pub const MAX_STATE_CANDIDATES: usize = 3;
/// A joiner accepts a State that only one donor sent after this many retry periods in which
/// nobody contradicted it.
pub const LONE_STATE_RETRIES: u64 = 4;
/// Most announced envelopes being fetched at once.
pub const MAX_ANNOUNCED_PENDING: usize = 1024;
/// A peer at most this many rounds behind catches up by replaying decision proofs (fetching
/// each round's sealed aggregates, one request-response cycle per round); one further behind
/// is sent the full state (theta and momentum in f32: 8 bytes per parameter) in one transfer.
/// Replaying is cheaper in bytes (an int8 aggregate is 1 byte per parameter and round) but costs
/// a round trip per round, and a group that decides rounds faster than a laggard replays them
/// would never be caught up with.
pub const REPLAY_MAX_ROUNDS: u64 = 1;
/// A full state is 8 bytes per parameter (200 MB for a 25M-parameter model), so it is asked for
/// and sent sparingly: a peer asks one contact for it again only after this many retry periods
/// (its answer may still be on the way), and a donor sends it to one peer at most once in that
/// time and to at most [`MAX_STATES_SERVED`] peers in all.
pub const STATE_PATIENCE_RETRIES: u64 = LONE_STATE_RETRIES;
/// Most full states a donor sends within `STATE_PATIENCE_RETRIES` retry periods (bounds what
/// a crowd of joiners, or one peer under many ids, can make it upload).
pub const MAX_STATES_SERVED: usize = 8;

/// Newcomers one SEAL may add to a group of `members`: a quarter of it, at least one. A
/// newcomer that then says nothing for a whole round is evicted by the next SEAL, so JOINs from
/// keys that never train add at most this many silent members at a time.
pub fn max_joins(members: usize) -> usize {
    members / 4 + 1
}

/// How many COMMITs decide a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// More than half of the members (crash faults).
    Majority,
    /// More than two thirds of the members (Byzantine-tolerant setting).
    TwoThirds,
}

impl Quorum {
    /// COMMITs needed among `n` members.
    pub fn size(&self, n: usize) -> usize {
        match self {
            Quorum::Majority => n / 2 + 1,
            Quorum::TwoThirds => 2 * n / 3 + 1,
        }
    }
}

/// How an owner combines the contributions to one shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Token-weighted mean (DiLoCo).
    Mean,
    /// The leader leaves out contributors whose READY norm exceeds `factor` x the median norm;
    /// owners also drop shards whose norm exceeds their READY's claim. Then the mean.
    NormScreen {
        /// Allowed multiple of the median norm.
        factor: f32,
    },
    /// Coordinate-wise: drop the `trim` fraction of smallest and of largest values, then the
    /// token-weighted mean of the rest.
    TrimmedMean {
        /// Fraction trimmed from each end, in `[0, 0.5)`.
        trim: f32,
    },
}

/// Who may become a member of the run (run config `admission`). Founders are not checked
/// here: the node founds only with peers the policy lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Admission {
    /// Anyone (at most [`max_joins`] newcomers a round).
    #[default]
    Open,
    /// Only these keys (sorted).
    Allowlist(Vec<PeerKey>),
    /// These keys (sorted), and anyone whose JOIN carries an invitation signed by a member of
    /// the round.
    Invite(Vec<PeerKey>),
}

impl Admission {
    /// Whether `who`'s JOIN `join` may be admitted while `members` (sorted) are the round's
    /// members; the error says why not.
    pub fn admits(
        &self,
        run: Hash,
        who: PeerKey,
        join: &Join,
        members: &[PeerKey],
    ) -> Result<(), &'static str> {
        match self {
            Admission::Open => Ok(()),
            Admission::Allowlist(list) => match list.binary_search(&who) {
                Ok(_) => Ok(()),
                Err(_) => Err("JOIN from a key not on the run's allowlist"),
            },
            Admission::Invite(list) => {
                if list.binary_search(&who).is_ok() {
                    return Ok(());
                }
                match &join.invite {
                    None => Err("JOIN without an invitation"),
                    Some(inv) if members.binary_search(&inv.issuer).is_err() => {
                        Err("JOIN invited by a non-member")
                    }
                    Some(inv) if !inv.verify(run, who) => Err("JOIN with a forged invitation"),
                    Some(_) => Ok(()),
                }
            }
        }
    }

    /// Whether the policy names `who` (as a founder or a state donor): always under `open`.
    pub fn lists(&self, who: &PeerKey) -> bool {
        match self {
            Admission::Open => true,
            Admission::Allowlist(list) | Admission::Invite(list) => list.binary_search(who).is_ok(),
        }
    }
}

/// Run configuration: identical on every peer of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Run id.
    pub run: Hash,
    /// Number of parameters.
    pub len: usize,
    /// Outer-gradient codec.
    pub codec: Quantization,
    /// Upper bound on shards per round (the actual count is `min(this, |M|, blocks)`).
    pub max_shards: usize,
    /// Cap on a contribution's weight (H x local batch tokens).
    pub token_cap: u64,
    /// Largest outer-gradient norm a READY may claim: a READY claiming more (or a norm that is
    /// not a finite number ≥ 0) is refused, so that no claim can widen the owners' and the
    /// leader's norm bounds or the audit tolerance beyond what an honest member can produce.
    /// An honest member whose outer gradient is longer (it should not be, see the node's
    /// bound) scales it down to the cap. Default: no cap (`f32::MAX`).
    pub norm_cap: f32,
    /// Outer optimizer.
    pub outer: OuterConfig,
    /// Decision quorum.
    pub quorum: Quorum,
    /// Aggregation rule.
    pub rule: Rule,
    /// Closer waits this long after the first READY for the rest.
    pub straggler_timeout: Time,
    /// After CLOSE: owners aggregate by 40%, backups step in at 60%, the leader seals at 100%.
    pub agg_timeout: Time,
    /// A leader of ballot `b` starts `b * attempt_timeout` after the first READY if undecided.
    pub attempt_timeout: Time,
    /// Retry period for fetches, sync requests and JOINs.
    pub retry: Time,
    /// Whether this peer accepts inbound streams and can own shards.
    pub can_serve: bool,
    /// Members not heard from for this many rounds are dropped from the next member list.
    pub evict_after_rounds: u64,
    /// Envelopes whose gossip encoding exceeds this many bytes (capped at
    /// [`wire::MAX_GOSSIP_BYTES`]) are gossiped as an ANNOUNCE of their hash and fetched over a
    /// direct stream. Default: the gossip cap; the simulator lowers it to exercise the path.
    pub gossip_limit: usize,
    /// Who may become a member.
    pub admission: Admission,
    /// The key that may restart a round which lost its quorum with the members that
    /// survive (a RECONFIG, docs/PROTOCOL.md "Liveness"); `None`: nobody can, and a run that
    /// lost its quorum waits for its members to come back.
    pub operator: Option<PeerKey>,
}

impl Config {
    /// A config with the defaults used by the simulator and the node.
    pub fn new(run: Hash, len: usize) -> Self {
        Self {
            run,
            len,
            codec: Quantization::F32,
            max_shards: 256,
            token_cap: u64::MAX,
            norm_cap: f32::MAX,
            outer: OuterConfig::default(),
            quorum: Quorum::Majority,
            rule: Rule::Mean,
            straggler_timeout: 2_000,
            agg_timeout: 3_000,
            attempt_timeout: 10_000,
            retry: 1_000,
            can_serve: true,
            evict_after_rounds: 3,
            gossip_limit: wire::MAX_GOSSIP_BYTES,
            admission: Admission::Open,
            operator: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Invite;
    use ed25519_dalek::SigningKey;

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    #[test]
    fn admission_rules() {
        let run = Hash::of(b"run");
        let (m1, m2, stranger) = (key(1), key(2), key(9));
        let mut members = vec![PeerKey::of(&m1), PeerKey::of(&m2)];
        members.sort();
        let who = PeerKey::of(&stranger);
        let plain = Join::default();
        let invited = Join {
            invite: Some(Invite::sign(&m1, run, who)),
        };
        let by_outsider = Join {
            invite: Some(Invite::sign(&key(7), run, who)),
        };
        let for_other = Join {
            invite: Some(Invite::sign(&m1, run, PeerKey::of(&key(8)))),
        };
        let wrong_run = Join {
            invite: Some(Invite::sign(&m1, Hash::of(b"other"), who)),
        };

        assert_eq!(Admission::Open.admits(run, who, &plain, &members), Ok(()));
        assert!(Admission::Open.lists(&who));

        let allow = Admission::Allowlist(members.clone());
        assert!(allow.admits(run, who, &invited, &members).is_err());
        assert_eq!(allow.admits(run, members[0], &plain, &members), Ok(()));
        assert!(!allow.lists(&who) && allow.lists(&members[1]));

        let inv = Admission::Invite(members.clone());
        assert_eq!(inv.admits(run, members[1], &plain, &members), Ok(()));
        assert_eq!(
            inv.admits(run, who, &plain, &members),
            Err("JOIN without an invitation")
        );
        assert_eq!(inv.admits(run, who, &invited, &members), Ok(()));
        assert_eq!(
            inv.admits(run, who, &by_outsider, &members),
            Err("JOIN invited by a non-member")
        );
        for j in [for_other, wrong_run] {
            assert_eq!(
                inv.admits(run, who, &j, &members),
                Err("JOIN with a forged invitation")
            );
        }
        // An invitation counts only while its issuer is a member.
        assert_eq!(
            inv.admits(run, who, &invited, &members[1..]).is_ok(),
            members[1] == PeerKey::of(&m1)
        );
    }
}
