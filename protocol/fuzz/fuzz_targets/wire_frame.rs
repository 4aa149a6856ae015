//! Fuzzes the frame decoder the node reads every direct message with (fed in chunks whose
//! sizes come from the input), then envelope and direct-message decoding of each frame.
#![no_main]
use diloco_protocol::wire::{Direct, Envelope, FrameDecoder, MAX_GOSSIP_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, mut rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut d = FrameDecoder::new(MAX_GOSSIP_BYTES);
    while !rest.is_empty() {
        let n = chunk.min(rest.len());
        let mut piece = &rest[..n];
        rest = &rest[n..];
        while !piece.is_empty() {
            let Ok((used, frame)) = d.feed(piece) else {
                return;
            };
            assert!(used > 0 && used <= piece.len());
            piece = &piece[used..];
            if let Some(f) = frame {
                let _ = Envelope::from_bytes(&f);
                let _ = Direct::from_bytes(&f);
            }
        }
    }
});
