//! Admission of gossip envelopes ([`Verifier`]: run, round, signer, signature) and evidence of
//! equivocation ([`conflicting`], [`check_evidence`]).

use std::collections::BTreeSet;

use super::{Body, Envelope, Evidence, Hash, PeerKey, WireError, JOIN_WINDOW};

/// Admission rules for gossip envelopes.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// This run's id.
    pub run: Hash,
    /// Keys banned on evidence.
    pub banned: BTreeSet<PeerKey>,
    /// How many rounds ahead of the receiver a message may be (it is then a cue to sync).
    pub max_ahead: u64,
}

impl Verifier {
    /// A verifier for `run`.
    pub fn new(run: Hash) -> Self {
        Self {
            run,
            banned: BTreeSet::new(),
            max_ahead: 1_000_000,
        }
    }

    /// Checks run, round, signer and signature. `members` is the receiver's member list for
    /// `current` (sorted); JOIN is the one body a non-member may sign, and messages for future
    /// rounds are checked for signature only (the receiver is behind and will sync).
    pub fn check(
        &self,
        env: &Envelope,
        current: u64,
        members: &[PeerKey],
        verify_sig: impl FnOnce(&Envelope) -> bool,
    ) -> Result<(), WireError> {
        if env.run != self.run {
            return Err(WireError::WrongRun);
        }
        // A JOIN only asks to be listed in a coming SEAL, so one from the last few rounds is
        // still good: a joiner that follows the group a round or two behind (its state
        // transfer and catch-up take time while the group moves on) still gets in.
        let recent_join =
            matches!(env.body, Body::Join(_)) && env.round.saturating_add(JOIN_WINDOW) >= current;
        if env.round < current && !recent_join {
            return Err(WireError::OldRound {
                got: env.round,
                current,
            });
        }
        if env.round > current.saturating_add(self.max_ahead) {
            return Err(WireError::FutureRound {
                got: env.round,
                current,
            });
        }
        if self.banned.contains(&env.signer) {
            return Err(WireError::Banned(env.signer));
        }
        let may_be_outsider = matches!(
            env.body,
            Body::Join(_) | Body::Evidence(_) | Body::Reconfig(_)
        ) || env.round > current;
        if !may_be_outsider && members.binary_search(&env.signer).is_err() {
            return Err(WireError::UnknownKey(env.signer));
        }
        if !verify_sig(env) {
            return Err(WireError::BadSignature(env.signer));
        }
        Ok(())
    }
}

/// Whether two envelopes from one signer conflict (equivocation): same run, round, chain and kind
/// (for AGG: same CLOSE and shard; for CLOSE, SEAL, ACCEPT and COMMIT: same ballot)
/// with different content. Both must carry valid signatures for this to count as evidence.
pub fn conflicting(a: &Envelope, b: &Envelope) -> bool {
    // Under another chain a message belongs to another instance of the round (another
    // history, or the round restarted by a RECONFIG): saying something else there is no lie.
    if a.signer != b.signer
        || a.run != b.run
        || a.round != b.round
        || a.chain != b.chain
        || a.body == b.body
    {
        return false;
    }
    match (&a.body, &b.body) {
        (Body::Ready(_), Body::Ready(_)) => true,
        (Body::Close(x), Body::Close(y)) => x.ballot == y.ballot,
        (Body::Agg(x), Body::Agg(y)) => x.close == y.close && x.shard == y.shard,
        (Body::Seal(x), Body::Seal(y)) => x.ballot == y.ballot,
        (Body::Accept(x), Body::Accept(y)) => x.ballot == y.ballot,
        (Body::Commit(x), Body::Commit(y)) => x.ballot == y.ballot,
        _ => false,
    }
}

/// Checks evidence: two validly signed conflicting envelopes by one signer.
pub fn check_evidence(e: &Evidence) -> Option<PeerKey> {
    (conflicting(&e.a, &e.b) && e.a.verify_signature() && e.b.verify_signature())
        .then_some(e.a.signer)
}
