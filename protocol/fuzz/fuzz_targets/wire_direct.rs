//! Fuzzes direct-stream message decoding.
#![no_main]
use diloco_protocol::wire::Direct;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Direct::from_bytes(data);
});
