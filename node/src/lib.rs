//! diloco-node: a peer-to-peer DiLoCo training node.
//!
//! The library holds everything the binary glues together: the model ([`model`]), flat
//! parameter vectors ([`flat`]), data ([`data`]), the inner loop ([`trainer`]), the in-process
//! DiLoCo / data-parallel simulator ([`simulate`]), plain training with checkpoints ([`train`],
//! [`checkpoint`]), device selection ([`backend`]) and the command line ([`cli`]); on the
//! network, the libp2p swarm ([`net`]), the run definition ([`runconfig`]), the node's event
//! loop ([`join`]) and its HTTP status page ([`status`]). Pure math and the averaging protocol
//! live in the `diloco-protocol` crate.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod flat;
pub mod join;
pub mod model;
pub mod net;
pub mod progress;
pub mod runconfig;
pub mod simulate;
pub mod status;
pub mod train;
pub mod trainer;
