//! diloco-node: a peer-to-peer DiLoCo training node.
//!
//! Three folders and some glue:
//! * [`train`]: the model, flat parameter vectors, data, devices, the inner loop, evaluation,
//!   checkpoints, the trainer worker thread, and the `train` and `simulate` commands. It knows
//!   no network.
//! * [`net`]: the libp2p swarm task and the typed [`net::Client`] the rest talks to it
//!   through. It knows no model.
//! * [`driver`]: `join`, the only place where training, the averaging protocol and the network
//!   meet: the node's event loop, timers, vote record, restore, shutdown and its HTTP status
//!   page.
//!
//! Glue: the command line ([`cli`]), the run definition every peer of a run shares
//! ([`runconfig`]), `demo` ([`demo`]: a bootstrap peer and N nodes as child processes on
//! loopback) and the operator's reconfiguration of a stalled run ([`operator`]). The averaging protocol (pure logic, no I/O) is the `diloco-protocol` crate;
//! the network's conventions shared with the bootstrap peer are `diloco-p2p`.

pub mod cli;
pub mod demo;
pub mod driver;
pub mod net;
pub mod operator;
pub mod runconfig;
pub mod study;
pub mod train;
