//! Several nodes in one test process over real loopback sockets: an in-process bootstrap peer,
//! three nodes of one run, and one node started with other run settings. The three agree on one
//! global hash every round; the fourth is refused by them (and they by it) and trains alone.

use diloco_bootstrap::server;
use diloco_node::driver::status::{Shared, Status};
use diloco_node::driver::{self, JoinConfig};
use diloco_node::net::NetStats;
use diloco_node::runconfig::RunConfig;
use diloco_node::train::backend::{self, BackendChoice};
use diloco_node::train::data::{Corpus, DataSpec};
use diloco_p2p::keys::Identity;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run_config(inner_steps: u64) -> RunConfig {
    RunConfig {
        // Rounds of a few seconds on a small machine with four nodes in one process: fast enough
        // for a test, slow enough that a joiner catches up with a running group (a joiner must
        // follow decisions as fast as the group makes them; real rounds take minutes).
        model: "tiny".into(),
        inner_steps,
        batch: 4,
        seq: 64,
        warmup: 2,
        straggler_timeout_ms: 3000,
        agg_timeout_ms: 3000,
        attempt_timeout_ms: 8000,
        retry_ms: 500,
        ..RunConfig::default()
    }
}

async fn start_bootstrap() -> (libp2p::PeerId, libp2p::Multiaddr) {
    let boot_id = Identity::generate();
    let swarm = server::build(
        &boot_id,
        &server::Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            external: vec![],
            max_connections: 64,
            private_network: false,
            relay: server::RelayLimits::default(),
        },
    )
    .unwrap();
    let (addr_tx, mut addr_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(server::run(
        swarm,
        move |a| {
            let _ = addr_tx.send(a);
        },
        std::future::pending(),
    ));
    let boot_addr = addr_rx.recv().await.unwrap();
    diloco_p2p::addr::parse_bootstrap(&boot_addr.to_string()).unwrap()
}

fn node(
    run: &RunConfig,
    corpus: &Corpus,
    bootstrap: &(libp2p::PeerId, libp2p::Multiaddr),
    genesis_wait: Duration,
) -> (JoinConfig, Arc<Shared>) {
    let shared = Shared::new(Status::default(), Arc::new(NetStats::default()));
    let cfg = JoinConfig {
        run: run.validate(corpus).unwrap(),
        identity: Identity::generate(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![bootstrap.clone()],
        checkpoint_dir: None,
        checkpoint_every: 0,
        status_addr: None,
        genesis_wait,
        eval_windows: 2,
        observer: Some(shared.clone()),
        founders: 1,
        relay_listen: false,
        private_network: false,
        invite: None,
        tamper: None,
    };
    (cfg, shared)
}

fn runtime() -> tokio::runtime::Runtime {
    // DILOCO_TEST_LOG=info shows the nodes' logs (interleaved) when a test needs debugging.
    if let Ok(filter) = std::env::var("DILOCO_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn corpus() -> Arc<Corpus> {
    Arc::new(
        Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..DataSpec::default()
        })
        .unwrap(),
    )
}

#[test]
fn nodes_in_one_process_agree_and_refuse_another_run() {
    runtime().block_on(async {
        let bootstrap = start_bootstrap().await;

        let corpus = corpus();
        let device = backend::select(BackendChoice::Cpu).unwrap().device;
        let stop = Arc::new(AtomicBool::new(false));
        let mut observers = Vec::new();
        let mut tasks = Vec::new();
        for inner_steps in [20, 20, 20, 21] {
            let (cfg, shared) = node(
                &run_config(inner_steps),
                &corpus,
                &bootstrap,
                Duration::from_secs(2),
            );
            observers.push(shared);
            tasks.push(tokio::spawn(driver::run(
                cfg,
                corpus.clone(),
                device.clone(),
                stop.clone(),
            )));
        }

        let deadline = Instant::now() + Duration::from_secs(180);
        let agreed = loop {
            let s: Vec<Status> = observers.iter().map(|o| o.snapshot()).collect();
            let (same, other) = s.split_at(3);
            let r = same[0].round;
            if r >= 3
                && same.iter().all(|x| {
                    x.round == r && x.global_hash == same[0].global_hash && x.group_size == 3
                })
                && other[0].round >= 2
            {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no agreement in time: {:?}",
                s.iter()
                    .map(|x| (
                        x.round,
                        x.group_size,
                        x.global_hash.get(..12).map(String::from)
                    ))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let other = &agreed[3];
        assert_ne!(other.run_id, agreed[0].run_id);
        assert_eq!(
            other.group_size, 1,
            "a node of another run must train alone"
        );
        let refused: u64 = observers
            .iter()
            .map(|o| o.net.refused.load(Ordering::Relaxed))
            .sum();
        assert!(
            refused >= 3,
            "peers of another run were not refused ({refused})"
        );

        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            let report = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a node did not stop within 60 s")
                .unwrap()
                .unwrap();
            assert!(report.rounds_decided >= 2, "{report:?}");
        }
    });
}

/// Two peers that found the run at the same moment (no genesis wait) start two histories; the
/// one that is behind abandons its own and joins the other, and they end up identical.
#[test]
fn two_histories_of_one_run_merge() {
    runtime().block_on(async {
        let bootstrap = start_bootstrap().await;
        let corpus = corpus();
        let device = backend::select(BackendChoice::Cpu).unwrap().device;
        let stop = Arc::new(AtomicBool::new(false));
        let rc = run_config(20);
        let mut observers = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (cfg, shared) = node(&rc, &corpus, &bootstrap, Duration::ZERO);
            observers.push(shared);
            tasks.push(tokio::spawn(driver::run(
                cfg,
                corpus.clone(),
                device.clone(),
                stop.clone(),
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s: Vec<Status> = observers.iter().map(|o| o.snapshot()).collect();
            if s[0].round >= 2
                && s.iter().all(|x| {
                    x.round == s[0].round && x.global_hash == s[0].global_hash && x.group_size == 2
                })
            {
                let forks: u64 = s.iter().map(|x| x.forks_abandoned).sum();
                println!(
                    "merged at round {} after {forks} abandoned histories",
                    s[0].round
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "histories did not merge: {:?}",
                s.iter()
                    .map(|x| (x.round, x.group_size, x.forks_abandoned))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
    });
}
