//! The DiLoCo averaging protocol: pure logic, no I/O.
//!
//! * [`codec`]: outer-gradient quantization (f32, f16, bf16, int8, fp4), top-k with error
//!   feedback, zstd, shards.
//! * [`wire`]: versioned protocol ids, signed bincode-2 envelopes, direct messages, frames.
//! * [`averaging`]: the sealed-round state machine (events in, actions out).
//! * [`outer`]: the Nesterov outer step, shared by every peer bit for bit.
//! * [`audit`]: random-projection audits of the owners' aggregates.
//! * [`sim`]: a seeded discrete-event simulator that runs many peers of [`averaging::State`].
//!
//! docs/PROTOCOL.md describes the protocol in prose.
pub mod audit;
pub mod averaging;
pub mod codec;
pub mod outer;
pub mod sim;
pub mod wire;
