//! Fault injection for adversarial tests over real sockets: a [`Tamper`] rewrites what a node
//! sends, answers direct messages in its place and injects raw bytes, so that a test can turn
//! one real node into a malicious member (`node/tests/adversary.rs`) while the honest peers
//! are unmodified `diloco-node` processes.
//!
//! `join` never installs one: [`super::JoinConfig::tamper`] is `None` there, and the only
//! cost for an honest node is one `Option` check per outgoing batch.

use diloco_protocol::averaging::{OutEvent, State};
use diloco_protocol::wire::{Direct, PeerKey};
use ed25519_dalek::SigningKey;
use std::sync::{Arc, Mutex};

/// What a tamper sees of the node.
pub struct View<'a> {
    /// The averaging state machine, once the node has one.
    pub state: Option<&'a State>,
    /// The node's signing key (to sign what it forges).
    pub key: &'a SigningKey,
}

/// Bytes sent as they are, bypassing the protocol's encoding.
#[derive(Debug, Clone)]
pub enum Raw {
    /// Published on the run's averaging topic, or with `hello` its HELLO topic.
    Gossip {
        /// The HELLO topic instead of the averaging one.
        hello: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Sent to `to` on the shard protocol, or with `sync` the sync protocol.
    Direct {
        /// Recipient.
        to: PeerKey,
        /// The bytes.
        data: Vec<u8>,
        /// On the sync protocol.
        sync: bool,
    },
}

/// A node's misbehaviour.
pub trait Tamper: Send {
    /// Rewrites one outgoing [`OutEvent::Gossip`] or [`OutEvent::Direct`]: what is returned
    /// is sent instead (the event itself to send it unchanged, nothing to withhold it).
    fn outgoing(&mut self, view: &View<'_>, out: OutEvent) -> Vec<OutEvent>;
    /// A direct message received from `from`: `Some(replies)` consumes it (the state machine
    /// never sees it) and sends the replies; `None` lets it through.
    fn incoming(&mut self, view: &View<'_>, from: PeerKey, msg: &Direct) -> Option<Vec<OutEvent>>;
    /// Called every second: raw bytes to send now.
    fn tick(&mut self, view: &View<'_>) -> Vec<Raw>;
}

/// A shared [`Tamper`], as [`super::JoinConfig`] holds it.
#[derive(Clone)]
pub struct TamperHook(pub Arc<Mutex<dyn Tamper>>);

impl TamperHook {
    /// Wraps `t`.
    pub fn new(t: impl Tamper + 'static) -> Self {
        TamperHook(Arc::new(Mutex::new(t)))
    }

    /// Runs `f` on the tamper (even if a panicking holder poisoned the lock).
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut dyn Tamper) -> R) -> R {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut *g)
    }
}

impl std::fmt::Debug for TamperHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TamperHook")
    }
}
