//! diloco-node: a peer-to-peer DiLoCo training node.
//!
//! The library holds everything the binary glues together: the model ([`model`]), flat
//! parameter vectors ([`flat`]), data ([`data`]), the inner loop ([`trainer`]), the in-process
//! DiLoCo / data-parallel simulator ([`simulate`]), plain training with checkpoints ([`train`],
//! [`checkpoint`]), device selection ([`backend`]) and the command line ([`cli`]). Pure math the
//! network also needs (outer step, codec) lives in the `diloco-protocol` crate.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod flat;
pub mod model;
pub mod progress;
pub mod simulate;
pub mod train;
pub mod trainer;
