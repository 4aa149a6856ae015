//! Training, with no network: the model ([`model`]), flat parameter vectors and
//! initialisation ([`flat`]), data ([`data`]), device selection ([`backend`]), the native CPU
//! engine ([`native`]), the inner loop
//! and one round of it ([`inner`]), checkpoints ([`checkpoint`]), the trainer thread a node
//! runs beside its event loop ([`worker`]), plain training (`train`, [`plain`]), the
//! in-process DiLoCo / data-parallel simulator ([`simulate`]) and progress output
//! ([`progress`]).

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod flat;
pub mod inner;
pub mod model;
pub mod native;
pub mod plain;
pub mod progress;
pub mod simulate;
pub mod worker;
