//! The DiLoCo averaging protocol: pure logic, no I/O.
pub mod codec;
pub mod outer;
pub mod wire;
