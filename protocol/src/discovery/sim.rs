//! A seeded discrete-event simulator of discovery: many nodes running [`Discovery`] exactly as
//! the driver runs it (HELLO every second, the tick, bootstrap contact), over a lossy network
//! with delays, partitions that heal, and kills.
//!
//! The averaging layer under discovery is modelled by the three facts discovery reads of it
//! ([`Local`]): a founder is synced at once; a joiner syncs `sync_ms` after it starts joining
//! if one of its contacts is then alive, reachable and synced on the history it joined (and
//! retries every `sync_ms` otherwise, as a state request does); a history's round advances
//! every `round_ms` from its founding and its members are its synced live nodes. The
//! averaging protocol itself has its own simulator ([`crate::sim`]).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Action, Config, Discovery, Event, Local};
use crate::averaging::{RivalHistory, Time};
use crate::wire::{Hello, PeerKey};

/// A scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Seed of keys, delays, losses and tick phases.
    pub seed: u64,
    /// When each node starts (ms); one entry per node.
    pub start: Vec<Time>,
    /// Each node's network partition until `heal_at` (nodes hear only their own partition).
    pub partition: Vec<u8>,
    /// When every partition joins one network.
    pub heal_at: Option<Time>,
    /// Discovery settings of every node.
    pub discovery: Config,
    /// A history's round length (ms).
    pub round_ms: Time,
    /// How long a joiner takes to fetch and verify the state (ms).
    pub sync_ms: Time,
    /// Probability that one HELLO to one node is lost.
    pub loss: f64,
    /// Largest gossip delay (ms); delays are uniform in 5..=max.
    pub max_delay: Time,
    /// How long to simulate (ms).
    pub duration: Time,
    /// Kill the first node that founds a run this long after it founded.
    pub kill_founder_after: Option<Time>,
    /// When this node starts joining a run, kill every synced node `sync_ms / 4` later (its
    /// donors vanish before it synced).
    pub kill_donors_of: Option<usize>,
    /// From this time on, an outsider gossips a fake HELLO every second to every node: synced,
    /// a far later round, many members, a founder of its own; it never proves the claim.
    pub liar_from: Option<Time>,
}

impl Scenario {
    /// `n` nodes starting at 0 on one network, genesis wait 5 s, one founder, rounds of 3 s,
    /// joiners sync in 6 s, 5% loss, up to 200 ms delay, two minutes.
    pub fn new(seed: u64, n: usize) -> Self {
        Scenario {
            seed,
            start: vec![0; n],
            partition: vec![0; n],
            heal_at: None,
            discovery: Config::new(5_000, 1),
            round_ms: 3_000,
            sync_ms: 6_000,
            loss: 0.05,
            max_delay: 200,
            duration: 120_000,
            kill_founder_after: None,
            kill_donors_of: None,
            liar_from: None,
        }
    }
}

/// One node at the end of a run.
#[derive(Debug, Clone)]
pub struct NodeEnd {
    /// Its key.
    pub key: PeerKey,
    /// Still running.
    pub alive: bool,
    /// Synced on a history.
    pub synced: bool,
    /// The history it follows (index into [`Report::histories`]).
    pub history: Option<usize>,
    /// Times it gave up joining.
    pub give_ups: usize,
    /// Times it abandoned its history for another.
    pub abandons: usize,
}

/// A history of the run (one founding).
#[derive(Debug, Clone)]
pub struct HistoryEnd {
    /// Its founder.
    pub founder: PeerKey,
    /// When it was founded.
    pub founded_at: Time,
    /// The node that founded it.
    pub founded_by: usize,
    /// Its synced live members at the end.
    pub members: usize,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every node.
    pub nodes: Vec<NodeEnd>,
    /// Every history founded, in order.
    pub histories: Vec<HistoryEnd>,
    /// Since when every started live node has been synced on one history (`None`: not at the
    /// end).
    pub settled_at: Option<Time>,
    /// Nodes killed, with when.
    pub killed: Vec<(Time, usize)>,
    /// Node, history and when, each time a joiner synced.
    pub synced: Vec<(Time, usize, usize)>,
    /// Probes of rival histories sent.
    pub probes: usize,
    /// Rivals reported past the fork window.
    pub rivals: usize,
}

impl Report {
    /// The history every live node ended on, if they all ended synced on one.
    pub fn agreed(&self) -> Option<usize> {
        let mut live = self.nodes.iter().filter(|n| n.alive);
        let first = live.next()?;
        let h = first.history.filter(|_| first.synced)?;
        live.all(|n| n.synced && n.history == Some(h)).then_some(h)
    }
}

#[derive(Debug, Clone)]
struct Avg {
    history: Option<usize>,
    synced: bool,
    target: PeerKey,
    contacts: BTreeSet<PeerKey>,
}

struct Node {
    key: PeerKey,
    alive: bool,
    started: bool,
    disc: Discovery,
    avg: Option<Avg>,
    partition: u8,
    give_ups: usize,
    abandons: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Start(usize),
    Bootstrapped(usize),
    Tick(usize),
    Deliver {
        to: usize,
        from: usize,
        hello: HelloBytes,
    },
    TrySync(usize),
    /// Node `from` answers node `to`'s probe (sent when `from` claimed round `claimed`).
    Prove {
        to: usize,
        from: usize,
        claimed: u64,
    },
    /// The outsider's HELLO round.
    Liar,
    Kill(usize),
    KillSynced,
    Heal,
}

/// A HELLO in flight, ordered for the event queue.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HelloBytes(Vec<u8>);

struct World {
    sc: Scenario,
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    histories: Vec<HistoryEnd>,
    queue: BinaryHeap<Reverse<(Time, u64, Ev)>>,
    seq: u64,
    now: Time,
    killed: Vec<(Time, usize)>,
    synced: Vec<(Time, usize, usize)>,
    founder_killed: bool,
    probes: usize,
    rivals: usize,
}

impl World {
    fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, ev)));
    }

    fn uniform(&mut self, lo: Time, hi: Time) -> Time {
        lo + self.rng.next_u64() % (hi - lo + 1)
    }

    fn round_of(&self, h: usize) -> u64 {
        (self.now - self.histories[h].founded_at) / self.sc.round_ms.max(1)
    }

    fn members_of(&self, h: usize) -> usize {
        self.nodes
            .iter()
            .filter(|n| {
                n.alive
                    && n.avg
                        .as_ref()
                        .is_some_and(|a| a.synced && a.history == Some(h))
            })
            .count()
    }

    fn local(&self, i: usize) -> Option<Local> {
        let a = self.nodes[i].avg.as_ref()?;
        Some(match (a.synced, a.history) {
            (true, Some(h)) => Local {
                synced: true,
                round: self.round_of(h),
                members: self.members_of(h),
            },
            _ => Local {
                synced: false,
                round: 0,
                members: 0,
            },
        })
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].partition == self.nodes[b].partition
    }

    fn feed(&mut self, i: usize, ev: Event) {
        let local = self.local(i);
        let now = self.now;
        let actions = self.nodes[i].disc.handle(now, ev, local);
        for a in actions {
            self.act(i, a);
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        match a {
            Action::Started | Action::Waiting(_) => {}
            Action::Found { founders } => {
                // Founders that found together share one history: the first creates it.
                let founder = founders[0];
                let existing = self.histories.iter().rposition(|h| {
                    h.founder == founder && self.now.saturating_sub(h.founded_at) < 10_000
                });
                let h = match existing.filter(|_| founders.len() > 1) {
                    Some(h) => h,
                    None => {
                        self.histories.push(HistoryEnd {
                            founder,
                            founded_at: self.now,
                            founded_by: i,
                            members: 0,
                        });
                        if let (Some(after), false) =
                            (self.sc.kill_founder_after, self.founder_killed)
                        {
                            self.founder_killed = true;
                            self.at(self.now + after, Ev::Kill(i));
                        }
                        self.histories.len() - 1
                    }
                };
                self.nodes[i].avg = Some(Avg {
                    history: Some(h),
                    synced: true,
                    target: founder,
                    contacts: BTreeSet::new(),
                });
            }
            Action::Join {
                contacts,
                founder,
                abandon,
                ..
            } => {
                if abandon {
                    self.nodes[i].abandons += 1;
                }
                self.nodes[i].avg = Some(Avg {
                    history: None,
                    synced: false,
                    target: founder,
                    contacts: contacts.into_iter().collect(),
                });
                let t = self.now + self.sc.sync_ms;
                self.at(t, Ev::TrySync(i));
                if self.sc.kill_donors_of == Some(i) {
                    self.sc.kill_donors_of = None;
                    let t = self.now + self.sc.sync_ms / 4;
                    self.at(t, Ev::KillSynced);
                }
            }
            Action::Probe { peer, round } => {
                self.probes += 1;
                if let Some(j) = self.nodes.iter().position(|n| n.key == peer) {
                    let t = self.now + self.uniform(10, 2 * self.sc.max_delay.max(5));
                    self.at(
                        t,
                        Ev::Prove {
                            to: i,
                            from: j,
                            claimed: round,
                        },
                    );
                }
            }
            Action::Rival { .. } => self.rivals += 1,
            Action::Contact(p) => {
                if let Some(a) = &mut self.nodes[i].avg {
                    if a.contacts.len() < 64 {
                        a.contacts.insert(p);
                    }
                }
            }
            Action::GiveUp { .. } => {
                self.nodes[i].avg = None;
                self.nodes[i].give_ups += 1;
            }
        }
    }

    /// Node `j` proves its history to `i` if it is alive, reachable and synced on another
    /// history than `i`'s: what `State::check_rival` would verify from its decision proof.
    fn prove(&mut self, i: usize, j: usize, claimed: u64) {
        let (Some(mine), Some(theirs)) = (self.local(i), self.local(j)) else {
            return;
        };
        let hist = |k: usize| self.nodes[k].avg.as_ref().and_then(|a| a.history);
        if !self.nodes[j].alive
            || !self.reachable(i, j)
            || !mine.synced
            || !theirs.synced
            || hist(i) == hist(j)
        {
            return;
        }
        // The proof of round `rival_probe_round(claimed)`, if `j` has decided it.
        let probe = if claimed > mine.round {
            mine.round
        } else {
            match claimed.checked_sub(1) {
                Some(r) => r,
                None => return,
            }
        };
        if probe >= theirs.round {
            return;
        }
        let rival = RivalHistory {
            round: probe + 1,
            members: theirs.members,
        };
        let from = self.nodes[j].key;
        self.feed(i, Event::Verified { from, rival });
    }

    fn liar(&mut self) {
        let mut key = [0u8; 32];
        key[0] = 0xee;
        let hello = Hello {
            version: crate::wire::HELLO_VERSION,
            peer: key,
            seq: self.now,
            synced: true,
            round: 1_000_000,
            members: 10_000,
            founder: [0; 32],
        };
        for to in 0..self.nodes.len() {
            if self.nodes[to].alive && self.nodes[to].started {
                let h = hello.clone();
                self.feed(
                    to,
                    Event::Hello {
                        from: PeerKey(key),
                        hello: h,
                    },
                );
            }
        }
        self.at(self.now + 1_000, Ev::Liar);
    }

    fn try_sync(&mut self, i: usize) {
        let Some(a) = self.nodes[i].avg.clone() else {
            return;
        };
        if a.synced || !self.nodes[i].alive {
            return;
        }
        let donor = (0..self.nodes.len()).find_map(|j| {
            let n = &self.nodes[j];
            let d = n.avg.as_ref()?;
            let h = d.history?;
            (n.alive
                && d.synced
                && a.contacts.contains(&n.key)
                && self.reachable(i, j)
                && self.histories[h].founder == a.target)
                .then_some(h)
        });
        match donor {
            Some(h) => {
                if let Some(a) = &mut self.nodes[i].avg {
                    a.synced = true;
                    a.history = Some(h);
                }
                self.synced.push((self.now, i, h));
            }
            None => {
                let t = self.now + self.sc.sync_ms;
                self.at(t, Ev::TrySync(i));
            }
        }
    }

    fn tick(&mut self, i: usize) {
        let local = self.local(i);
        let hello = self.nodes[i].disc.hello(local);
        let bytes = match hello.to_bytes() {
            Ok(b) => b,
            Err(_) => unreachable!("a HELLO always encodes"),
        };
        for j in 0..self.nodes.len() {
            if j == i || !self.nodes[j].alive || !self.nodes[j].started || !self.reachable(i, j) {
                continue;
            }
            if (self.rng.next_u64() as f64 / u64::MAX as f64) < self.sc.loss {
                continue;
            }
            let t = self.now + self.uniform(5, self.sc.max_delay.max(5));
            self.at(
                t,
                Ev::Deliver {
                    to: j,
                    from: i,
                    hello: HelloBytes(bytes.clone()),
                },
            );
        }
        self.feed(i, Event::Tick);
        self.at(self.now + 1_000, Ev::Tick(i));
    }

    fn settled(&self) -> bool {
        let mut live = self.nodes.iter().filter(|n| n.alive && n.started);
        let Some(first) = live.next() else {
            return false;
        };
        let Some(h) = first
            .avg
            .as_ref()
            .filter(|a| a.synced)
            .and_then(|a| a.history)
        else {
            return false;
        };
        live.all(|n| {
            n.avg
                .as_ref()
                .is_some_and(|a| a.synced && a.history == Some(h))
        })
    }
}

/// Keys of `n` nodes for `seed` (random order).
pub fn keys(seed: u64, n: usize) -> Vec<PeerKey> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b65_7973);
    (0..n)
        .map(|_| {
            let mut k = [0u8; 32];
            rng.fill_bytes(&mut k);
            PeerKey(k)
        })
        .collect()
}

/// Runs a scenario.
pub fn run(sc: Scenario) -> Report {
    let n = sc.start.len();
    let keys = keys(sc.seed, n);
    let nodes = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Node {
            key: *k,
            alive: true,
            started: false,
            disc: Discovery::new(sc.discovery, *k, 0, false),
            avg: None,
            partition: sc.partition.get(i).copied().unwrap_or(0),
            give_ups: 0,
            abandons: 0,
        })
        .collect();
    let mut w = World {
        rng: ChaCha8Rng::seed_from_u64(sc.seed),
        sc,
        nodes,
        histories: Vec::new(),
        queue: BinaryHeap::new(),
        seq: 0,
        now: 0,
        killed: Vec::new(),
        synced: Vec::new(),
        founder_killed: false,
        probes: 0,
        rivals: 0,
    };
    for i in 0..n {
        let t = w.sc.start[i];
        w.at(t, Ev::Start(i));
    }
    if let Some(t) = w.sc.heal_at {
        w.at(t, Ev::Heal);
    }
    if let Some(t) = w.sc.liar_from {
        w.at(t, Ev::Liar);
    }
    let mut settled_at = None;
    while let Some(Reverse((t, _, ev))) = w.queue.pop() {
        if t > w.sc.duration {
            break;
        }
        w.now = t;
        match ev {
            Ev::Start(i) => {
                w.nodes[i].started = true;
                w.nodes[i].disc = Discovery::new(w.sc.discovery, w.nodes[i].key, t, false);
                let d = w.uniform(10, 500);
                w.at(t + d, Ev::Bootstrapped(i));
                let phase = w.uniform(0, 999);
                w.at(t + phase, Ev::Tick(i));
            }
            Ev::Bootstrapped(i) if w.nodes[i].alive => w.feed(i, Event::Bootstrapped),
            Ev::Tick(i) if w.nodes[i].alive => w.tick(i),
            Ev::Deliver { to, from, hello } if w.nodes[to].alive => {
                if let Ok(h) = Hello::from_bytes(&hello.0) {
                    let from = w.nodes[from].key;
                    w.feed(to, Event::Hello { from, hello: h });
                }
            }
            Ev::TrySync(i) => w.try_sync(i),
            Ev::Prove { to, from, claimed } if w.nodes[to].alive => w.prove(to, from, claimed),
            Ev::Liar => w.liar(),
            Ev::Kill(i) => {
                if w.nodes[i].alive {
                    w.nodes[i].alive = false;
                    w.killed.push((t, i));
                }
            }
            Ev::KillSynced => {
                for i in 0..w.nodes.len() {
                    let synced = w.nodes[i].avg.as_ref().is_some_and(|a| a.synced);
                    if w.nodes[i].alive && synced {
                        w.nodes[i].alive = false;
                        w.killed.push((t, i));
                    }
                }
            }
            Ev::Heal => {
                for node in &mut w.nodes {
                    node.partition = 0;
                }
            }
            _ => {}
        }
        match (w.settled(), settled_at) {
            (true, None) => settled_at = Some(t),
            (false, Some(_)) => settled_at = None,
            _ => {}
        }
    }
    w.now = w.now.max(w.sc.duration);
    let members: Vec<usize> = (0..w.histories.len()).map(|h| w.members_of(h)).collect();
    for (h, m) in w.histories.iter_mut().zip(members) {
        h.members = m;
    }
    Report {
        nodes: w
            .nodes
            .iter()
            .map(|n| NodeEnd {
                key: n.key,
                alive: n.alive,
                synced: n.avg.as_ref().is_some_and(|a| a.synced),
                history: n.avg.as_ref().and_then(|a| a.history),
                give_ups: n.give_ups,
                abandons: n.abandons,
            })
            .collect(),
        histories: w.histories,
        settled_at,
        killed: w.killed,
        synced: w.synced,
        probes: w.probes,
        rivals: w.rivals,
    }
}

/// `n` seeds for property runs, as the averaging simulator takes them (`SEEDS=n` to change
/// the count, `SEED=n` to replay one).
pub fn seeds(n: u64) -> Vec<u64> {
    crate::sim::seeds(n)
}
