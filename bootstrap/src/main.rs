//! `diloco-bootstrap`: a discovery-only peer. Prints its full multiaddr (with /p2p/<peer id>)
//! for each listen address, then serves Kademlia, identify, relay and AutoNAT until stopped.

use anyhow::Context;
use clap::Parser;
use diloco_bootstrap::{server, status};
use diloco_p2p::{addr, keys};
use std::io::Write;
use std::path::PathBuf;

/// diloco-bootstrap: helps diloco-node peers find each other (no training, no coordination).
#[derive(Debug, Parser)]
#[command(name = "diloco-bootstrap", version, about, long_about = None)]
struct Cli {
    /// Address to listen on (repeat for several), e.g. /ip4/0.0.0.0/tcp/4001 or
    /// /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(
        long,
        env = "DILOCO_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/4001"
    )]
    listen: Vec<String>,
    /// Identity key file; created with a new key if absent. Keep it to keep the peer id.
    #[arg(long, env = "DILOCO_KEY", default_value = "bootstrap.key")]
    key: PathBuf,
    /// Address to announce (e.g. the public address of a port forward); without it the
    /// addresses it listens on are announced, which is what relayed clients are given.
    #[arg(long, env = "DILOCO_EXTERNAL_ADDR", value_delimiter = ',')]
    external_addr: Vec<String>,
    /// Most simultaneous connections.
    #[arg(long, env = "DILOCO_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: u32,
    /// Peers that may listen through this relay at once.
    #[arg(long, env = "DILOCO_RELAY_MAX_RESERVATIONS", default_value_t = server::RelayLimits::default().max_reservations)]
    relay_max_reservations: usize,
    /// Relayed connections at once.
    #[arg(long, env = "DILOCO_RELAY_MAX_CIRCUITS", default_value_t = server::RelayLimits::default().max_circuits)]
    relay_max_circuits: usize,
    /// Bytes one relayed connection may carry before the relay closes it. The default (libp2p's,
    /// 128 KiB) is enough to punch a hole, not to train: raise it (e.g. 1073741824) to let peers
    /// that cannot punch through their NAT train through this relay, at the cost of its traffic.
    #[arg(long, env = "DILOCO_RELAY_MAX_CIRCUIT_BYTES", default_value_t = server::RelayLimits::default().max_circuit_bytes)]
    relay_max_circuit_bytes: u64,
    /// Seconds one relayed connection may last before the relay closes it (peers then open a
    /// new one).
    #[arg(long, env = "DILOCO_RELAY_MAX_CIRCUIT_SECS", default_value_t = server::RelayLimits::default().max_circuit_duration.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    relay_max_circuit_secs: u64,
    /// The peers reach this one on private addresses (a LAN, Docker networks, a lab): answer
    /// their AutoNAT probes over private IPs too.
    #[arg(long, env = "DILOCO_PRIVATE_NETWORK")]
    private_network: bool,
    /// Serve the dashboard page and `/status`, `/peers`, `/history` JSON on this address
    /// (e.g. 127.0.0.1:8480; port 0 picks one). Off by default.
    #[arg(long, env = "DILOCO_STATUS_ADDR")]
    status_addr: Option<std::net::SocketAddr>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DILOCO_LOG", default_value = "info,libp2p_kad=error")]
    log: String,
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and `docker logs` get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let listen = cli
        .listen
        .iter()
        .map(|s| addr::parse_listen(s))
        .collect::<Result<Vec<_>, _>>()?;
    let external = cli
        .external_addr
        .iter()
        .map(|s| {
            s.parse()
                .with_context(|| format!("--external-addr '{s}' is not a multiaddr"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (id, created) = keys::load_or_create(&cli.key)?;
    if created {
        tracing::info!(key = %cli.key.display(), "created a new identity key");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let cfg = server::Config {
            listen,
            external,
            max_connections: cli.max_connections,
            private_network: cli.private_network,
            relay: server::RelayLimits {
                max_reservations: cli.relay_max_reservations,
                max_circuits: cli.relay_max_circuits,
                max_circuit_bytes: cli.relay_max_circuit_bytes,
                max_circuit_duration: std::time::Duration::from_secs(cli.relay_max_circuit_secs),
            },
        };
        let swarm = server::build(&id, &cfg)?;
        tracing::info!(peer_id = %id.peer_id(), "bootstrap peer started");
        let book = std::sync::Arc::new(std::sync::Mutex::new(status::Book::new(id.peer_id())));
        if let Some(addr) = cli.status_addr {
            let bound = status::serve(addr, book.clone()).await?;
            println!("dashboard on http://{bound}/");
            let _ = std::io::stdout().flush();
        }
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        server::run_with(
            swarm,
            book,
            |a| {
                println!("{a}");
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await?;
        Ok(())
    })
}
