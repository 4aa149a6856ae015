//! The DiLoCo averaging protocol: pure logic, no I/O.
//!
//! * [`codec`]: outer-gradient quantization (f32, f16, bf16, int8, fp4), top-k with error
//!   feedback, zstd, shards.
//! * [`wire`]: versioned protocol ids, signed bincode-2 envelopes, direct messages, frames.
//!   `wire/`: `ids` (peer keys, hashes, signatures), `merkle`, `gossip` (message bodies,
//!   envelopes, announcements), `direct` (direct messages, decision proofs), `frame`,
//!   `admission` (the verifier, equivocation evidence).
//! * [`averaging`]: the sealed-round state machine (events in, actions out). `averaging/`:
//!   `config`, `events`, `ranking` (leaders, shard owners), `aggregate`, and the one `State`'s
//!   methods by phase: `intake` (READY, gossip admission), `reduce` (CLOSE, pushes, AGG),
//!   `audits`, `ballot` (SEAL, PREPARE / PROMISE, timers, retry), `commit` (apply, COMMIT,
//!   finalize), `direct` (direct-stream intake and serving), `sync` (catch-up, state transfer).
//! * [`discovery`]: who founds a run, which history wins when two meet, when a joiner gives
//!   up (a sans-IO state machine beside the averaging one, with its own simulator).
//! * [`outer`]: the Nesterov outer step, shared by every peer bit for bit.
//! * [`audit`]: random-projection audits of the owners' aggregates.
//! * `sim`: a seeded discrete-event simulator that
//!   runs many peers of [`averaging::State`]; `sim/`: `net` (the simulated network),
//!   `attacks` (malicious peers).
//!
//! docs/PROTOCOL.md describes the protocol in prose.
pub mod audit;
pub mod averaging;
pub mod codec;
pub mod discovery;
pub mod outer;
pub mod sim;
pub mod wire;
