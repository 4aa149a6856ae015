//! Relayed connections: two nodes with no listening socket at all (as behind NAT or a firewall
//! that admits no inbound connection) listen only through the bootstrap peer's relay
//! (`relay_listen`). They can still find each other (kademlia on the bootstrap peer learns their
//! relayed addresses from an identify push), connect through the relay, identify each other as
//! peers of the run, and exchange gossip and direct messages. DCUtR cannot upgrade these
//! connections (neither node has an address to be dialed directly), so this covers the relay
//! path, not hole punching.
//!
//! The relay's limits decide what the path can carry: with libp2p's defaults (128 KiB per
//! circuit) an outer-gradient-sized message is refused at once (sending it would make the relay
//! cut the connection) and the sender is told, while small messages still get through; with an
//! operator's raised limits the same message arrives.

use diloco_bootstrap::server;
use diloco_node::net::{self, Client, Events, NetConfig, NetEvent, NetStats, Topic};
use diloco_p2p::keys::Identity;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

/// A message larger than libp2p's default circuit limit (128 KiB), as an outer-gradient shard.
const BIG: usize = 600_000;

async fn start_bootstrap(relay: server::RelayLimits) -> (libp2p::PeerId, libp2p::Multiaddr) {
    let swarm = server::build(
        &Identity::generate(),
        &server::Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            external: vec![],
            max_connections: 64,
            private_network: false,
            relay,
        },
    )
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(server::run(
        swarm,
        move |a| {
            let _ = tx.send(a);
        },
        std::future::pending(),
    ));
    let addr = rx.recv().await.unwrap();
    diloco_p2p::addr::parse_bootstrap(&addr.to_string()).unwrap()
}

/// A swarm task's client and events.
struct NetHandle {
    client: Client,
    events: Events,
    peer_id: libp2p::PeerId,
}

fn relayed_node(boot: &(libp2p::PeerId, libp2p::Multiaddr)) -> (NetHandle, Identity) {
    let id = Identity::generate();
    let (client, events) = net::spawn(
        &id.keypair,
        NetConfig {
            listen: vec![],
            bootstrap: vec![boot.clone()],
            run: "relay-test-run".into(),
            max_direct: 1 << 20,
            request_timeout: Duration::from_secs(20),
            relay_listen: true,
            private_network: false,
        },
        Arc::new(NetStats::default()),
    )
    .unwrap();
    let peer_id = client.peer_id;
    (
        NetHandle {
            client,
            events,
            peer_id,
        },
        id,
    )
}

/// Drains `h` until `want` matches an event or the deadline passes; returns whether it matched
/// and every `Listening` address seen.
async fn wait_for(
    h: &mut NetHandle,
    deadline: Instant,
    mut want: impl FnMut(&NetEvent) -> bool,
) -> (bool, Vec<String>) {
    let mut listening = Vec::new();
    while let Ok(Some(ev)) = timeout_at(deadline, h.events.recv()).await {
        if let NetEvent::Listening(a) = &ev {
            listening.push(a.to_string());
        }
        if want(&ev) {
            return (true, listening);
        }
    }
    (false, listening)
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Two relayed-only nodes that have identified each other through the relay.
async fn relayed_pair(relay: server::RelayLimits, deadline: Instant) -> (NetHandle, NetHandle) {
    let boot = start_bootstrap(relay).await;
    let (mut a, _) = relayed_node(&boot);
    let (mut b, _) = relayed_node(&boot);
    let pa = a.peer_id;

    // Each node's only address is a relay circuit through the bootstrap peer.
    let (ok, addrs) = wait_for(&mut a, deadline, |e| matches!(e, NetEvent::Listening(_))).await;
    assert!(ok, "node A never listened through the relay");
    assert!(
        addrs.iter().all(|x| x.contains("/p2p-circuit")),
        "A listens on a non-relayed address: {addrs:?}"
    );

    // They find each other through the bootstrap peer's kademlia and identify each other
    // (the connection can only go through the relay: neither has a socket to dial).
    let (ok, _) = wait_for(
        &mut b,
        deadline,
        |e| matches!(e, NetEvent::PeerJoined(p) if *p == pa),
    )
    .await;
    assert!(ok, "B never identified A through the relay");
    (a, b)
}

async fn send(from: &NetHandle, to: libp2p::PeerId, data: Vec<u8>, sync: bool) {
    from.client.send(to, data, sync).unwrap();
}

#[test]
fn nodes_without_a_listening_socket_talk_through_the_relay() {
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(90);
        let limits = server::RelayLimits {
            max_circuit_bytes: 64 << 20,
            ..Default::default()
        };
        let (mut a, mut b) = relayed_pair(limits, deadline).await;
        let (pa, pb) = (a.peer_id, b.peer_id);

        // A direct message from B to A, then from A to B, over the relayed connection.
        send(&b, pa, b"hello from B".to_vec(), false).await;
        let (ok, _) = wait_for(&mut a, deadline, |e| {
            matches!(e, NetEvent::Direct { from, data } if *from == pb && data == b"hello from B")
        })
        .await;
        assert!(ok, "A never received B's direct message through the relay");
        send(&a, pb, b"hello from A".to_vec(), true).await;
        let (ok, _) = wait_for(&mut b, deadline, |e| {
            matches!(e, NetEvent::Direct { from, data } if *from == pa && data == b"hello from A")
        })
        .await;
        assert!(ok, "B never received A's direct message through the relay");

        // An outer-gradient-sized message fits within the raised circuit limit.
        let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        send(&b, pa, big.clone(), false).await;
        let (ok, _) = wait_for(
            &mut a,
            deadline,
            |e| matches!(e, NetEvent::Direct { from, data } if *from == pb && *data == big),
        )
        .await;
        assert!(
            ok,
            "A never received B's {BIG}-byte message through the relay"
        );

        // Gossip reaches the other node too (retried: the mesh forms after the connection).
        let mut got = false;
        while !got && Instant::now() < deadline {
            a.client
                .publish(Topic::Hello, b"gossip from A".to_vec())
                .unwrap();
            let step = (Instant::now() + Duration::from_secs(2)).min(deadline);
            got = wait_for(
                &mut b,
                step,
                |e| matches!(e, NetEvent::Gossip { data, .. } if data == b"gossip from A"),
            )
            .await
            .0;
        }
        assert!(got, "B never received A's gossip through the relay");
        a.client.shutdown().await;
        b.client.shutdown().await;
    });
}

#[test]
fn a_message_over_the_relay_limit_fails_cleanly_and_small_ones_still_pass() {
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut a, mut b) = relayed_pair(server::RelayLimits::default(), deadline).await;
        let (pa, pb) = (a.peer_id, b.peer_id);
        assert!(BIG as u64 > server::RelayLimits::default().max_circuit_bytes);

        // Over half the circuit's limit: B refuses to send it and says so; A gets nothing.
        send(&b, pa, vec![7u8; BIG], false).await;
        let (ok, _) = wait_for(
            &mut b,
            deadline,
            |e| matches!(e, NetEvent::SendFailed { to, .. } if *to == pa),
        )
        .await;
        assert!(ok, "B was never told its oversized relayed message failed");

        // Small messages still get through on the relayed connection, and the oversized one
        // never shows up.
        let mut got = false;
        while !got && Instant::now() < deadline {
            send(&b, pa, b"still here".to_vec(), false).await;
            let step = (Instant::now() + Duration::from_secs(5)).min(deadline);
            got = wait_for(&mut a, step, |e| {
                if let NetEvent::Direct { from, data } = e {
                    assert!(data.len() < BIG, "a message over the relay limit arrived");
                    *from == pb && data == b"still here"
                } else {
                    false
                }
            })
            .await
            .0;
        }
        assert!(
            got,
            "A never received a small message after the circuit was closed"
        );
        a.client.shutdown().await;
        b.client.shutdown().await;
    });
}
