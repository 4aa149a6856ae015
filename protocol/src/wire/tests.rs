//! Unit and property tests of the wire format.

use super::*;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i; 32])
}

fn ready(tokens: u64) -> Body {
    Body::Ready(Ready {
        tokens,
        shard_root: Hash::of(b"x"),
        norm_bits: 1.5f32.to_bits(),
        can_serve: true,
    })
}

fn sample_bodies() -> Vec<Body> {
    let close = Close {
        ballot: 2,
        contributors: vec![Contributor {
            peer: PeerKey::of(&key(1)),
            ready: Hash::of(b"r"),
            info: Ready {
                tokens: 5,
                shard_root: Hash::of(b"s"),
                norm_bits: 0,
                can_serve: false,
            },
            sig: Signature([3; 64]),
        }],
    };
    let seal = Seal {
        close: close.clone(),
        close_id: Hash::of(b"c"),
        shards: vec![
            None,
            Some(SealedShard {
                owner: PeerKey::of(&key(2)),
                data: Hash::of(b"d"),
                included: vec![1],
                weight: 5,
                sig: Signature([4; 64]),
            }),
        ],
        next_members: vec![PeerKey::of(&key(1))],
        joins: vec![],
    };
    vec![
        ready(7),
        Body::Close(close),
        Body::Agg(Agg {
            close: Hash::of(b"c"),
            shard: 3,
            included: vec![0xff],
            data: Hash::of(b"a"),
            weight: 9,
        }),
        Body::Prepare(4),
        Body::Promise(Promise {
            ballot: 4,
            prepared: Some(Certificate {
                ballot: 1,
                seal: seal.hash(),
                votes: vec![(PeerKey::of(&key(1)), Signature([7; 64]))],
            }),
        }),
        Body::Seal(Propose {
            ballot: 0,
            seal: seal.clone(),
            promises: vec![],
        }),
        Body::Seal(Propose {
            ballot: 2,
            seal,
            promises: vec![Envelope::sign(
                &key(1),
                Hash::of(b"run"),
                3,
                Hash::of(b"chain"),
                Body::Promise(Promise {
                    ballot: 2,
                    prepared: None,
                }),
            )],
        }),
        Body::Accept(Accept {
            ballot: 2,
            seal: Hash::of(b"s"),
        }),
        Body::Reconfig(Reconfig {
            members: vec![PeerKey::of(&key(1)), PeerKey::of(&key(2))],
        }),
        Body::Commit(Commit {
            ballot: 0,
            seal: Hash::of(b"s"),
            next_chain: Hash::of(b"n"),
            state: Hash::of(b"t"),
        }),
        Body::Join(Join::default()),
        Body::Join(Join {
            invite: Some(Invite::sign(
                &key(2),
                Hash::of(b"run"),
                PeerKey::of(&key(3)),
            )),
        }),
    ]
}

#[test]
fn protocol_ids_carry_the_version() {
    for id in [AVG_PROTOCOL, SHARD_PROTOCOL, SYNC_PROTOCOL] {
        assert!(
            id.starts_with("/diloco/") && id.ends_with(&format!("/{WIRE_VERSION}")),
            "{id}"
        );
    }
}

#[test]
fn every_body_roundtrips_signed() {
    let run = Hash::of(b"run");
    for body in sample_bodies() {
        let env = Envelope::sign(&key(1), run, 3, Hash::of(b"chain"), body);
        assert!(env.verify_signature());
        let bytes = env.to_bytes().unwrap();
        assert_eq!(Envelope::from_bytes(&bytes).unwrap(), env);
        let framed = frame(&bytes).unwrap();
        let (used, payload) = FrameDecoder::new(MAX_GOSSIP_BYTES).feed(&framed).unwrap();
        assert_eq!((payload.as_deref(), used), (Some(&bytes[..]), framed.len()));
    }
}

#[test]
fn admission_rules() {
    let run = Hash::of(b"run");
    let members = vec![PeerKey::of(&key(1))];
    let v = Verifier::new(run);
    let env = Envelope::sign(&key(1), run, 5, Hash::default(), ready(1));
    let check =
        |v: &Verifier, e: &Envelope, cur| v.check(e, cur, &members, Envelope::verify_signature);
    assert_eq!(check(&v, &env, 5), Ok(()));
    assert_eq!(
        check(&v, &env, 6),
        Err(WireError::OldRound { got: 5, current: 6 })
    );
    let other = Envelope::sign(&key(1), Hash::of(b"other"), 5, Hash::default(), ready(1));
    assert_eq!(check(&v, &other, 5), Err(WireError::WrongRun));
    let stranger = Envelope::sign(&key(9), run, 5, Hash::default(), ready(1));
    assert_eq!(
        check(&v, &stranger, 5),
        Err(WireError::UnknownKey(PeerKey::of(&key(9))))
    );
    let join = Envelope::sign(
        &key(9),
        run,
        5,
        Hash::default(),
        Body::Join(Join::default()),
    );
    assert_eq!(check(&v, &join, 5), Ok(()));
    let mut forged = env.clone();
    forged.body = ready(1_000_000);
    assert_eq!(
        check(&v, &forged, 5),
        Err(WireError::BadSignature(PeerKey::of(&key(1))))
    );
    let mut moved = env.clone();
    moved.round = 6; // replay into another round
    assert_eq!(
        check(&v, &moved, 6),
        Err(WireError::BadSignature(PeerKey::of(&key(1))))
    );
    let mut rechained = env.clone();
    rechained.chain = Hash::of(b"fork");
    assert!(!rechained.verify_signature());
    let mut banned = v.clone();
    banned.banned.insert(PeerKey::of(&key(1)));
    assert_eq!(
        check(&banned, &env, 5),
        Err(WireError::Banned(PeerKey::of(&key(1))))
    );
}

#[test]
fn equivocation_is_evidence() {
    let run = Hash::of(b"run");
    let a = Envelope::sign(&key(1), run, 2, Hash::default(), ready(1));
    let b = Envelope::sign(&key(1), run, 2, Hash::default(), ready(2));
    let ev = Evidence {
        a: Box::new(a.clone()),
        b: Box::new(b.clone()),
    };
    assert_eq!(check_evidence(&ev), Some(PeerKey::of(&key(1))));
    assert_eq!(
        check_evidence(&Evidence {
            a: Box::new(a.clone()),
            b: Box::new(a.clone())
        }),
        None
    );
    let c = Envelope::sign(&key(2), run, 2, Hash::default(), ready(2));
    assert_eq!(
        check_evidence(&Evidence {
            a: Box::new(a.clone()),
            b: Box::new(c)
        }),
        None
    );
    let mut forged = b.clone();
    forged.sig.0[0] ^= 1;
    assert_eq!(
        check_evidence(&Evidence {
            a: Box::new(a.clone()),
            b: Box::new(forged)
        }),
        None
    );
    // Under another chain the round is another instance (another history, or the round a
    // RECONFIG restarted): a second READY there is no equivocation.
    let restarted = Envelope::sign(&key(1), run, 2, Hash::of(b"new chain"), ready(2));
    assert_eq!(
        check_evidence(&Evidence {
            a: Box::new(a),
            b: Box::new(restarted)
        }),
        None
    );
}

fn big_close(n: usize) -> Close {
    let mut contributors: Vec<Contributor> = (0..n as u32)
        .map(|i| Contributor {
            peer: PeerKey(Hash::of(&i.to_le_bytes()).0),
            ready: Hash::of(&[i.to_le_bytes(), [1; 4]].concat()),
            info: Ready {
                tokens: 4096 + u64::from(i),
                shard_root: Hash::of(&[i.to_le_bytes(), [2; 4]].concat()),
                norm_bits: (0.5f32 + i as f32).to_bits(),
                can_serve: i % 3 != 0,
            },
            sig: Signature([5; 64]),
        })
        .collect();
    contributors.sort_by_key(|c| c.peer);
    Close {
        ballot: 0,
        contributors,
    }
}

#[test]
fn close_and_seal_with_1000_contributors_travel_by_announcement() {
    let run = Hash::of(b"run");
    let k7 = key(7);
    let close = big_close(1000);
    let members: Vec<PeerKey> = close.contributors.iter().map(|c| c.peer).collect();
    let seal = Seal {
        close: close.clone(),
        close_id: Hash::of(b"close"),
        shards: (0..256u32)
            .map(|s| {
                Some(SealedShard {
                    owner: members[s as usize],
                    data: Hash::of(&s.to_le_bytes()),
                    included: vec![0xff; 1000usize.div_ceil(8)],
                    weight: 4_000_000,
                    sig: Signature([6; 64]),
                })
            })
            .collect(),
        next_members: members,
        joins: vec![],
    };
    for body in [
        Body::Close(close),
        Body::Seal(Propose {
            ballot: 3,
            seal,
            promises: vec![],
        }),
    ] {
        let full = Envelope::sign(&k7, run, 9, Hash::of(b"chain"), body);
        // Too large for gossip, as it was before announcements.
        assert!(matches!(full.to_bytes(), Err(WireError::TooLarge { .. })));
        assert!(!full.fits_gossip(MAX_GOSSIP_BYTES));
        let (ann, bytes) = announce(&k7, &full).unwrap();
        assert!(bytes.len() > MAX_GOSSIP_BYTES && bytes.len() <= MAX_ANNOUNCED_BYTES);
        // The announcement is small and admissible like any envelope.
        let ann_bytes = ann.to_bytes().unwrap();
        assert!(ann_bytes.len() < 512, "{}", ann_bytes.len());
        let ann = Envelope::from_bytes(&ann_bytes).unwrap();
        assert!(ann.verify_signature());
        // The full envelope rides a direct stream.
        let reply = Direct::FullEnvelope { round: 9, bytes }.to_bytes().unwrap();
        assert!(reply.len() <= MAX_DIRECT_BYTES);
        let Direct::FullEnvelope { bytes, .. } = Direct::from_bytes(&reply).unwrap() else {
            panic!("variant")
        };
        assert_eq!(open_announced(&ann, &bytes).unwrap(), full);
        // Tampering with the bytes, the size or the signer is caught.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(open_announced(&ann, &bad), Err(WireError::AnnounceMismatch));
        assert_eq!(
            open_announced(&ann, &bytes[..bytes.len() - 1]),
            Err(WireError::AnnounceMismatch)
        );
        let (other_ann, _) = announce(
            &key(8),
            &Envelope::sign(&key(8), run, 9, Hash::of(b"chain"), full.body.clone()),
        )
        .unwrap();
        assert!(open_announced(&other_ann, &bytes).is_err());
        // A forged signature inside correctly hashed bytes is caught too.
        let mut forged = full.clone();
        forged.sig.0[0] ^= 1;
        let (ann2, bytes2) = announce(&k7, &forged).unwrap();
        assert_eq!(
            open_announced(&ann2, &bytes2),
            Err(WireError::BadSignature(PeerKey::of(&k7)))
        );
    }
}

#[test]
fn seal_hash_covers_large_seals() {
    let a = Seal {
        close: big_close(1000),
        close_id: Hash::of(b"c"),
        shards: vec![None],
        next_members: vec![],
        joins: vec![],
    };
    let mut b = a.clone();
    b.close_id = Hash::of(b"d");
    assert_ne!(a.hash(), b.hash());
    assert_ne!(a.hash(), Hash::of(&[]));
}

#[test]
fn huge_vec_claim_is_refused() {
    // A PushShard claiming a 2^40-byte data vector in a few bytes.
    let mut bytes = vec![0u8]; // variant 0
    bytes.push(1); // round
    bytes.extend_from_slice(&[0; 32]); // close
    bytes.push(0); // shard
    bytes.push(253); // u64 varint follows
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(Direct::from_bytes(&bytes).is_err());
}

#[test]
fn merkle_proofs() {
    for n in 1..20usize {
        let leaves: Vec<Hash> = (0..n).map(|i| Hash::of(&[i as u8])).collect();
        let root = merkle_root(&leaves);
        for i in 0..n {
            let p = merkle_proof(&leaves, i);
            assert!(merkle_verify(root, leaves[i], i, &p));
            assert!(!merkle_verify(root, Hash::of(b"other"), i, &p));
            if n > 1 {
                assert!(!merkle_verify(root, leaves[i], (i + 1) % n, &p));
            }
        }
    }
}

proptest! {
    #[test]
    fn envelope_roundtrip(i in 0usize..8, round in any::<u64>(), seed in any::<u8>()) {
        let body = sample_bodies()[i].clone();
        let env = Envelope::sign(&key(seed), Hash::of(&[seed]), round, Hash::of(b"c"), body);
        let bytes = env.to_bytes().unwrap();
        prop_assert!(bytes.len() <= MAX_GOSSIP_BYTES);
        let back = Envelope::from_bytes(&bytes).unwrap();
        prop_assert!(back.verify_signature());
        prop_assert_eq!(back, env);
    }

    #[test]
    fn gossip_garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(env) = Envelope::from_bytes(&bytes) {
            // Random bytes that happen to parse are never validly signed.
            prop_assert!(!env.verify_signature());
        }
    }

    #[test]
    fn direct_garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Direct::from_bytes(&bytes);
    }

    #[test]
    fn truncated_envelope_is_an_error(i in 0usize..8, cut in any::<prop::sample::Index>()) {
        let env = Envelope::sign(&key(3), Hash::of(b"r"), 1, Hash::of(b"c"), sample_bodies()[i].clone());
        let bytes = env.to_bytes().unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(Envelope::from_bytes(&bytes[..cut]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert_eq!(Envelope::from_bytes(&longer), Err(WireError::Trailing(1)));
    }

    #[test]
    fn direct_roundtrip(round in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..300), shard in any::<u32>()) {
        let msgs = vec![
            Direct::PushShard { round, close: Hash::of(b"c"), shard, data: data.clone(), proof: vec![Hash::of(b"p")] },
            Direct::Data { round, hash: Hash::of(&data), data: data.clone() },
            Direct::Fetch { round, hash: Hash::of(&data) },
            Direct::SyncRequest { from: round },
            Direct::NotFound,
        ];
        for m in msgs {
            let bytes = m.to_bytes().unwrap();
            prop_assert_eq!(Direct::from_bytes(&bytes).unwrap(), m);
            if !bytes.is_empty() {
                prop_assert!(Direct::from_bytes(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }
}

#[test]
fn an_invite_verifies_only_for_its_run_and_invitee_and_survives_its_token() {
    let run = Hash::of(b"run");
    let invitee = PeerKey::of(&key(3));
    let inv = Invite::sign(&key(2), run, invitee);
    assert!(inv.verify(run, invitee));
    assert!(!inv.verify(Hash::of(b"other run"), invitee));
    assert!(!inv.verify(run, PeerKey::of(&key(4))));
    let back = Invite::from_token(&inv.to_token()).unwrap();
    assert_eq!(back, inv);
    assert!(Invite::from_token("abc").is_err());
    assert!(Invite::from_token(&"00".repeat(95)).is_err());
    let mut forged = inv;
    forged.issuer = PeerKey::of(&key(5));
    assert!(!forged.verify(run, invitee));
}

proptest! {
    #[test]
    fn invite_tokens_never_panic(s in "[0-9a-f]{0,200}") {
        let _ = Invite::from_token(&s);
    }
}
