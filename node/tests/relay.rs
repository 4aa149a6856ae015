//! Relayed connections: two nodes with no listening socket at all (as behind NAT or a firewall
//! that admits no inbound connection) listen only through the bootstrap peer's relay
//! (`relay_listen`). They can still find each other (kademlia on the bootstrap peer holds their
//! relayed addresses), connect through the relay, identify each other as peers of the run, and
//! exchange gossip and direct messages. DCUtR cannot upgrade these connections (neither node has
//! an address to be dialed directly), so this covers the relay path, not hole punching.

use diloco_bootstrap::{keys::Identity, server};
use diloco_node::net::{self, Command, NetConfig, NetEvent, NetHandle, NetStats, Topic};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

async fn start_bootstrap() -> (libp2p::PeerId, libp2p::Multiaddr) {
    let swarm = server::build(
        &Identity::generate(),
        &server::Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            external: vec![],
            max_connections: 64,
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
    diloco_bootstrap::addr::parse_bootstrap(&addr.to_string()).unwrap()
}

fn relayed_node(boot: &(libp2p::PeerId, libp2p::Multiaddr)) -> (NetHandle, Identity) {
    let id = Identity::generate();
    let h = net::spawn(
        &id.keypair,
        NetConfig {
            listen: vec![],
            bootstrap: vec![boot.clone()],
            run: "relay-test-run".into(),
            max_direct: 1 << 20,
            request_timeout: Duration::from_secs(20),
            relay_listen: true,
        },
        Arc::new(NetStats::default()),
    )
    .unwrap();
    (h, id)
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

#[test]
fn nodes_without_a_listening_socket_talk_through_the_relay() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let boot = start_bootstrap().await;
        let (mut a, _ida) = relayed_node(&boot);
        let (mut b, _idb) = relayed_node(&boot);
        let (pa, pb) = (a.peer_id, b.peer_id);
        let deadline = Instant::now() + Duration::from_secs(90);

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

        // A direct message from B to A, then from A to B, over the relayed connection.
        b.commands
            .send(Command::Send {
                to: pa,
                data: b"hello from B".to_vec(),
                sync: false,
            })
            .await
            .unwrap();
        let (ok, _) = wait_for(&mut a, deadline, |e| {
            matches!(e, NetEvent::Direct { from, data } if *from == pb && data == b"hello from B")
        })
        .await;
        assert!(ok, "A never received B's direct message through the relay");
        a.commands
            .send(Command::Send {
                to: pb,
                data: b"hello from A".to_vec(),
                sync: true,
            })
            .await
            .unwrap();
        let (ok, _) = wait_for(&mut b, deadline, |e| {
            matches!(e, NetEvent::Direct { from, data } if *from == pa && data == b"hello from A")
        })
        .await;
        assert!(ok, "B never received A's direct message through the relay");

        // Gossip reaches the other node too (retried: the mesh forms after the connection).
        let mut got = false;
        while !got && Instant::now() < deadline {
            a.commands
                .send(Command::Publish {
                    topic: Topic::Hello,
                    data: b"gossip from A".to_vec(),
                })
                .await
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
        let _ = a.commands.send(Command::Shutdown).await;
        let _ = b.commands.send(Command::Shutdown).await;
    });
}
