//! Fuzzes announced-envelope decoding: `Envelope::from_full_bytes` and `wire::open_announced`
//! against an announcement of the same bytes (so the hash and size checks pass and the decoder
//! and signature checks run on arbitrary input).
#![no_main]
use diloco_protocol::wire::{self, Announce, Body, Envelope, Hash, PeerKey, Signature, WIRE_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::from_full_bytes(data);
    // open_announced trusts the (already admitted) announcement; its signature is not needed.
    let ann = Envelope {
        version: WIRE_VERSION,
        signer: PeerKey([7; 32]),
        run: Hash::default(),
        round: 0,
        chain: Hash::default(),
        body: Body::Announce(Announce {
            kind: 1,
            hash: Hash::of(data),
            size: data.len() as u64,
        }),
        sig: Signature([0; 64]),
    };
    let _ = wire::open_announced(&ann, data);
});
