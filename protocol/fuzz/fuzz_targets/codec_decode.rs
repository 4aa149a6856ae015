//! Fuzzes the outer-gradient decoder: any bytes must give `Ok` (finite, within the limit) or `Err`.
#![no_main]
use diloco_protocol::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = codec::decode(data, 1 << 20) {
        assert!(v.len() <= 1 << 20);
        assert!(v.iter().all(|x| x.is_finite()));
    }
});
