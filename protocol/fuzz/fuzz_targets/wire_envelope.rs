//! Fuzzes gossip envelope decoding and signature checking.
#![no_main]
use diloco_protocol::wire::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::from_bytes(data) {
        let _ = env.verify_signature();
        let _ = env.id();
    }
});
