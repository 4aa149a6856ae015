//! Fuzzes HELLO decoding (every node decodes every HELLO its run's topic carries).
#![no_main]
use diloco_protocol::wire::Hello;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::from_bytes(data) {
        let again = h.to_bytes().expect("a decoded HELLO encodes");
        assert_eq!(Hello::from_bytes(&again).ok(), Some(h));
    }
});
