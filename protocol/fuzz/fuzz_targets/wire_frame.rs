//! Fuzzes the length-prefixed frame splitter followed by envelope decoding.
#![no_main]
use diloco_protocol::wire::{unframe, Envelope, MAX_GOSSIP_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((payload, used))) = unframe(rest, MAX_GOSSIP_BYTES) {
        let _ = Envelope::from_bytes(payload);
        rest = &rest[used..];
    }
});
