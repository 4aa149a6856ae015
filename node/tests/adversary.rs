//! A malicious member over real sockets. Three honest `diloco-node join` processes and a
//! bootstrap process run on loopback; a fourth node, in this test process, joins the run as a
//! member like any other (the real driver, network and protocol code) with a [`Tamper`] that
//! turns it hostile. Once admitted it goes through its attacks one after another:
//!
//! | phase | what it sends | what the honest nodes must count |
//! |---|---|---|
//! | forged | its own envelopes under another member's key, and with a byte flipped | `bad_signature` (or a malformed envelope) |
//! | replayed | its envelopes of earlier rounds again | `old_round` |
//! | oversized | a 4 KB HELLO, an averaging message over the topic's limit, 3 MiB direct frames | `gossip: too_large`, `direct: bad_frame` |
//! | nan | its READY claiming a NaN norm | `READY: norm_too_large` |
//! | lying aggregate | as a shard owner, the negated aggregate under a re-signed AGG, served on request | `audit_failed` or `hash_mismatch` |
//! | wrong run | its envelopes re-signed for another run id | `wrong_run` |
//! | fake HELLO | a HELLO claiming 1,000 members 50 rounds ahead under another founder, answering the probes with a proof of the run's own history | `SYNC: bad_decision`; nobody abandons |
//! | JOIN flood | 40 JOINs from fresh keys | JOINs refused by admission |
//! | stale | envelopes of an old round signed afresh | `old_round` |
//! | reconfig | a RECONFIG of the current round, signed with its own key, keeping only itself (a takeover: the run has no operator) | `RECONFIG: reconfig` |
//!
//! Throughout, the honest replicas keep deciding rounds and hold one global hash, nobody
//! abandons the run's history, every rejection is logged ("message rejected" with kind and
//! reason) and counted in `/status` and in `/metrics` as `diloco_rejections_total{kind,
//! reason}`. Run it alone with `cargo test --release --workspace adversary`.

mod common;

use common::{http_get, status, Net};
use diloco_node::driver::status::{Shared, Status};
use diloco_node::driver::tamper::{Raw, Tamper, TamperHook, View};
use diloco_node::driver::{self, JoinConfig};
use diloco_node::net::NetStats;
use diloco_node::runconfig::RunConfig;
use diloco_node::train::backend::{self, BackendChoice};
use diloco_node::train::data::{Corpus, DataSpec};
use diloco_p2p::keys::Identity;
use diloco_protocol::averaging::{self, OutEvent};
use diloco_protocol::codec;
use diloco_protocol::wire::{
    Body, Direct, Envelope, Hash, Hello, Join, PeerKey, Reconfig, HELLO_VERSION, MAX_GOSSIP_BYTES,
};
use ed25519_dalek::SigningKey;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The attacks, in order (`member`: behaving until admitted; `done`: behaving again).
const PHASES: [&str; 12] = [
    "member",
    "forged",
    "oversized",
    "nan",
    "lying_aggregate",
    "wrong_run",
    "fake_hello",
    "join_flood",
    "stale",
    "reconfig",
    "replayed",
    "done",
];

/// Gossipsub drops exact copies of a message it saw within this long (libp2p's default
/// duplicate cache), before the node sees them: replays must be older to reach the protocol.
const DUPLICATE_CACHE: Duration = Duration::from_secs(60);

/// Ticks (seconds) an attack is repeated at most while no honest node reports refusing it
/// (then the test fails on the missing rejection).
const PHASE_TICKS: u32 = 90;

/// What the adversary did, for the test to read.
#[derive(Debug, Default)]
struct Progress {
    phase: usize,
    /// Round the node was in when each phase started.
    started: Vec<(String, u64)>,
    lies: usize,
    nan_readies: usize,
    probes_answered: usize,
    sent: BTreeMap<&'static str, usize>,
    /// Phases whose rejection the test has seen at an honest node.
    confirmed: std::collections::BTreeSet<&'static str>,
}

struct Adversary {
    progress: Arc<Mutex<Progress>>,
    ticks: u32,
    /// Its own envelopes as sent, with when, newest last.
    own: VecDeque<(Instant, Envelope)>,
    /// Payloads of its consistent lies (re-signed AGGs), by hash.
    fake: HashMap<Hash, Vec<u8>>,
    /// Honest AGGs whose payload it serves corrupted.
    corrupt: std::collections::HashSet<Hash>,
}

impl Adversary {
    fn phase(&self) -> &'static str {
        PHASES[self.progress.lock().unwrap().phase]
    }

    fn count(&self, what: &'static str, n: usize) {
        *self.progress.lock().unwrap().sent.entry(what).or_default() += n;
    }

    fn next_phase(&mut self, round: u64) {
        let mut p = self.progress.lock().unwrap();
        if p.phase + 1 < PHASES.len() {
            p.phase += 1;
            let name = PHASES[p.phase].to_string();
            p.started.push((name, round));
        }
        self.ticks = 0;
    }

    /// Every other AGG: the negated aggregate under a re-signed AGG (what `LyingOwner` does in
    /// the simulator); the others stay as signed, but their payload is served corrupted.
    fn lie(&mut self, st: &averaging::State, key: &SigningKey, env: &Envelope) -> Option<Envelope> {
        let Body::Agg(a) = &env.body else { return None };
        if self.progress.lock().unwrap().lies % 2 == 1 {
            self.corrupt.insert(a.data);
            self.progress.lock().unwrap().lies += 1;
            return None;
        }
        let k = averaging::shard_count(st.config(), st.members().len());
        let range = codec::shards(st.config().len, k)
            .get(a.shard as usize)?
            .clone();
        let v = codec::decode(st.payload(&a.data)?, range.len()).ok()?;
        let lie: Vec<f32> = v.iter().map(|x| -x - 0.5).collect();
        let bytes = codec::encode(st.config().codec, &lie);
        let mut a = a.clone();
        a.data = Hash::of(&bytes);
        self.fake.insert(a.data, bytes);
        self.progress.lock().unwrap().lies += 1;
        Some(Envelope::sign(
            key,
            env.run,
            env.round,
            env.chain,
            Body::Agg(a),
        ))
    }
}

fn gossip(env: &Envelope) -> Raw {
    Raw::Gossip {
        hello: false,
        data: env.to_bytes().unwrap(),
    }
}

impl Tamper for Adversary {
    fn outgoing(&mut self, view: &View<'_>, out: OutEvent) -> Vec<OutEvent> {
        let OutEvent::Gossip(env) = &out else {
            return vec![out];
        };
        let mut env = (**env).clone();
        if let Some(st) = view.state {
            match (self.phase(), &env.body) {
                ("nan", Body::Ready(r)) => {
                    let mut r = r.clone();
                    r.norm_bits = f32::NAN.to_bits();
                    env = Envelope::sign(view.key, env.run, env.round, env.chain, Body::Ready(r));
                    self.progress.lock().unwrap().nan_readies += 1;
                }
                ("lying_aggregate", Body::Agg(_)) => {
                    if let Some(l) = self.lie(st, view.key, &env) {
                        env = l;
                    }
                }
                _ => {}
            }
        }
        self.own.push_back((Instant::now(), env.clone()));
        if self.own.len() > 4096 {
            self.own.pop_front();
        }
        vec![OutEvent::Gossip(Arc::new(env))]
    }

    fn incoming(&mut self, view: &View<'_>, from: PeerKey, msg: &Direct) -> Option<Vec<OutEvent>> {
        let reply = |msg: Direct| {
            Some(vec![OutEvent::Direct {
                to: from,
                msg: Arc::new(msg),
            }])
        };
        match msg {
            Direct::Fetch { round, hash } if self.fake.contains_key(hash) => reply(Direct::Data {
                round: *round,
                hash: *hash,
                data: self.fake[hash].clone(),
            }),
            Direct::Fetch { round, hash } if self.corrupt.contains(hash) => {
                let mut data = view.state?.payload(hash)?.to_vec();
                let k = data.len() / 2;
                data[k] ^= 0x11;
                reply(Direct::Data {
                    round: *round,
                    hash: *hash,
                    data,
                })
            }
            // A probe of the history its fake HELLO claims: it has none, so it answers with its
            // latest decision of the run's own history (as if that were its other founder's).
            Direct::SyncRequest { from: r } if self.phase() == "fake_hello" => {
                let st = view.state?;
                let proofs: Vec<_> = st
                    .decisions()
                    .filter(|p| p.seal.round <= *r)
                    .last()
                    .cloned()
                    .into_iter()
                    .collect();
                self.progress.lock().unwrap().probes_answered += 1;
                reply(Direct::SyncProofs(proofs))
            }
            _ => None,
        }
    }

    fn tick(&mut self, view: &View<'_>) -> Vec<Raw> {
        let Some(st) = view.state else {
            return Vec::new();
        };
        self.ticks += 1;
        let me = PeerKey::of(view.key);
        let others: Vec<PeerKey> = st.members().iter().copied().filter(|m| *m != me).collect();
        let recent: Vec<Envelope> = self
            .own
            .iter()
            .rev()
            .take(4)
            .map(|(_, e)| e.clone())
            .collect();
        // Each attack is repeated every other tick until the honest nodes were seen to refuse it.
        let first = self.ticks % 2 == 1;
        let mut out = Vec::new();
        match self.phase() {
            "member" => {
                if !st.is_member() {
                    self.ticks = 0;
                } else if self.ticks >= 3 && !self.own.is_empty() {
                    self.next_phase(st.round());
                }
                return out;
            }
            "forged" if first => {
                // Its recent bodies in the next round (messages of a round behind are dropped
                // unread as late; ahead, every signature is checked).
                for e in &recent {
                    let next =
                        Envelope::sign(view.key, e.run, st.round() + 1, st.chain(), e.body.clone());
                    if let Some(victim) = others.first() {
                        let mut f = next.clone();
                        f.signer = *victim;
                        out.push(gossip(&f));
                    }
                    let mut bytes = next.to_bytes().unwrap();
                    let k = bytes.len() - 10;
                    bytes[k] ^= 0x5a;
                    out.push(Raw::Gossip {
                        hello: false,
                        data: bytes,
                    });
                }
                self.count("forged", out.len());
            }
            "replayed" => {
                // Exact copies of its envelopes sent more than the duplicate cache ago (and of
                // a round at least two behind, which no node takes as late).
                let old: Vec<Raw> = self
                    .own
                    .iter()
                    .filter(|(t, e)| {
                        t.elapsed() > DUPLICATE_CACHE + Duration::from_secs(5)
                            && e.round + 2 <= st.round()
                    })
                    .take(16)
                    .map(|(_, e)| gossip(e))
                    .collect();
                if old.is_empty() {
                    return out; // wait for envelopes that old
                }
                let n = old.len();
                self.own.drain(..n.min(self.own.len()));
                out.extend(old);
                self.count("replayed", n);
            }
            "oversized" if first => {
                out.push(Raw::Gossip {
                    hello: true,
                    data: vec![7; 4_000],
                });
                out.push(Raw::Gossip {
                    hello: false,
                    data: vec![7; MAX_GOSSIP_BYTES + 1_000],
                });
                for m in &others {
                    out.push(Raw::Direct {
                        to: *m,
                        data: vec![0xab; 3 << 20],
                        sync: false,
                    });
                }
                self.count("oversized", out.len());
            }
            "nan" => {}             // its READYs are rewritten (see `outgoing`)
            "lying_aggregate" => {} // its AGGs are rewritten (see `outgoing`)
            "wrong_run" if first => {
                for e in &recent {
                    let f = Envelope::sign(
                        view.key,
                        Hash::of(b"another run"),
                        e.round,
                        e.chain,
                        e.body.clone(),
                    );
                    out.push(gossip(&f));
                }
                self.count("wrong_run", out.len());
            }
            "fake_hello" => {
                let h = Hello {
                    version: HELLO_VERSION,
                    peer: me.0,
                    seq: u64::MAX / 2 + u64::from(self.ticks),
                    synced: true,
                    round: st.round() + 50,
                    members: 1_000,
                    founder: [1; 32],
                };
                out.push(Raw::Gossip {
                    hello: true,
                    data: h.to_bytes().unwrap(),
                });
                self.count("fake_hello", 1);
            }
            "join_flood" if first => {
                for i in 0..40u8 {
                    let fresh = SigningKey::from_bytes(&[i.wrapping_add(100); 32]);
                    let j = Envelope::sign(
                        &fresh,
                        st.config().run,
                        st.round(),
                        st.chain(),
                        Body::Join(Join { invite: None }),
                    );
                    out.push(gossip(&j));
                }
                self.count("join_flood", out.len());
            }
            "reconfig" if first => {
                let rc = Envelope::sign(
                    view.key,
                    st.config().run,
                    st.round(),
                    st.chain(),
                    Body::Reconfig(Reconfig { members: vec![me] }),
                );
                out.push(gossip(&rc));
                self.count("reconfig", 1);
            }
            "stale" if first => {
                // New messages for an old round (READYs with another token count).
                for (_, e) in self
                    .own
                    .iter()
                    .filter(|(_, e)| e.round + 3 <= st.round())
                    .take(32)
                {
                    let Body::Ready(r) = &e.body else { continue };
                    let mut r = r.clone();
                    r.tokens += 1;
                    let f = Envelope::sign(view.key, e.run, e.round, e.chain, Body::Ready(r));
                    out.push(gossip(&f));
                }
                self.count("stale", out.len());
            }
            _ => {}
        }
        // A phase counts once it did what it is about and an honest node refused it (some
        // rejections also happen naturally, e.g. honest messages two rounds late).
        let confirmed = {
            let p = self.progress.lock().unwrap();
            let phase = PHASES[p.phase];
            let done = match phase {
                "nan" => p.nan_readies > 0,
                "lying_aggregate" => p.lies > 0,
                _ => p.sent.get(phase).is_some_and(|n| *n > 0),
            };
            done && p.confirmed.contains(phase)
        };
        if self.phase() != "done" && ((confirmed && self.ticks >= 2) || self.ticks >= PHASE_TICKS) {
            self.next_phase(st.round());
        }
        out
    }
}

/// The honest nodes' rejections, summed: "KIND: reason" → count.
fn rejections(addrs: &[SocketAddr]) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for s in addrs.iter().filter_map(|a| status(*a)) {
        if let Some(m) = s["rejections"].as_object() {
            for (k, v) in m {
                *seen.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
    }
    seen
}

/// The attack phases whose refusal shows in `seen`, with what shows it.
fn refused_phases(seen: &BTreeMap<String, u64>) -> Vec<&'static str> {
    let has = |reason: &str| seen.keys().any(|k| k.ends_with(&format!(": {reason}")));
    let key = |k: &str| seen.contains_key(k);
    let old_non_ready = seen
        .keys()
        .any(|k| k.ends_with(": old_round") && !k.starts_with("READY"));
    [
        ("forged", has("bad_signature")),
        (
            "oversized",
            key("gossip: too_large") && key("direct: bad_frame"),
        ),
        ("nan", key("READY: norm_too_large")),
        (
            "lying_aggregate",
            has("audit_failed") || key("DATA: hash_mismatch") || key("AGG: norm_too_large"),
        ),
        ("wrong_run", has("wrong_run")),
        ("fake_hello", key("SYNC: bad_decision")),
        ("join_flood", key("JOIN: not_allowed")),
        ("stale", key("READY: old_round")),
        ("reconfig", key("RECONFIG: reconfig")),
        ("replayed", old_non_ready),
    ]
    .into_iter()
    .filter(|(_, ok)| *ok)
    .map(|(p, _)| p)
    .collect()
}

/// Rounds and global hashes of the honest nodes.
fn rounds_and_hashes(addrs: &[SocketAddr]) -> Vec<(u64, String)> {
    addrs
        .iter()
        .map(|a| {
            status(*a)
                .map(|v| {
                    (
                        v["round"].as_u64().unwrap_or(0),
                        v["global_hash"].as_str().unwrap_or("").to_string(),
                    )
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Waits until every honest node is at one round ≥ `min_round` with one global hash (the
/// group may include the adversary); returns the round.
fn wait_identical(net: &Net, addrs: &[SocketAddr], min_round: u64, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    let mut last = Vec::new();
    while Instant::now() < end {
        last = rounds_and_hashes(addrs);
        let (r, h) = &last[0];
        if *r >= min_round && !h.is_empty() && last.iter().all(|x| x == &last[0]) {
            return *r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "honest nodes not identical at a round >= {min_round} within {timeout:?}: {last:?}\n{}",
        net.logs()
    );
}

#[test]
fn adversary_member_is_refused_and_honest_replicas_stay_identical() {
    // Synthetic rounds (no model): the protocol runs at full speed, a round every second or so.
    let run_json = r#"{"model":"tiny","inner_steps":1,"batch":1,"seq":8,"quantize":"int8",
        "synthetic_params":20000,"synthetic_train_ms":300,"straggler_timeout_ms":1500,
        "agg_timeout_ms":1500,"attempt_timeout_ms":4000,"retry_ms":500,"rounds":100000}"#;
    let mut net = Net::start(run_json);
    let honest = [
        net.start_node("a"),
        net.start_node("b"),
        net.start_node("c"),
    ];
    let r0 = wait_identical(&net, &honest, 3, Duration::from_secs(120));
    println!("honest nodes agree at round {r0}");

    // The adversary: the real node, in this process, with the tamper.
    let progress = Arc::new(Mutex::new(Progress::default()));
    let corpus = Arc::new(
        Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..DataSpec::default()
        })
        .unwrap(),
    );
    let rc = RunConfig::load(&net.dir.path().join("run.json")).unwrap();
    let run = rc.validate(&corpus).unwrap();
    let run_id = status(honest[0]).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        run.id_hex(),
        run_id,
        "the adversary must compute the run's id"
    );
    let shared = Shared::new(Status::default(), Arc::new(NetStats::default()));
    let cfg = JoinConfig {
        run,
        identity: Identity::generate(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![diloco_p2p::addr::parse_bootstrap(&net.bootstrap).unwrap()],
        checkpoint_dir: None,
        checkpoint_every: 0,
        status_addr: None,
        genesis_wait: Duration::from_secs(2),
        eval_windows: 0,
        observer: Some(shared.clone()),
        founders: 1,
        relay_listen: false,
        private_network: false,
        invite: None,
        tamper: Some(TamperHook::new(Adversary {
            progress: progress.clone(),
            ticks: 0,
            own: VecDeque::new(),
            fake: HashMap::new(),
            corrupt: Default::default(),
        })),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let adversary = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let device = backend::select(BackendChoice::Cpu).unwrap().device;
            rt.block_on(driver::run(cfg, corpus, device, stop))
        })
    };

    // It is admitted, then runs through every attack.
    let end = Instant::now() + Duration::from_secs(420);
    loop {
        let phase = progress.lock().unwrap().phase;
        if PHASES[phase] == "done" {
            break;
        }
        let seen = rejections(&honest);
        progress
            .lock()
            .unwrap()
            .confirmed
            .extend(refused_phases(&seen));
        assert!(
            Instant::now() < end,
            "the adversary did not finish its attacks (phase {}, {:?}; its status {:?})\n{}",
            PHASES[phase],
            progress.lock().unwrap(),
            shared.snapshot(),
            net.logs()
        );
        assert!(!adversary.is_finished(), "the adversary's node stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = format!("{:?}", progress.lock().unwrap());
    println!("adversary: {p}");
    let attacks_end = rounds_and_hashes(&honest)[0].0;

    // The honest replicas keep deciding, identical.
    let r1 = wait_identical(&net, &honest, attacks_end + 3, Duration::from_secs(120));
    println!("after the attacks the honest nodes agree at round {r1}");
    stop.store(true, Ordering::Relaxed);

    let statuses: Vec<Value> = honest.iter().map(|a| status(*a).unwrap()).collect();
    for (i, _) in net.nodes.clone() {
        assert!(net.procs[i].alive(), "honest node {i} died\n{}", net.logs());
    }
    for s in &statuses {
        assert_eq!(s["forks_abandoned"].as_u64(), Some(0), "{s}");
    }
    // Every class of attack was refused, with its reason, by some honest node.
    let seen = rejections(&honest);
    println!("rejections at the honest nodes: {seen:?}");
    let lies = progress.lock().unwrap().lies;
    assert!(
        lies > 0,
        "the adversary never owned a shard to lie about: {p}"
    );
    let refused = refused_phases(&seen);
    let missed: Vec<&str> = PHASES[1..PHASES.len() - 1]
        .iter()
        .copied()
        .filter(|ph| !refused.contains(ph))
        .collect();
    assert!(
        missed.is_empty(),
        "not refused: {missed:?}; rejections {seen:?}; adversary {p}\n{}",
        net.logs()
    );
    assert!(
        statuses
            .iter()
            .any(|s| s["refused_joins"].as_u64() > Some(0)),
        "{statuses:?}"
    );
    // ... logged with kind and reason, and in /metrics by kind and reason.
    let logs: String = net
        .procs
        .iter()
        .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
        .collect();
    assert!(
        logs.lines()
            .any(|l| l.contains("message rejected") && l.contains("norm_too_large")),
        "rejections are not logged with their reason\n{}",
        net.logs()
    );
    let metrics: String = honest
        .iter()
        .map(|a| http_get(*a, "/metrics").unwrap())
        .collect();
    for line in [
        r#"diloco_rejections_total{kind="READY",reason="norm_too_large"}"#,
        r#"diloco_rejections_total{kind="SYNC",reason="bad_decision"}"#,
        r#"diloco_rejections_total{kind="direct",reason="bad_frame"}"#,
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}\n{metrics}");
    }
    let _ = adversary.join();
}
