//! The node's HTTP status server (axum): the live dashboard at `GET /` (one page embedded in
//! the binary, [`diloco_p2p::dashboard`]), `GET /status` as JSON, `GET /history` (the last
//! rounds, [`super::history`]), `GET /peers` (the peer table), `GET /metrics` in the
//! Prometheus text format (prometheus-client), and `POST /reconfig`, through which
//! `diloco-node reconfig` hands the node an operator-signed RECONFIG.
//!
//! The training loop writes a [`Status`] snapshot after every change; the server only reads it,
//! so a slow or hostile HTTP client can never stall training.

use super::history::{History, PeerBook, PeerRow, RoundRecord, MAX_PAGE};
use crate::net::NetStats;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use diloco_protocol::wire::{Body, Envelope};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use thiserror::Error;

/// What a node is doing, as `/status` reports it (lowercase in JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Looking for a run under way, or waiting to found one.
    #[default]
    Discovering,
    /// Fetching the run's state from peers (a joiner, or restored and catching up).
    Syncing,
    /// Training this round's inner steps.
    Training,
    /// Trained; averaging with the others.
    Averaging,
    /// Shut down.
    Stopped,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Discovering => "discovering",
            Phase::Syncing => "syncing",
            Phase::Training => "training",
            Phase::Averaging => "averaging",
            Phase::Stopped => "stopped",
        })
    }
}

/// A snapshot of the node, served as `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// libp2p peer id.
    pub peer_id: String,
    /// Run id (hex, its first 16 bytes: the topic names').
    pub run_id: String,
    /// The whole run id (64 hex digits), which every signed message carries.
    pub run_hash: String,
    /// What the node is doing.
    pub phase: Phase,
    /// Round in progress (all rounds below it are decided).
    pub round: u64,
    /// The current round's chain hash (hex): which history, and which instance of the round
    /// (a RECONFIG changes it).
    pub chain: String,
    /// The current round's members (64 hex digits each, sorted).
    pub member_ids: Vec<String>,
    /// Rounds the run's operator restarted (RECONFIG) while this node was in them.
    pub reconfigurations: u64,
    /// Global inner step at the start of the current round (`round × H`).
    pub step: u64,
    /// blake3 of the global parameters (f32 LE), as `simulate` and `train` report it.
    pub global_hash: String,
    /// blake3 of global parameters and outer momentum (what COMMITs carry).
    pub state_hash: String,
    /// Members of the current round.
    pub group_size: usize,
    /// COMMITs that decide a round in a group of `group_size` (its quorum).
    pub quorum: usize,
    /// Members the group can lose and still decide rounds (`group_size - quorum`).
    pub tolerates: usize,
    /// Seconds this node has waited for a decision since it finished training the round, once
    /// that is longer than the run's timeouts allow (fewer than a quorum of members answer);
    /// `None` while rounds are decided.
    pub stalled_s: Option<f64>,
    /// Whether this node is a member of the current round.
    pub member: bool,
    /// This node's part in the current round: `leader` (first in the round's leader order),
    /// `member`, `observer` (synced, not a member yet), `syncing` or `discovering`.
    pub role: String,
    /// Mean training loss of this node's last round.
    pub last_loss: Option<f32>,
    /// Eval loss of the global parameters after the last decided round.
    pub eval_loss: Option<f32>,
    /// Eval loss history: (round, loss).
    pub eval_history: Vec<(u64, f32)>,
    /// Application bytes sent.
    pub bytes_sent: u64,
    /// Application bytes received.
    pub bytes_received: u64,
    /// Peers connected.
    pub connected_peers: u64,
    /// Rounds decided since this process started.
    pub rounds_decided: u64,
    /// Seconds the last decided round took (from the previous decision).
    pub last_round_s: Option<f64>,
    /// Seconds from this node's READY (training done) to the decision, last round it
    /// contributed to: the averaging protocol's share of a round.
    pub last_averaging_s: Option<f64>,
    /// Messages rejected (bad signature, wrong run, malformed, ...).
    pub rejected: u64,
    /// JOINs refused by the run's admission policy (also counted in `rejected`).
    pub refused_joins: u64,
    /// Peers banned on evidence.
    pub banned: usize,
    /// Times this node abandoned its history for a better one of the same run.
    pub forks_abandoned: u64,
    /// Rejected messages by kind and reason (`"JOIN: not_allowed"`, ...), the same counts as
    /// `diloco_rejections_total{kind, reason}` in `/metrics`.
    pub rejections: std::collections::BTreeMap<String, u64>,
    /// Other histories of this run that claimed to rank above this node's past the fork
    /// window (reported, not followed).
    pub rival_histories: u64,
    /// Seconds since start.
    pub uptime_s: f64,
}

/// Prometheus metrics of a node.
#[derive(Debug, Default)]
pub struct Metrics {
    round: Gauge,
    step: Gauge,
    group_size: Gauge,
    connected_peers: Gauge,
    loss: Gauge<f64, AtomicU64>,
    eval_loss: Gauge<f64, AtomicU64>,
    round_seconds: Gauge<f64, AtomicU64>,
    stalled_seconds: Gauge<f64, AtomicU64>,
    rounds_decided: Counter,
    rejected: Counter,
    rejections: Family<Vec<(String, String)>, Counter>,
    refused_joins: Counter,
    bytes_sent: Gauge,
    bytes_received: Gauge,
}

/// What the server reads.
pub struct Shared {
    /// Latest snapshot.
    pub status: RwLock<Status>,
    /// Network counters (read at request time).
    pub net: Arc<NetStats>,
    /// The last rounds, for `/history`.
    pub history: Mutex<History>,
    /// The peers heard from, for `/peers`.
    pub peers: Mutex<PeerBook>,
    metrics: Metrics,
    registry: Registry,
    started: std::time::Instant,
    /// Requests to the running node (set once by the node when it starts).
    pub control: OnceLock<tokio::sync::mpsc::Sender<Control>>,
}

/// Most bytes `POST /reconfig` takes (a RECONFIG names at most every member).
pub const MAX_RECONFIG_BYTES: usize = 256 * 1024;

/// A request from the HTTP server to the running node.
#[derive(Debug)]
pub enum Control {
    /// Apply this RECONFIG (and relay it); the answer says what happened or why not.
    Reconfig(
        Box<Envelope>,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
}

/// Locks `m` even if a panicking holder poisoned it (the data are plain records).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("net", &self.net)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A fresh shared state.
    pub fn new(status: Status, net: Arc<NetStats>) -> Arc<Self> {
        let metrics = Metrics::default();
        let mut registry = Registry::with_prefix("diloco");
        let m = &metrics;
        registry.register("round", "Round in progress", m.round.clone());
        registry.register(
            "step",
            "Global inner step at the start of the round",
            m.step.clone(),
        );
        registry.register(
            "group_size",
            "Members of the current round",
            m.group_size.clone(),
        );
        registry.register(
            "connected_peers",
            "Connected peers",
            m.connected_peers.clone(),
        );
        registry.register(
            "train_loss",
            "Mean training loss of the last round",
            m.loss.clone(),
        );
        registry.register(
            "eval_loss",
            "Eval loss of the global parameters",
            m.eval_loss.clone(),
        );
        registry.register(
            "round_seconds",
            "Duration of the last decided round",
            m.round_seconds.clone(),
        );
        registry.register(
            "stalled_seconds",
            "Seconds without a decision beyond the run's timeouts (0: not stalled)",
            m.stalled_seconds.clone(),
        );
        registry.register(
            "rounds_decided",
            "Rounds decided since start",
            m.rounds_decided.clone(),
        );
        registry.register("rejected_messages", "Messages rejected", m.rejected.clone());
        registry.register(
            "rejections",
            "Messages rejected, by message kind and reason",
            m.rejections.clone(),
        );
        registry.register(
            "refused_joins",
            "JOINs refused by the run's admission policy",
            m.refused_joins.clone(),
        );
        registry.register("bytes_sent", "Application bytes sent", m.bytes_sent.clone());
        registry.register(
            "bytes_received",
            "Application bytes received",
            m.bytes_received.clone(),
        );
        Arc::new(Self {
            status: RwLock::new(status),
            net,
            history: Mutex::new(History::default()),
            peers: Mutex::new(PeerBook::default()),
            metrics,
            registry,
            started: std::time::Instant::now(),
            control: OnceLock::new(),
        })
    }

    /// Applies `f` to the status and refreshes the metrics from it.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = match self.status.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let decided_before = s.rounds_decided;
        let rejected_before = s.rejected;
        let refused_before = s.refused_joins;
        f(&mut s);
        let m = &self.metrics;
        m.round.set(s.round as i64);
        m.step.set(s.step as i64);
        m.group_size.set(s.group_size as i64);
        if let Some(l) = s.last_loss {
            m.loss.set(l as f64);
        }
        if let Some(l) = s.eval_loss {
            m.eval_loss.set(l as f64);
        }
        if let Some(t) = s.last_round_s {
            m.round_seconds.set(t);
        }
        m.stalled_seconds.set(s.stalled_s.unwrap_or(0.0));
        m.rounds_decided
            .inc_by(s.rounds_decided.saturating_sub(decided_before));
        m.rejected
            .inc_by(s.rejected.saturating_sub(rejected_before));
        m.refused_joins
            .inc_by(s.refused_joins.saturating_sub(refused_before));
    }

    /// Counts `n` rejected messages of `kind` (a protocol message kind, `gossip`, `direct`,
    /// `HELLO`) for `reason` (a short label, e.g. `bad_decision`): in `/status` `rejections`,
    /// in `/metrics` `diloco_rejections_total{kind, reason}` (the total `rejected` is the
    /// node's own tally). Both are static strings from a fixed set, so the label space is
    /// bounded.
    pub fn count_rejections(&self, kind: &'static str, reason: &'static str, n: u64) {
        self.metrics
            .rejections
            .get_or_create(&vec![
                ("kind".to_string(), kind.to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .inc_by(n);
        self.update(|s| {
            *s.rejections.entry(format!("{kind}: {reason}")).or_default() += n;
        });
    }

    /// Seconds since the node started (the time base of history and peer rows).
    pub fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Applies `f` to the round history.
    pub fn history(&self, f: impl FnOnce(&mut History)) {
        f(&mut lock(&self.history));
    }

    /// Applies `f` to the peer table.
    pub fn peers(&self, f: impl FnOnce(&mut PeerBook)) {
        f(&mut lock(&self.peers));
    }

    /// Records of the rounds after `since`, at most [`MAX_PAGE`].
    pub fn history_after(&self, since: Option<u64>) -> Vec<RoundRecord> {
        lock(&self.history).after(since, MAX_PAGE)
    }

    /// The peer table, heard from most recently first.
    pub fn peer_rows(&self) -> Vec<PeerRow> {
        lock(&self.peers).rows()
    }

    /// The current snapshot with live network counters.
    pub fn snapshot(&self) -> Status {
        let mut s = match self.status.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        s.bytes_sent = self.net.bytes_sent.load(Ordering::Relaxed);
        s.bytes_received = self.net.bytes_received.load(Ordering::Relaxed);
        s.connected_peers = self.net.connected.load(Ordering::Relaxed);
        s.uptime_s = self.started.elapsed().as_secs_f64();
        s
    }

    /// The Prometheus text of `/metrics`.
    pub fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        let s = self.snapshot();
        let m = &self.metrics;
        m.bytes_sent.set(s.bytes_sent as i64);
        m.bytes_received.set(s.bytes_received as i64);
        m.connected_peers.set(s.connected_peers as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

pub use diloco_p2p::http::StatusError;

/// Why `health` got no status from a node.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No connection, or the connection failed.
    #[error("no node answers on {addr}")]
    Connect {
        /// The address asked.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a successful HTTP response.
    #[error("node answered: {0}")]
    Status(String),
    /// The answer was not HTTP.
    #[error("malformed HTTP answer")]
    Malformed,
}

/// `GET /status` from the node serving on `addr` (answers of at most 1 MiB): the JSON body.
pub fn fetch(addr: SocketAddr, timeout: std::time::Duration) -> Result<String, FetchError> {
    fetch_path(addr, "/status", timeout)
}

/// `GET path` from the server on `addr` (answers of at most 1 MiB): the body.
pub fn fetch_path(
    addr: SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Result<String, FetchError> {
    request(addr, "GET", path, &[], timeout)
}

/// `POST path` with `body` to the server on `addr` (answers of at most 1 MiB): the answer's
/// body; an answer other than 200 is an error carrying its status line and body.
pub fn post_path(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<String, FetchError> {
    request(addr, "POST", path, body, timeout)
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<String, FetchError> {
    use std::io::{Read, Write};
    let io = |source| FetchError::Connect { addr, source };
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let len = if method == "GET" {
        String::new()
    } else {
        format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{len}Connection: close\r\n\r\n"
    )
    .map_err(io)?;
    s.write_all(body).map_err(io)?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(FetchError::Malformed)?;
    if !head.starts_with("HTTP/1.1 200") {
        let line = head.lines().next().unwrap_or("");
        return Err(FetchError::Status(format!("{line}: {}", body.trim())));
    }
    Ok(body.to_string())
}

/// One node's answer in a [`Survey`].
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The address asked.
    pub addr: SocketAddr,
    /// Its status, if it answered with one.
    pub status: Option<Status>,
    /// Why not, if it did not.
    pub error: Option<String>,
}

/// The status of several nodes, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Survey {
    /// Every node asked, in order.
    pub nodes: Vec<Answer>,
    /// Rounds at which nodes report different global hashes.
    pub disagree: Vec<u64>,
}

impl Survey {
    /// Asks every address for its `/status` (each within `timeout`).
    pub fn take(addrs: &[SocketAddr], timeout: std::time::Duration) -> Self {
        let nodes = addrs
            .iter()
            .map(|&addr| {
                let got = fetch(addr, timeout)
                    .map_err(|e| crate::driver::report(&e))
                    .and_then(|b| {
                        serde_json::from_str::<Status>(&b)
                            .map_err(|e| format!("not a diloco-node status: {e}"))
                    });
                match got {
                    Ok(s) => Answer {
                        addr,
                        status: Some(s),
                        error: None,
                    },
                    Err(e) => Answer {
                        addr,
                        status: None,
                        error: Some(e),
                    },
                }
            })
            .collect();
        Self::of(nodes)
    }

    /// The survey of these answers: which rounds have nodes with different hashes.
    pub fn of(nodes: Vec<Answer>) -> Self {
        let mut by_round: std::collections::BTreeMap<u64, std::collections::BTreeSet<&str>> =
            Default::default();
        for s in nodes.iter().filter_map(|a| a.status.as_ref()) {
            if !s.global_hash.is_empty() {
                by_round.entry(s.round).or_default().insert(&s.global_hash);
            }
        }
        let disagree = by_round
            .into_iter()
            .filter(|(_, h)| h.len() > 1)
            .map(|(r, _)| r)
            .collect();
        Survey { nodes, disagree }
    }

    /// Every node answered and no two at one round disagree.
    pub fn ok(&self) -> bool {
        self.disagree.is_empty() && self.nodes.iter().all(|a| a.status.is_some())
    }

    /// A table: one line per node, then what is wrong, if anything.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<21} {:<11} {:>6} {:>6} {:>9} {:>9} {:<16} {}\n",
            "node", "phase", "round", "group", "loss", "eval", "global hash", "peer"
        );
        let loss = |l: Option<f32>| l.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
        for a in &self.nodes {
            match &a.status {
                Some(s) => {
                    let flag = if self.disagree.contains(&s.round) {
                        " DIFFERS"
                    } else {
                        ""
                    };
                    let hash = &s.global_hash[..16.min(s.global_hash.len())];
                    let peer = &s.peer_id[s.peer_id.len().saturating_sub(8)..];
                    out.push_str(&format!(
                        "{:<21} {:<11} {:>6} {:>6} {:>9} {:>9} {:<16} {peer}{flag}\n",
                        a.addr.to_string(),
                        s.phase.to_string(),
                        s.round,
                        s.group_size,
                        loss(s.last_loss),
                        loss(s.eval_loss),
                        if hash.is_empty() { "-" } else { hash },
                    ));
                }
                None => out.push_str(&format!(
                    "{:<21} no answer: {}\n",
                    a.addr.to_string(),
                    a.error.as_deref().unwrap_or("")
                )),
            }
        }
        for r in &self.disagree {
            out.push_str(&format!(
                "nodes at round {r} report different global parameters\n"
            ));
        }
        out
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(shared.snapshot())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.render_metrics() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// What `/history` answers: the rounds after `since`, and the cap of the ring buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Rounds the node keeps at most.
    pub capacity: usize,
    /// The records, oldest first.
    pub rounds: Vec<RoundRecord>,
}

/// `since=R` from a query string; anything else is ignored.
fn since(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| v.parse().ok())
}

async fn history(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Json<HistoryPage> {
    Json(HistoryPage {
        capacity: super::history::HISTORY_ROUNDS,
        rounds: shared.history_after(since(q.as_deref())),
    })
}

async fn peers(State(shared): State<Arc<Shared>>) -> Json<Vec<PeerRow>> {
    Json(shared.peer_rows())
}

/// `POST /reconfig`: the body is a signed RECONFIG envelope (its wire bytes); the node
/// checks it against its current round (the run's operator key, round, chain, members),
/// applies and relays it, and answers 200 with what it did, or 409 with why not.
async fn reconfig(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let env = match Envelope::from_bytes(&body) {
        Ok(e) => e,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "not a signed protocol message ({e}); make one with `diloco-node reconfig`\n"
                ),
            )
        }
    };
    if !matches!(env.body, Body::Reconfig(_)) {
        return (
            StatusCode::BAD_REQUEST,
            format!("a {} message, not a RECONFIG\n", env.body.kind()),
        );
    }
    let Some(tx) = shared.control.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is not taking part in a run\n".into(),
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx
        .try_send(Control::Reconfig(Box::new(env), reply))
        .is_err()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is busy or stopping; try again\n".into(),
        );
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), answer).await {
        Ok(Ok(Ok(done))) => (StatusCode::OK, format!("{done}\n")),
        Ok(Ok(Err(why))) => (StatusCode::CONFLICT, format!("refused: {why}\n")),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node did not answer in time\n".into(),
        ),
    }
}

/// The router (exposed for tests).
pub fn router(shared: Arc<Shared>) -> Router {
    diloco_p2p::http::with_dashboard(Router::new())
        .route("/history", get(history))
        .route("/peers", get(peers))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/reconfig",
            post(reconfig).layer(DefaultBodyLimit::max(MAX_RECONFIG_BYTES)),
        )
        .with_state(shared)
}

/// Binds `addr` and serves in the background; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr, StatusError> {
    diloco_p2p::http::serve(addr, router(shared)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(port: u16, round: u64, hash: &str) -> Answer {
        Answer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            status: Some(Status {
                round,
                global_hash: hash.into(),
                phase: Phase::Averaging,
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_survey_flags_different_hashes_at_one_round_only() {
        let same = Survey::of(vec![
            answer(1, 4, "aa"),
            answer(2, 4, "aa"),
            answer(3, 5, "bb"),
        ]);
        assert!(same.ok(), "{}", same.table());
        let forked = Survey::of(vec![
            answer(1, 4, "aa"),
            answer(2, 4, "cc"),
            answer(3, 5, "bb"),
        ]);
        assert_eq!(forked.disagree, vec![4]);
        assert!(!forked.ok());
        assert!(forked.table().contains("DIFFERS"), "{}", forked.table());
        // A node that is still syncing has no hash to compare.
        assert!(Survey::of(vec![answer(1, 4, "aa"), answer(2, 4, "")]).ok());
        let mut silent = answer(9, 0, "");
        silent.status = None;
        silent.error = Some("no node answers".into());
        let s = Survey::of(vec![answer(1, 4, "aa"), silent]);
        assert!(!s.ok());
        assert!(
            s.table().contains("no answer: no node answers"),
            "{}",
            s.table()
        );
    }

    #[test]
    fn a_survey_reads_what_a_node_serves() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let shared = Shared::new(Status::default(), Arc::new(NetStats::default()));
        shared.update(|s| {
            s.round = 7;
            s.phase = Phase::Training;
            s.global_hash = "0123456789abcdef0123".into();
        });
        let addr = rt
            .block_on(serve("127.0.0.1:0".parse().unwrap(), shared))
            .unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let survey = rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                Survey::take(&[addr, gone], std::time::Duration::from_secs(5))
            })
            .await
            .unwrap()
        });
        let s = survey.nodes[0].status.as_ref().expect("the node answered");
        assert_eq!((s.round, s.phase), (7, Phase::Training));
        assert!(survey.nodes[1].status.is_none());
        assert!(!survey.ok());
        assert!(
            survey.table().contains("0123456789abcdef"),
            "{}",
            survey.table()
        );
    }

    /// The raw HTTP answer (head and body) to `GET path`.
    fn raw_get(addr: SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn since_reads_only_a_number() {
        assert_eq!(since(Some("since=12")), Some(12));
        assert_eq!(since(Some("x=1&since=3")), Some(3));
        assert_eq!(since(Some("since=-1")), None);
        assert_eq!(since(Some("since=99999999999999999999999")), None);
        assert_eq!(since(Some("")), None);
        assert_eq!(since(None), None);
    }

    #[test]
    fn the_server_serves_the_dashboard_history_and_peers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let shared = Shared::new(Status::default(), Arc::new(NetStats::default()));
        shared.history(|h| {
            for r in 0..5 {
                h.decided(
                    RoundRecord {
                        round: r,
                        members: 3,
                        ..RoundRecord::default()
                    },
                    100 * (r + 1),
                    0,
                );
            }
        });
        shared.peers(|b| b.seen("12D3KooWx", 1.0, Some(4)));
        let addr = rt
            .block_on(serve("127.0.0.1:0".parse().unwrap(), shared))
            .unwrap();
        let got = rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                [
                    "/",
                    "/dashboard.js",
                    "/dashboard.css",
                    "/history?since=2",
                    "/peers",
                ]
                .map(|p| raw_get(addr, p))
            })
            .await
            .unwrap()
        });
        let [page, js, css, hist, peers] = got;
        for (answer, ty) in [
            (&page, "text/html"),
            (&js, "text/javascript"),
            (&css, "text/css"),
        ] {
            let head = answer
                .split("\r\n\r\n")
                .next()
                .unwrap()
                .to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains(&format!("content-type: {ty}")), "{head}");
            assert!(
                head.contains("content-security-policy: default-src 'none'"),
                "{head}"
            );
        }
        assert!(page.contains("<svg id=\"chart-loss\""));
        let body = |a: &str| a.split_once("\r\n\r\n").unwrap().1.to_string();
        let h: HistoryPage = serde_json::from_str(&body(&hist)).unwrap();
        let rounds: Vec<u64> = h.rounds.iter().map(|r| r.round).collect();
        assert_eq!(rounds, vec![3, 4]);
        assert_eq!(h.rounds[1].bytes_sent, 100);
        let p: Vec<PeerRow> = serde_json::from_str(&body(&peers)).unwrap();
        assert_eq!((p.len(), p[0].round), (1, Some(4)));
    }
}
