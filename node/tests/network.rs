//! Multi-process tests over real sockets on loopback: a `diloco-bootstrap` process and several
//! `diloco-node join` processes train one model together. One scenario (processes are costly
//! on a small machine) walks through: agreement and falling loss, a node SIGKILLed mid-round,
//! a late joiner, a restart from checkpoint, and a hostile peer sending garbage, forged,
//! oversized and replayed messages on every protocol.
//!
//! Every wait has a deadline and prints every process's log when it fails.

mod common;

use common::{http_get, status, Net};
use diloco_node::net::{self, NetConfig, NetEvent, Topic};
use diloco_protocol::wire::{Direct, Envelope, Hash};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the hostile peer sends through its swarm.
enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
    },
    Send {
        to: libp2p::PeerId,
        data: Vec<u8>,
        sync: bool,
    },
}

/// Captured protocol traffic, for the hostile peer to forge and replay.
fn hostile_attack(bootstrap: &str, run_id: &str, targets: &[String]) -> (usize, usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let id = diloco_p2p::keys::Identity::generate();
        let (peer, addr) = diloco_p2p::addr::parse_bootstrap(bootstrap).unwrap();
        let (client, mut events) = net::spawn(
            &id.keypair,
            NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap: vec![(peer, addr)],
                run: run_id.to_string(),
                max_direct: 1 << 20,
                request_timeout: Duration::from_secs(10),
                relay_listen: false,
                private_network: false,
            },
            std::sync::Arc::new(net::NetStats::default()),
        )
        .unwrap();
        let targets: Vec<libp2p::PeerId> = targets.iter().map(|t| t.parse().unwrap()).collect();
        // Listen for a while: collect real envelopes to forge and replay.
        let mut captured: Vec<Vec<u8>> = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < end && captured.len() < 50 {
            if let Ok(Some(NetEvent::Gossip {
                topic: Topic::Avg,
                data,
                ..
            })) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await
            {
                captured.push(data);
            }
        }
        assert!(
            !captured.is_empty(),
            "the hostile peer heard no protocol traffic"
        );
        let mut sent = 0usize;
        let publish = |data: Vec<u8>, topic: Topic| Command::Publish { topic, data };
        let mut cmds: Vec<Command> = Vec::new();
        // Garbage on both topics.
        for i in 0..20u8 {
            cmds.push(publish(vec![i; 100 + i as usize], Topic::Avg));
            cmds.push(publish(vec![0xff, i, 3, 7], Topic::Hello));
        }
        // Forged: real envelopes with one body byte flipped, and re-signed by us for another run.
        for data in captured.iter().take(20) {
            let mut f = data.clone();
            let k = f.len() / 2;
            f[k] ^= 0x40;
            cmds.push(publish(f, Topic::Avg));
            if let Ok(env) = Envelope::from_bytes(data) {
                let key = ed25519_dalek::SigningKey::from_bytes(&id.secret);
                let other =
                    Envelope::sign(&key, Hash([9; 32]), env.round, env.chain, env.body.clone());
                cmds.push(publish(other.to_bytes().unwrap(), Topic::Avg));
                let mine = Envelope::sign(&key, env.run, env.round, env.chain, env.body.clone());
                cmds.push(publish(mine.to_bytes().unwrap(), Topic::Avg));
            }
        }
        // Replays of every captured envelope (old rounds by now).
        for data in &captured {
            cmds.push(publish(data.clone(), Topic::Avg));
        }
        // Direct messages: garbage, lies, and oversized frames on both protocols.
        for t in &targets {
            for sync in [false, true] {
                cmds.push(Command::Send {
                    to: *t,
                    data: vec![1, 2, 3],
                    sync,
                });
                cmds.push(Command::Send {
                    to: *t,
                    data: vec![0xee; 1 << 20],
                    sync,
                });
                let lie = Direct::Data {
                    round: 0,
                    hash: Hash([1; 32]),
                    data: vec![5; 1000],
                };
                cmds.push(Command::Send {
                    to: *t,
                    data: lie.to_bytes().unwrap(),
                    sync,
                });
                let ask = Direct::SyncRequest { from: 0 };
                cmds.push(Command::Send {
                    to: *t,
                    data: ask.to_bytes().unwrap(),
                    sync,
                });
                cmds.push(Command::Send {
                    to: *t,
                    data: Direct::StateRequest.to_bytes().unwrap(),
                    sync,
                });
                let huge_state = Direct::Fetch {
                    round: u64::MAX,
                    hash: Hash([0; 32]),
                };
                cmds.push(Command::Send {
                    to: *t,
                    data: huge_state.to_bytes().unwrap(),
                    sync,
                });
            }
        }
        let total = cmds.len();
        for c in cmds {
            let ok = match c {
                Command::Publish { topic, data } => client.publish(topic, data).is_ok(),
                Command::Send { to, data, sync } => client.send(to, data, sync).is_ok(),
            };
            if ok {
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        client.shutdown().await;
        (sent, total)
    })
}

#[test]
fn nodes_train_together_survive_faults_and_stay_identical() {
    // Small and fast: a round is a few seconds of CPU per node on a 2-core machine.
    let mut net = Net::start(
        r#"{"model":"tiny","inner_steps":5,"batch":4,"seq":64,"warmup":5,"rounds":1000,
            "quantize":"int8","straggler_timeout_ms":3000,"agg_timeout_ms":3000,
            "attempt_timeout_ms":8000,"retry_ms":500}"#,
    );
    let a = net.start_node("a");
    let b = net.start_node("b");
    let c = net.start_node("c");

    // 1. Three nodes agree round after round (the loss is checked at the end: over the first
    // few 5-step rounds it sits on the unigram plateau, ~3.0, and may go up from one round to
    // the next).
    let (r1, _) = net.wait_agree(&[a, b, c], 4, Duration::from_secs(240));
    let sa = status(a).unwrap();
    assert_eq!(sa["group_size"].as_u64(), Some(3), "{sa}");
    let metrics = http_get(a, "/metrics").unwrap();
    assert!(metrics.contains("diloco_round"), "{metrics}");
    println!("agreed at round {r1}");
    check_dashboard_data(a, &[b, c]);

    // 2. SIGKILL node c mid-round: a and b finish the round and go on, identical.
    let c_index = net.nodes[2].0;
    net.procs[c_index].child.kill().unwrap();
    let _ = net.procs[c_index].child.wait();
    let (r2, _) = net.wait_agree(&[a, b], r1 + 3, Duration::from_secs(180));
    println!("after the kill: a and b agree at round {r2}");

    // 3. A late joiner syncs and is identical from then on.
    let d = net.start_node("d");
    let (r3, _) = net.wait_agree(&[a, b, d], r2 + 2, Duration::from_secs(180));
    let sd = status(d).unwrap();
    println!("joiner d agrees at round {r3}: {sd}");

    // 4. c restarts from its checkpoint directory (same key) and matches again.
    let c2 = net.start_node("c");
    let (r4, _) = net.wait_agree(&[a, b, c2, d], r3 + 2, Duration::from_secs(240));
    println!("restarted c agrees at round {r4}");

    // 5. A hostile peer sends garbage, forged, oversized and replayed messages everywhere.
    let run_id = sa["run_id"].as_str().unwrap().to_string();
    let targets: Vec<String> = [a, b, c2, d]
        .iter()
        .map(|x| status(*x).unwrap()["peer_id"].as_str().unwrap().to_string())
        .collect();
    let (sent, total) = hostile_attack(&net.bootstrap, &run_id, &targets);
    println!("hostile peer sent {sent}/{total} messages");
    let (r5, _) = net.wait_agree(&[a, b, c2, d], r4 + 3, Duration::from_secs(240));
    let rejected: u64 = [a, b, c2, d]
        .iter()
        .map(|x| status(*x).unwrap()["rejected"].as_u64().unwrap())
        .sum();
    assert!(
        rejected > 0,
        "no node reported rejecting the hostile messages"
    );
    let nodes = net.nodes.clone();
    let mut dead = Vec::new();
    for (i, _) in nodes.iter().filter(|(i, _)| *i != c_index) {
        if !net.procs[*i].alive() {
            dead.push(net.procs[*i].name.clone());
        }
    }
    assert!(dead.is_empty(), "nodes died: {dead:?}\n{}", net.logs());
    // The peer tables put the rejections on the peers that sent them.
    let table_rejections: u64 = [a, b, c2, d]
        .iter()
        .flat_map(|x| peers_of(*x))
        .map(|r| r["rejections"].as_u64().unwrap())
        .sum();
    assert!(table_rejections > 0, "no peer table lists a rejection");
    println!("after the attack: all agree at round {r5}; {rejected} messages rejected");

    // 6. Through all of it the global model learned: a (alive throughout) evaluated it every
    // round; the mean of the last three evals is below the first.
    let sa = status(a).unwrap();
    let hist: Vec<f64> = sa["eval_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_f64().unwrap())
        .collect();
    assert!(hist.len() >= 6, "eval history too short: {hist:?}");
    let first = hist[0];
    let recent = hist[hist.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(recent < first, "eval loss did not fall: {hist:?}");
    println!("eval loss {first:.3} -> {recent:.3} (mean of the last three)");
}

fn peers_of(addr: SocketAddr) -> Vec<Value> {
    let body = http_get(addr, "/peers").expect("/peers answers");
    serde_json::from_str::<Vec<Value>>(&body).expect("/peers is a JSON array")
}

/// What node `me`'s dashboard reads, after a few rounds with `others`: the page itself, round
/// records with members, contributors, losses and traffic, and a peer table of the others.
fn check_dashboard_data(me: SocketAddr, others: &[SocketAddr]) {
    let page = http_get(me, "/").expect("/ answers");
    assert!(page.contains("/dashboard.js"), "{page}");
    assert!(http_get(me, "/dashboard.js").is_some_and(|js| js.contains("pollNode")));
    // The joiners become members at some round and contribute from the next one on: wait for
    // a decided round that averaged all three.
    let deadline = Instant::now() + Duration::from_secs(180);
    let hist: Value = loop {
        let h: Value = serde_json::from_str(&http_get(me, "/history").unwrap()).unwrap();
        let all3 = h["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["contributors"].as_u64() == Some(3));
        if all3 {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "no round averaged 3 contributors: {h}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rounds = hist["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 3, "{hist}");
    let last = rounds.last().unwrap();
    assert!(
        rounds.iter().any(|r| r["members"].as_u64() == Some(3)),
        "{hist}"
    );
    assert!(
        rounds
            .iter()
            .all(|r| r["contributors"].as_u64().unwrap() <= 3),
        "{hist}"
    );
    // Averaging with others moves bytes both ways in every such round.
    let shared = rounds
        .iter()
        .filter(|r| r["contributors"].as_u64().unwrap() >= 2);
    for r in shared {
        assert!(r["bytes_sent"].as_u64().unwrap() > 0, "{r}");
        assert!(r["bytes_received"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(rounds.iter().any(|r| r["train_loss"].is_f64()), "{hist}");
    assert!(rounds.iter().any(|r| r["eval_loss"].is_f64()), "{hist}");
    assert!(rounds.iter().any(|r| r["averaging_s"].is_f64()), "{hist}");
    let n = last["round"].as_u64().unwrap();
    let after: Value =
        serde_json::from_str(&http_get(me, &format!("/history?since={}", n - 1)).unwrap()).unwrap();
    // Rounds decided since the first request may follow; round n comes first.
    assert_eq!(after["rounds"][0]["round"].as_u64(), Some(n), "{after}");
    let own = status(me).unwrap()["peer_id"].as_str().unwrap().to_string();
    let rows = peers_of(me);
    for o in others {
        let id = status(*o).unwrap()["peer_id"].as_str().unwrap().to_string();
        let row = rows
            .iter()
            .find(|r| r["peer_id"] == id.as_str())
            .unwrap_or_else(|| panic!("peer {id} missing from {rows:?}"));
        assert!(row["contributions"].as_u64().unwrap() >= 1, "{row}");
    }
    assert!(rows.iter().any(|r| r["member"] == true), "{rows:?}");
    assert!(
        rows.iter().all(|r| r["peer_id"] != own.as_str()),
        "the node lists itself: {rows:?}"
    );
}

/// Waits until `pred` holds for the status of every node in `which`.
fn wait_status(
    net: &Net,
    which: &[SocketAddr],
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if net
            .statuses(which)
            .iter()
            .all(|s| s.as_ref().is_some_and(&pred))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what}: not reached within {timeout:?}; last {:?}\n{}",
        net.statuses(which),
        net.logs()
    );
}

/// A run config of synthetic rounds (no model) with short timeouts, `extra` (`,"key":value`
/// pairs) appended: a stall shows after 1 + 1 + 3 × 3 = 11 s.
fn synthetic_run(extra: &str) -> String {
    format!(
        r#"{{"model":"tiny","inner_steps":1,"batch":1,"seq":8,"quantize":"none",
            "synthetic_params":10000,"synthetic_train_ms":300,"straggler_timeout_ms":1000,
            "agg_timeout_ms":1000,"attempt_timeout_ms":3000,"retry_ms":500{extra}}}"#
    )
}

/// The lone founder dies while two nodes are still waiting for its state. Hearing nobody who
/// holds the run's state for 30 s, they go back to discovery; one founds the run afresh and the
/// other joins it (before, both waited forever).
#[test]
fn joiners_found_anew_when_the_lone_founder_dies() {
    // Synthetic rounds (no model): the founder's first round takes 15 s, long enough for the
    // others to start joining before it is killed; nothing is decided before the kill.
    let mut net = Net::start(
        r#"{"model":"tiny","inner_steps":1,"batch":1,"seq":8,"quantize":"none",
            "synthetic_params":10000,"synthetic_train_ms":15000,"straggler_timeout_ms":3000,
            "agg_timeout_ms":3000,"attempt_timeout_ms":8000,"retry_ms":500}"#,
    );
    let a = net.start_node("a");
    wait_status(
        &net,
        &[a],
        "a founds the run",
        Duration::from_secs(60),
        |s| s["member"].as_bool() == Some(true),
    );
    let b = net.start_node("b");
    let c = net.start_node("c");
    wait_status(
        &net,
        &[b, c],
        "b and c join a's run",
        Duration::from_secs(30),
        |s| s["phase"].as_str() == Some("syncing"),
    );
    let a_index = net.nodes[0].0;
    net.procs[a_index].child.kill().unwrap();
    let _ = net.procs[a_index].child.wait();
    let (round, hash) = net.wait_agree(&[b, c], 1, Duration::from_secs(180));
    println!("b and c found anew and agree at round {round} ({hash:.12})");
}

/// A group of two needs both members: the nodes warn about it when the pair forms; when one
/// is killed the survivor says in /status (and its log) that the run is stalled, within the
/// run's timeouts; when the dead one restarts from its checkpoint, rounds resume and the stall
/// clears.
#[test]
fn a_pair_that_loses_one_says_it_is_stalled_and_resumes() {
    // Synthetic rounds (no model), short timeouts: a stall shows after 1 + 1 + 3 × 3 = 11 s.
    let mut net = Net::start(&synthetic_run(""));
    let a = net.start_node("a");
    let b = net.start_node("b");
    net.wait_agree(&[a, b], 3, Duration::from_secs(120));
    let a_index = net.nodes[0].0;
    net.procs[a_index].wait_log("needs both to decide", Duration::from_secs(10));
    let sa = status(a).unwrap();
    assert_eq!(
        (sa["quorum"].as_u64(), sa["tolerates"].as_u64()),
        (Some(2), Some(0)),
        "{sa}"
    );
    assert!(sa["stalled_s"].is_null(), "{sa}");

    let b_index = net.nodes[1].0;
    net.procs[b_index].child.kill().unwrap();
    let _ = net.procs[b_index].child.wait();
    wait_status(
        &net,
        &[a],
        "a reports the stall",
        Duration::from_secs(60),
        |s| s["stalled_s"].as_f64().is_some_and(|t| t >= 11.0),
    );
    net.procs[a_index].wait_log(
        "fewer than 2 of the 2 members answer",
        Duration::from_secs(10),
    );
    let metrics = http_get(a, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("diloco_stalled_seconds ") && !l.ends_with(" 0.0")),
        "{metrics}"
    );
    let stalled_at = status(a).unwrap()["round"].as_u64().unwrap();

    let _b2 = net.start_node("b");
    wait_status(
        &net,
        &[a],
        "rounds resume and the stall clears",
        Duration::from_secs(120),
        |s| s["stalled_s"].is_null() && s["round"].as_u64().unwrap() > stalled_at,
    );
    net.procs[a_index].wait_log("no longer stalled", Duration::from_secs(10));
}

/// A run that lost its quorum goes on by its operator's word, over real sockets: three members
/// of a run whose config names an operator key; two are killed and the survivor reports the
/// stall. `diloco-node reconfig` without --yes shows what it would do and sends nothing; signed
/// with another key it is refused by the node (the reason in the answer, nonzero exit); with the
/// operator key it restarts the stalled round with the survivor alone, which decides rounds
/// again and counts the reconfiguration in /status. A lost member restarted from its
/// checkpoint (still in the replaced instance, where it cannot check the survivor's state by
/// its own members' signatures) follows the reconfigured round's proof, joins again and ends
/// identical.
#[test]
fn an_operator_reconfiguration_lets_the_survivor_of_a_lost_quorum_go_on() {
    let operator = diloco_p2p::keys::Identity::from_secret([0x0b; 32])
        .peer_id()
        .to_string();
    let run = synthetic_run(&format!(r#","operator":"{operator}""#));
    let mut net = Net::start(&run);
    let a_id = net.key_for("a", 0xa1);
    net.key_for("b", 0xb2);
    net.key_for("c", 0xc3);
    let op_key = net.dir.path().join("operator.key");
    std::fs::write(&op_key, hex::encode([0x0b; 32])).unwrap();
    let other_key = net.dir.path().join("other.key");
    std::fs::write(&other_key, hex::encode([0x0c; 32])).unwrap();
    let a = net.start_node("a");
    let b = net.start_node("b");
    let c = net.start_node("c");
    net.wait_agree(&[a, b, c], 2, Duration::from_secs(120));
    for i in [1, 2] {
        let p = net.nodes[i].0;
        net.procs[p].child.kill().unwrap();
        let _ = net.procs[p].child.wait();
    }
    wait_status(
        &net,
        &[a],
        "a reports the stall",
        Duration::from_secs(90),
        |s| s["stalled_s"].as_f64().is_some(),
    );
    let stalled_at = status(a).unwrap()["round"].as_u64().unwrap();
    let reconfig = |key: &std::path::Path, yes: bool| {
        let mut cmd = std::process::Command::new(common::node_bin());
        cmd.args(["reconfig", "--node", &a.to_string(), "--keep", &a_id])
            .arg("--operator-key")
            .arg(key)
            .env("DILOCO_LOG", "warn");
        if yes {
            cmd.arg("--yes");
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = reconfig(&op_key, false);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("restart round {stalled_at} ")) && out.contains("not sent"),
        "{out}"
    );
    assert_eq!(status(a).unwrap()["reconfigurations"].as_u64(), Some(0));
    let (ok, out, err) = reconfig(&other_key, true);
    assert!(!ok, "a RECONFIG signed by another key was taken: {out}");
    assert!(err.contains("not signed by the run's operator"), "{err}");
    let (ok, out, err) = reconfig(&op_key, true);
    assert!(ok, "{out}{err}\n{}", net.logs());
    assert!(out.contains("restarted with 1 members"), "{out}");
    wait_status(
        &net,
        &[a],
        "the survivor decides rounds again",
        Duration::from_secs(60),
        |s| {
            s["round"].as_u64().is_some_and(|r| r >= stalled_at + 2)
                && s["group_size"].as_u64() == Some(1)
                && s["stalled_s"].is_null()
                && s["reconfigurations"].as_u64() == Some(1)
        },
    );
    net.procs[net.nodes[0].0].wait_log("restarted this round", Duration::from_secs(5));
    let b2 = net.start_node("b");
    net.wait_agree(&[a, b2], stalled_at + 3, Duration::from_secs(120));
}

/// Admission by invitation over real sockets: `a` (the only listed peer) founds; `b` joins with
/// the token `diloco-node invite` printed for it on a's key and becomes a member; `c`, neither
/// listed nor invited, refuses to start and says how to get in; `d` carries an invitation
/// signed by a key that is no member, so the members refuse its JOINs with a reason, count them
/// in /metrics (`diloco_refused_joins`), and it never becomes a member.
#[test]
fn an_invite_run_admits_the_invited_and_refuses_the_rest() {
    let a_id = diloco_p2p::keys::Identity::from_secret([0xa1; 32])
        .peer_id()
        .to_string();
    let run = synthetic_run(&format!(r#","admission":"invite","allowlist":["{a_id}"]"#));
    let mut net = Net::start(&run);
    assert_eq!(net.key_for("a", 0xa1), a_id);
    let b_id = net.key_for("b", 0xb2);
    let c_id = net.key_for("c", 0xc3);
    let d_id = net.key_for("d", 0xd4);
    net.key_for("e", 0xe5);

    let invite = |signer: &str, peer: &str| {
        let out = net.run_cli("invite", signer, &["--peer", peer]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(token.len(), 192, "{token}");
        token
    };
    let b_token = invite("a", &b_id);
    // An invitation from a key that is no member of the run (it still verifies for d).
    let d_token = invite("e", &d_id);

    let a = net.start_node("a");
    wait_status(
        &net,
        &[a],
        "a founds the run",
        Duration::from_secs(60),
        |s| s["member"].as_bool() == Some(true),
    );
    let b = net.start_node_with("b", &["--invite", &b_token]);
    net.wait_agree(&[a, b], 2, Duration::from_secs(120));

    let out = net.run_cli(
        "join",
        "c",
        &["--bootstrap", &net.bootstrap.clone(), "--backend", "cpu"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "c started: {err}");
    assert!(
        err.contains("admits members by invitation") && err.contains(&c_id),
        "c's error does not say how to get in: {err}"
    );

    let _d = net.start_node_with("d", &["--invite", &d_token]);
    let end = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let m = http_get(a, "/metrics").unwrap_or_default();
        let n = m
            .lines()
            .find(|l| l.starts_with("diloco_refused_joins"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if n > 0.0 || Instant::now() > end {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused > 0.0,
        "a never counted a refused JOIN\n{}",
        net.logs()
    );
    let a_index = net.nodes[0].0;
    net.procs[a_index].wait_log("JOIN invited by a non-member", Duration::from_secs(10));
    // The run goes on with a and b only.
    let (round, _) = net.wait_agree(&[a, b], 4, Duration::from_secs(120));
    println!("a and b at round {round}; d refused {refused} times");
}
