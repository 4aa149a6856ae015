//! What goes in and out of the state machine: [`InEvent`]s, [`OutEvent`]s, the [`Timer`]s it
//! asks for, and the [`Reject`] reasons it reports for dropped messages.

use std::sync::Arc;

use thiserror::Error;

use crate::codec::CodecError;
use crate::wire::{Direct, Envelope, Hash, PeerKey, WireError};

/// Milliseconds on the caller's clock.
pub type Time = u64;

/// Timers the state machine asks for; the caller hands them back as [`InEvent::Timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The closer's straggler deadline.
    Straggler(u64),
    /// Failover: start ballot `.1` of round `.0`.
    Attempt(u64, u32),
    /// An owner (or backup) aggregates what it has.
    OwnerDeadline(u64),
    /// A backup checks for missing AGGs.
    BackupCheck(u64),
    /// The leader of ballot `.1` seals.
    SealDeadline(u64, u32),
    /// Periodic retries (fetch, sync, join).
    Retry(u64),
    /// A contributor gossips the audit projections it has not sent yet.
    AuditFlush(u64),
}

/// Inputs.
#[derive(Debug, Clone)]
pub enum InEvent {
    /// Local training for `round` finished with this outer gradient and token count.
    Trained {
        /// Round trained for.
        round: u64,
        /// `theta_g - theta_i`.
        delta: Vec<f32>,
        /// Tokens processed.
        tokens: u64,
    },
    /// A gossip message. `verified: true` means the caller already checked its signature
    /// (e.g. once for all receivers); otherwise the state machine does.
    Gossip {
        /// The envelope.
        env: Arc<Envelope>,
        /// Signature already checked.
        verified: bool,
    },
    /// A direct message from an authenticated peer.
    Direct {
        /// Transport-authenticated sender.
        from: PeerKey,
        /// The message.
        msg: Arc<Direct>,
    },
    /// A timer fired.
    Timer(Timer),
    /// A peer became reachable (joiners ask it for state).
    Contact(PeerKey),
}

/// Why an incoming message was dropped.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Reject {
    /// Failed admission (run, round, signer, signature).
    #[error("{0}")]
    Wire(#[from] WireError),
    /// Payload did not decode.
    #[error("payload: {0}")]
    Codec(#[from] CodecError),
    /// A payload's length does not match its shard.
    #[error("wrong length {got}, expected {expected}")]
    WrongLength {
        /// Length received.
        got: usize,
        /// Length required.
        expected: usize,
    },
    /// A shard is not under the contributor's Merkle root.
    #[error("shard not under the READY's Merkle root")]
    BadProof,
    /// A payload's norm exceeds what its signed claims allow.
    #[error("norm {got} exceeds the bound {bound}")]
    NormTooLarge {
        /// Measured norm.
        got: f32,
        /// Allowed norm.
        bound: f32,
    },
    /// A payload does not match the hash it was announced with.
    #[error("payload hash mismatch")]
    HashMismatch,
    /// The sender has no right to send this message (not the leader, not the owner, ...).
    #[error("{0} not allowed from this sender")]
    NotAllowed(&'static str),
    /// The message is internally inconsistent.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A PREPARE or SEAL under a ballot no honest leader can have reached yet.
    #[error("ballot {ballot} is beyond {bound}, the highest accepted now (ballots advance one per attempt_timeout)")]
    BallotAhead {
        /// The ballot received.
        ballot: u32,
        /// The highest ballot this peer accepts now.
        bound: u32,
    },
    /// The sender signed two conflicting messages.
    #[error("equivocation")]
    Equivocation,
    /// A decision proof or state did not verify.
    #[error("bad proof: {0}")]
    BadDecision(&'static str),
    /// A RECONFIG that may not restart this round.
    #[error("reconfiguration refused: {0}")]
    Reconfig(&'static str),
    /// An aggregate's random projections disagree with its contributors' AUDITs.
    #[error(
        "aggregate fails its audit: projection off by {deviation:e} (tolerance {tolerance:e})"
    )]
    AuditFailed {
        /// Largest deviation over the projections.
        deviation: f64,
        /// Allowed deviation.
        tolerance: f64,
    },
}

impl Reject {
    /// A short, stable label of the reason (for metrics labels and log fields).
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Wire(w) => w.label(),
            Reject::Codec(_) => "codec",
            Reject::WrongLength { .. } => "wrong_length",
            Reject::BadProof => "bad_proof",
            Reject::NormTooLarge { .. } => "norm_too_large",
            Reject::HashMismatch => "hash_mismatch",
            Reject::NotAllowed(_) => "not_allowed",
            Reject::Malformed(_) => "malformed",
            Reject::BallotAhead { .. } => "ballot_ahead",
            Reject::Equivocation => "equivocation",
            Reject::BadDecision(_) => "bad_decision",
            Reject::AuditFailed { .. } => "audit_failed",
            Reject::Reconfig(_) => "reconfig",
        }
    }
}

/// Outputs.
#[derive(Debug, Clone)]
pub enum OutEvent {
    /// Gossip this signed message to the run's topic.
    Gossip(Arc<Envelope>),
    /// Send this message on a direct stream.
    Direct {
        /// Recipient.
        to: PeerKey,
        /// The message.
        msg: Arc<Direct>,
    },
    /// Hand back `InEvent::Timer(timer)` at time `at`.
    SetTimer {
        /// When.
        at: Time,
        /// Which.
        timer: Timer,
    },
    /// Start training for `round` from [`State::theta`](super::State::theta); answer with
    /// `InEvent::Trained`.
    Train {
        /// The round to train for.
        round: u64,
    },
    /// Round `round` was decided; the state is now at `round + 1`.
    Decided {
        /// Decided round.
        round: u64,
        /// Hash of the SEAL.
        seal: Hash,
        /// Hash of theta_g and momentum after the round.
        state: Hash,
    },
    /// The operator's RECONFIG restarted round `round` with `members` under `chain`: a node
    /// persists both (its checkpoint's chain and member list) before it trains again.
    Reconfigured {
        /// The round, still undecided.
        round: u64,
        /// The round's new chain.
        chain: Hash,
        /// The members it restarts with.
        members: Vec<PeerKey>,
    },
    /// A message was dropped.
    Rejected {
        /// Who sent (or signed) it.
        from: PeerKey,
        /// Its kind.
        kind: &'static str,
        /// Why.
        reason: Reject,
    },
    /// `peer` was banned on evidence.
    Banned {
        /// The banned peer.
        peer: PeerKey,
    },
}
