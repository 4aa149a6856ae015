//! What the bootstrap peer knows, for people: its connections, the peers it has met, relay
//! reservations and circuits, and a bounded history of those counts, served over HTTP
//! (`--status-addr`) as `/status`, `/peers` and `/history` JSON and as the same dashboard page
//! a node serves at `/` ([`diloco_p2p::dashboard`]).
//!
//! The swarm loop writes into a [`Book`]; the HTTP server only reads snapshots of it. Every
//! table is bounded: at most [`MAX_PEERS`] peers (the ones disconnected longest ago go first)
//! and [`MAX_SAMPLES`] samples.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Peers the table keeps.
pub const MAX_PEERS: usize = 1024;
/// Samples the history keeps (one every [`SAMPLE_EVERY`]: 5.7 hours).
pub const MAX_SAMPLES: usize = 4096;
/// How often the counts are sampled.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest agent string kept from a peer (it is the peer's to choose).
const MAX_AGENT: usize = 96;

/// `/status` of a bootstrap peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// Always `bootstrap` (the dashboard picks its view by it).
    pub kind: String,
    /// This peer's id.
    pub peer_id: String,
    /// Full addresses it listens on (with `/p2p/<peer id>`).
    pub listen: Vec<String>,
    /// Peers connected now.
    pub connections: usize,
    /// Peers in the table (connected or met before).
    pub peers: usize,
    /// Peers holding a relay reservation.
    pub reservations: usize,
    /// Relayed connections open.
    pub circuits: u64,
    /// Seconds since start.
    pub uptime_s: f64,
}

/// One peer the bootstrap peer met.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    /// Its id.
    pub peer_id: String,
    /// The agent string it announced (identify), cut to 96 bytes.
    pub agent: String,
    /// The address it connected from, last time.
    pub address: String,
    /// Connected now.
    pub connected: bool,
    /// Seconds since start, when it connected (or disconnected, if it is gone).
    pub since_s: f64,
    /// It holds a relay reservation (it listens through this peer).
    pub relay: bool,
}

/// One sample of the counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since start.
    pub at_s: f64,
    /// Peers connected.
    pub connections: usize,
    /// Relay reservations.
    pub reservations: usize,
    /// Relayed circuits.
    pub circuits: u64,
}

/// `/history` of a bootstrap peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Samples kept at most.
    pub capacity: usize,
    /// Samples, oldest first.
    pub samples: Vec<Sample>,
}

/// What the swarm loop records.
#[derive(Debug)]
pub struct Book {
    started: Instant,
    peer_id: String,
    listen: Vec<String>,
    peers: BTreeMap<PeerId, PeerRow>,
    reservations: BTreeSet<PeerId>,
    circuits: u64,
    samples: VecDeque<Sample>,
}

impl Book {
    /// An empty book for the bootstrap peer `me`.
    pub fn new(me: PeerId) -> Self {
        Book {
            started: Instant::now(),
            peer_id: me.to_string(),
            listen: Vec::new(),
            peers: BTreeMap::new(),
            reservations: BTreeSet::new(),
            circuits: 0,
            samples: VecDeque::new(),
        }
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn row(&mut self, peer: PeerId) -> &mut PeerRow {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            // Make room: the peer gone longest ago, else the connected one met first.
            let victim = self
                .peers
                .iter()
                .min_by(|a, b| {
                    (a.1.connected, a.1.since_s)
                        .partial_cmp(&(b.1.connected, b.1.since_s))
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .map(|(p, _)| *p);
            if let Some(v) = victim {
                self.peers.remove(&v);
            }
        }
        self.peers.entry(peer).or_insert_with(|| PeerRow {
            peer_id: peer.to_string(),
            ..PeerRow::default()
        })
    }

    /// It listens on `addr`.
    pub fn listening(&mut self, addr: String) {
        if self.listen.len() < 16 && !self.listen.contains(&addr) {
            self.listen.push(addr);
        }
    }

    /// `peer` connected from `address`.
    pub fn connected(&mut self, peer: PeerId, address: String) {
        let now = self.now_s();
        let row = self.row(peer);
        if !row.connected {
            row.since_s = now;
        }
        row.connected = true;
        row.address = address;
    }

    /// `peer`'s last connection closed.
    pub fn disconnected(&mut self, peer: PeerId) {
        let now = self.now_s();
        if let Some(row) = self.peers.get_mut(&peer) {
            row.connected = false;
            row.since_s = now;
        }
    }

    /// `peer` said it runs `agent`.
    pub fn identified(&mut self, peer: PeerId, agent: &str) {
        let mut cut = agent.len().min(MAX_AGENT);
        while !agent.is_char_boundary(cut) {
            cut -= 1;
        }
        self.row(peer).agent = agent[..cut].to_string();
    }

    /// `peer` holds a relay reservation (`true`) or no longer does.
    pub fn reservation(&mut self, peer: PeerId, held: bool) {
        if held {
            self.reservations.insert(peer);
        } else {
            self.reservations.remove(&peer);
        }
        if let Some(row) = self.peers.get_mut(&peer) {
            row.relay = held;
        } else if held {
            self.row(peer).relay = true;
        }
    }

    /// A relayed circuit opened (`true`) or closed.
    pub fn circuit(&mut self, open: bool) {
        self.circuits = if open {
            self.circuits.saturating_add(1)
        } else {
            self.circuits.saturating_sub(1)
        };
    }

    /// Adds a sample of the counts now (dropping the oldest beyond [`MAX_SAMPLES`]).
    pub fn sample(&mut self) {
        let s = Sample {
            at_s: self.now_s(),
            connections: self.peers.values().filter(|r| r.connected).count(),
            reservations: self.reservations.len(),
            circuits: self.circuits,
        };
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The `/status` answer.
    pub fn status(&self) -> Status {
        Status {
            kind: "bootstrap".into(),
            peer_id: self.peer_id.clone(),
            listen: self.listen.clone(),
            connections: self.peers.values().filter(|r| r.connected).count(),
            peers: self.peers.len(),
            reservations: self.reservations.len(),
            circuits: self.circuits,
            uptime_s: self.now_s(),
        }
    }

    /// The `/peers` answer: connected peers first, newest first.
    pub fn rows(&self) -> Vec<PeerRow> {
        let mut v: Vec<PeerRow> = self.peers.values().cloned().collect();
        v.sort_by(|a, b| {
            b.connected
                .cmp(&a.connected)
                .then(b.since_s.total_cmp(&a.since_s))
        });
        v
    }

    /// The `/history` answer.
    pub fn history(&self) -> HistoryPage {
        HistoryPage {
            capacity: MAX_SAMPLES,
            samples: self.samples.iter().copied().collect(),
        }
    }
}

/// The book as the swarm loop and the server share it.
pub type Shared = Arc<Mutex<Book>>;

/// Locks the book even if a panicking holder poisoned it (the data are plain records).
pub fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Book> {
    match b.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub use diloco_p2p::http::StatusError;

/// The router (exposed for tests).
pub fn router(book: Shared) -> Router {
    diloco_p2p::http::with_dashboard(Router::new())
        .route(
            "/status",
            get(|State(b): State<Shared>| async move { Json(lock(&b).status()) }),
        )
        .route(
            "/peers",
            get(|State(b): State<Shared>| async move { Json(lock(&b).rows()) }),
        )
        .route(
            "/history",
            get(|State(b): State<Shared>| async move { Json(lock(&b).history()) }),
        )
        .with_state(book)
}

/// Binds `addr` and serves in the background; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, book: Shared) -> Result<SocketAddr, StatusError> {
    diloco_p2p::http::serve(addr, router(book)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_counts_connections_reservations_and_circuits() {
        let me = PeerId::random();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut book = Book::new(me);
        book.connected(a, "/ip4/127.0.0.1/tcp/1".into());
        book.connected(b, "/ip4/127.0.0.1/tcp/2".into());
        book.identified(a, &"x".repeat(500));
        book.reservation(a, true);
        book.circuit(true);
        book.circuit(true);
        book.circuit(false);
        book.disconnected(b);
        book.sample();
        let s = book.status();
        assert_eq!(s.kind, "bootstrap");
        assert_eq!(
            (s.connections, s.peers, s.reservations, s.circuits),
            (1, 2, 1, 1)
        );
        let rows = book.rows();
        assert_eq!(rows[0].peer_id, a.to_string(), "connected peers first");
        assert!(rows[0].relay);
        assert_eq!(rows[0].agent.len(), MAX_AGENT);
        assert!(!rows[1].connected);
        let h = book.history();
        assert_eq!(h.samples.len(), 1);
        assert_eq!(h.samples[0].connections, 1);
        book.reservation(a, false);
        assert_eq!(book.status().reservations, 0);
        // Closing more circuits than were opened never wraps.
        book.circuit(false);
        book.circuit(false);
        assert_eq!(book.status().circuits, 0);
    }

    #[test]
    fn the_book_stays_bounded() {
        let mut book = Book::new(PeerId::random());
        let first = PeerId::random();
        book.connected(first, String::new());
        book.disconnected(first);
        for _ in 0..MAX_PEERS + 50 {
            book.connected(PeerId::random(), String::new());
        }
        assert_eq!(book.rows().len(), MAX_PEERS);
        assert!(
            book.rows().iter().all(|r| r.peer_id != first.to_string()),
            "the disconnected peer goes first"
        );
        for _ in 0..MAX_SAMPLES + 10 {
            book.sample();
        }
        assert_eq!(book.history().samples.len(), MAX_SAMPLES);
        // An agent string cut inside a multi-byte character stays valid UTF-8.
        let p = PeerId::random();
        book.identified(p, &"é".repeat(100));
        assert!(book
            .rows()
            .iter()
            .any(|r| r.agent.len() <= MAX_AGENT && r.agent.starts_with('é')));
    }

    #[test]
    fn the_server_serves_the_page_and_what_the_book_holds() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let book: Shared = Arc::new(Mutex::new(Book::new(PeerId::random())));
        let p = PeerId::random();
        lock(&book).connected(p, "/ip4/127.0.0.1/tcp/9".into());
        lock(&book).sample();
        let addr = rt
            .block_on(serve("127.0.0.1:0".parse().unwrap(), book))
            .unwrap();
        let get = move |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let got = rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                ["/", "/status", "/peers", "/history"].map(|x| get(x))
            })
            .await
            .unwrap()
        });
        let [page, status, peers, history] = got;
        assert!(page
            .to_ascii_lowercase()
            .contains("content-security-policy"));
        assert!(page.contains("boot-view"));
        let body = |a: &str| a.split_once("\r\n\r\n").unwrap().1.to_string();
        let s: Status = serde_json::from_str(&body(&status)).unwrap();
        assert_eq!((s.kind.as_str(), s.connections), ("bootstrap", 1));
        let rows: Vec<PeerRow> = serde_json::from_str(&body(&peers)).unwrap();
        assert_eq!(rows[0].peer_id, p.to_string());
        let h: HistoryPage = serde_json::from_str(&body(&history)).unwrap();
        assert_eq!(h.samples.len(), 1);
    }
}
