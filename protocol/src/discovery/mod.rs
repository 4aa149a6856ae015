//! Discovery: who founds a run, which history wins when two meet, and when a joiner gives up.
//!
//! A sans-IO state machine beside the averaging one ([`crate::averaging::State`]): the driver
//! feeds it HELLOs, the one-second tick and "connected to a bootstrap peer", together with a
//! [`Local`] view of its averaging state (if it has one), and carries out the [`Action`]s it
//! returns; the simulator ([`sim`]) drives it the same way. It reads no clock: `now` is
//! milliseconds on the caller's clock.
//!
//! The rules (docs/PROTOCOL.md, "Discovery"):
//! * **Joining.** A node without run state that hears a HELLO from a peer holding it (synced)
//!   joins that run: it fetches the state from every synced peer it has heard.
//! * **Founding.** A node that has listened for `genesis_wait` since it reached the network
//!   (a bootstrap peer answered, or at once without bootstrap peers) and heard nobody synced
//!   founds the run at round 0 together with the `founders − 1` lowest other ids it heard
//!   recently, if its own id is among the `founders` lowest; otherwise it waits for them.
//! * **Fork choice.** Two synced nodes of one run whose histories have different founders
//!   (they founded without hearing each other) compare (members, round, lower founder id):
//!   the node whose history ranks lower abandons it and joins the other. A HELLO's claim only
//!   starts a *probe*: the node asks the claimant for a decision proof, the driver verifies it
//!   ([`crate::averaging::State::check_rival`]: a quorum of that history's members signed it,
//!   and it is not this node's own history relabelled) and reports [`Event::Verified`]; only
//!   the verified numbers are ranked. Histories older than `fork_window` rounds are never
//!   abandoned (forks are a genesis accident; past it a rival is only reported).
//! * **Giving up.** A joiner that hears no synced peer for `give_up` (the history it was
//!   joining died, say its lone founder was killed before anyone synced) drops its state and
//!   discovers again, so the peers present found the run afresh.

pub mod sim;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::averaging::{RivalHistory, Time};
use crate::wire::{Hello, PeerKey, HELLO_VERSION};

/// Most peers remembered while discovering.
pub const MAX_HEARD: usize = 4096;

/// A joiner gives up after at least this long without a synced HELLO (ms).
pub const MIN_GIVE_UP: Time = 30_000;

/// A synced node in a history at this round or later never abandons it for another.
pub const FORK_WINDOW_ROUNDS: u64 = 100;

/// Most probes of rival histories in flight.
pub const MAX_PROBES: usize = 8;

/// A peer is probed at most once per this long (ms).
pub const PROBE_RETRY: Time = 10_000;

/// Settings of discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long a node listens for a run under way before founding one (ms).
    pub genesis_wait: Time,
    /// How many of the lowest ids heard found a new run together (1: the lowest alone).
    pub founders: usize,
    /// A joiner that hears no synced peer for this long gives up (ms).
    pub give_up: Time,
    /// A peer counts as present for founding if heard within this long (ms).
    pub recent: Time,
    /// Whether this node may found the run (the admission policy lists it); one that may not
    /// waits for a synced peer to join.
    pub may_found: bool,
    /// Rounds within which a history may be abandoned for a better one ([`FORK_WINDOW_ROUNDS`]).
    pub fork_window: u64,
}

impl Config {
    /// The rules as `join` runs them: give up after twice the genesis wait (at least
    /// [`MIN_GIVE_UP`]); a peer is present if heard within half the wait (at least 3 s).
    pub fn new(genesis_wait: Time, founders: usize) -> Self {
        Config {
            genesis_wait,
            founders: founders.max(1),
            give_up: (2 * genesis_wait).max(MIN_GIVE_UP),
            recent: (genesis_wait / 2).max(3_000),
            may_found: true,
            fork_window: FORK_WINDOW_ROUNDS,
        }
    }
}

/// What discovery needs to know of the node's averaging state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// It holds the run's agreed state.
    pub synced: bool,
    /// Its round.
    pub round: u64,
    /// Members of that round.
    pub members: usize,
}

/// What discovery is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// A bootstrap peer answered: the node is on the network, the genesis wait starts.
    Bootstrapped,
    /// A HELLO whose `peer` is `from`, the authenticated gossip sender (the caller drops
    /// HELLOs that name another peer).
    Hello {
        /// The sender.
        from: PeerKey,
        /// Its HELLO.
        hello: Hello,
    },
    /// The periodic tick (the driver's is one second).
    Tick,
    /// The peer `from`, probed after [`Action::Probe`], proved its history: the driver
    /// verified its decision proof ([`crate::averaging::State::check_rival`]).
    Verified {
        /// The probed peer.
        from: PeerKey,
        /// What the proof shows.
        rival: RivalHistory,
    },
}

/// Why a discovering node does not found the run yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Lower ids are present: one of them founds.
    ForFounder(PeerKey),
    /// This node may not found the run (the admission policy does not list it): it waits for
    /// a member to join.
    ForMember,
    /// Fewer than `need` peers (this one included) are present to found together.
    ForPeers {
        /// Present, this node included.
        heard: usize,
        /// `founders`.
        need: usize,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The genesis wait started (the node reached the network).
    Started,
    /// Found the run at round 0 with these members (sorted, this node among them); the first
    /// is the founder of the new history.
    Found {
        /// The founding members.
        founders: Vec<PeerKey>,
    },
    /// Join the history of `founder`: fetch the run's state from `contacts`. With `abandon`,
    /// the node gives up a history of its own for it: votes cast in the old one say nothing
    /// about the new one, and its averaging state, timers and pending work go.
    Join {
        /// Synced peers to fetch the state from.
        contacts: Vec<PeerKey>,
        /// Founder of the history joined.
        founder: PeerKey,
        /// The node abandons its own history.
        abandon: bool,
        /// The HELLO that caused it: its round and members.
        round: u64,
        /// Members it claimed.
        members: u32,
    },
    /// A synced peer, for a joiner's averaging state to fetch from.
    Contact(PeerKey),
    /// `peer`'s HELLO claims a history of this run that ranks above this node's: ask it for
    /// the decision proof of [`crate::averaging::State::rival_probe_round`]`(round)` and
    /// report [`Event::Verified`] if it checks.
    Probe {
        /// The claimant.
        peer: PeerKey,
        /// The round it claims to be in.
        round: u64,
    },
    /// A history claiming to rank above this node's, which is past the fork window: it is not
    /// probed nor followed (reported once per founder; an operator who wants it restarts the
    /// node with an empty checkpoint directory).
    Rival {
        /// Its founder.
        founder: PeerKey,
        /// The round it claims.
        round: u64,
        /// The members it claims.
        members: u32,
    },
    /// Nobody holding the run's state was heard for `silent_ms`: drop the averaging state
    /// (it never synced) and discover again.
    GiveUp {
        /// How long it was silent.
        silent_ms: Time,
    },
    /// Not founding yet (reported once per discovery).
    Waiting(Wait),
}

#[derive(Debug, Clone)]
enum Phase {
    Discovering {
        /// When the genesis wait started; `None` until the node reached the network.
        since: Option<Time>,
        /// Peers heard: when last, and whether they were synced.
        heard: BTreeMap<PeerKey, (Time, bool)>,
        /// A [`Wait`] was reported.
        waiting_reported: bool,
    },
    /// The node has averaging state (founded, joining or restored).
    Following,
}

/// The discovery state machine of one node.
#[derive(Debug, Clone)]
pub struct Discovery {
    cfg: Config,
    me: PeerKey,
    phase: Phase,
    /// Founder of the history this node follows.
    founder: Option<PeerKey>,
    /// When a synced HELLO was last heard (or the node started joining).
    last_synced: Time,
    hello_seq: u64,
    /// Peers probed, when, and the founder their HELLO named.
    probes: BTreeMap<PeerKey, (Time, PeerKey)>,
    /// Founders of rivals reported past the fork window.
    rivals: BTreeSet<PeerKey>,
}

impl Discovery {
    /// A node with no run state. With `on_network` (no bootstrap peers to wait for) the
    /// genesis wait starts now, otherwise at [`Event::Bootstrapped`].
    pub fn new(cfg: Config, me: PeerKey, now: Time, on_network: bool) -> Self {
        Discovery {
            cfg,
            me,
            phase: Phase::Discovering {
                since: on_network.then_some(now),
                heard: BTreeMap::new(),
                waiting_reported: false,
            },
            founder: None,
            last_synced: now,
            hello_seq: 0,
            probes: BTreeMap::new(),
            rivals: BTreeSet::new(),
        }
    }

    /// A node restored from a checkpoint of the history of `founder`.
    pub fn restored(cfg: Config, me: PeerKey, now: Time, founder: Option<PeerKey>) -> Self {
        Discovery {
            phase: Phase::Following,
            founder,
            ..Self::new(cfg, me, now, true)
        }
    }

    /// Founder of the history this node follows.
    pub fn founder(&self) -> Option<PeerKey> {
        self.founder
    }

    /// Whether the node is still looking for a run (has no averaging state).
    pub fn is_discovering(&self) -> bool {
        matches!(self.phase, Phase::Discovering { .. })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The next HELLO to gossip.
    pub fn hello(&mut self, local: Option<Local>) -> Hello {
        self.hello_seq += 1;
        let l = local.unwrap_or(Local {
            synced: false,
            round: 0,
            members: 0,
        });
        Hello {
            version: HELLO_VERSION,
            peer: self.me.0,
            seq: self.hello_seq,
            synced: l.synced,
            round: l.round,
            members: u32::try_from(l.members).unwrap_or(u32::MAX),
            founder: self.founder.map(|f| f.0).unwrap_or([0; 32]),
        }
    }

    /// Handles one event; `local` is the node's averaging state, `None` while it has none.
    pub fn handle(&mut self, now: Time, ev: Event, local: Option<Local>) -> Vec<Action> {
        match ev {
            Event::Bootstrapped => match &mut self.phase {
                Phase::Discovering {
                    since: s @ None, ..
                } => {
                    *s = Some(now);
                    vec![Action::Started]
                }
                _ => Vec::new(),
            },
            Event::Hello { from, hello } => self.on_hello(now, from, hello, local),
            Event::Tick => self.on_tick(now, local),
            Event::Verified { from, rival } => self.on_verified(now, from, rival, local),
        }
    }

    fn on_hello(
        &mut self,
        now: Time,
        from: PeerKey,
        h: Hello,
        local: Option<Local>,
    ) -> Vec<Action> {
        if from.0 != h.peer || from == self.me {
            return Vec::new();
        }
        if h.synced {
            self.last_synced = now;
        }
        let theirs = PeerKey(h.founder);
        match &mut self.phase {
            Phase::Discovering { heard, .. } => {
                if heard.len() < MAX_HEARD || heard.contains_key(&from) {
                    heard.insert(from, (now, h.synced));
                }
                if !h.synced {
                    return Vec::new();
                }
                let contacts = heard
                    .iter()
                    .filter(|(_, (_, synced))| *synced)
                    .map(|(p, _)| *p)
                    .collect();
                self.follow(now, theirs);
                vec![Action::Join {
                    contacts,
                    founder: theirs,
                    abandon: false,
                    round: h.round,
                    members: h.members,
                }]
            }
            Phase::Following => {
                let Some(l) = local else { return Vec::new() };
                if !h.synced {
                    return Vec::new();
                }
                if !l.synced {
                    return vec![Action::Contact(from)];
                }
                let Some(mine) = self.founder else {
                    return Vec::new();
                };
                if theirs == mine {
                    return Vec::new();
                }
                let claim = (h.members as usize, h.round, Reverse(theirs));
                if claim <= (l.members, l.round, Reverse(mine)) {
                    return Vec::new();
                }
                self.probe(now, from, theirs, &h, l)
            }
        }
    }

    /// A claim that ranks above this node's history: probe the claimant (once per
    /// [`PROBE_RETRY`], at most [`MAX_PROBES`] at once), or report it past the fork window.
    fn probe(
        &mut self,
        now: Time,
        from: PeerKey,
        theirs: PeerKey,
        h: &Hello,
        l: Local,
    ) -> Vec<Action> {
        if l.round >= self.cfg.fork_window {
            if self.rivals.len() >= MAX_HEARD || !self.rivals.insert(theirs) {
                return Vec::new();
            }
            return vec![Action::Rival {
                founder: theirs,
                round: h.round,
                members: h.members,
            }];
        }
        if self
            .probes
            .get(&from)
            .is_some_and(|(t, _)| now < t.saturating_add(PROBE_RETRY))
        {
            return Vec::new();
        }
        self.probes
            .retain(|_, (t, _)| now < t.saturating_add(PROBE_RETRY));
        if self.probes.len() >= MAX_PROBES {
            return Vec::new();
        }
        self.probes.insert(from, (now, theirs));
        vec![Action::Probe {
            peer: from,
            round: h.round,
        }]
    }

    /// A probed peer proved its history: abandon ours for it if it ranks higher.
    fn on_verified(
        &mut self,
        now: Time,
        from: PeerKey,
        rival: RivalHistory,
        local: Option<Local>,
    ) -> Vec<Action> {
        let Some((_, theirs)) = self.probes.remove(&from) else {
            return Vec::new();
        };
        let (Phase::Following, Some(l), Some(mine)) = (&self.phase, local, self.founder) else {
            return Vec::new();
        };
        if !l.synced || theirs == mine || l.round >= self.cfg.fork_window {
            return Vec::new();
        }
        let proven = (rival.members, rival.round, Reverse(theirs));
        if proven <= (l.members, l.round, Reverse(mine)) {
            return Vec::new();
        }
        self.follow(now, theirs);
        vec![Action::Join {
            contacts: vec![from],
            founder: theirs,
            abandon: true,
            round: rival.round,
            members: u32::try_from(rival.members).unwrap_or(u32::MAX),
        }]
    }

    fn follow(&mut self, now: Time, founder: PeerKey) {
        self.phase = Phase::Following;
        self.founder = Some(founder);
        self.last_synced = now;
    }

    fn on_tick(&mut self, now: Time, local: Option<Local>) -> Vec<Action> {
        let me = self.me;
        match &mut self.phase {
            Phase::Following => {
                let silent_ms = now.saturating_sub(self.last_synced);
                if local.is_some_and(|l| !l.synced) && silent_ms > self.cfg.give_up {
                    self.founder = None;
                    self.phase = Phase::Discovering {
                        since: Some(now),
                        heard: BTreeMap::new(),
                        waiting_reported: false,
                    };
                    return vec![Action::GiveUp { silent_ms }];
                }
                Vec::new()
            }
            Phase::Discovering {
                since,
                heard,
                waiting_reported,
            } => {
                let Some(since) = *since else {
                    return Vec::new();
                };
                if now.saturating_sub(since) < self.cfg.genesis_wait {
                    return Vec::new();
                }
                let recent = self.cfg.recent;
                let mut present: Vec<PeerKey> = heard
                    .iter()
                    .filter(|(_, (t, synced))| !synced && now.saturating_sub(*t) < recent)
                    .map(|(p, _)| *p)
                    .chain(std::iter::once(me))
                    .collect();
                present.sort();
                present.dedup();
                let need = self.cfg.founders;
                let wait = if !self.cfg.may_found {
                    Wait::ForMember
                } else if present.len() >= need {
                    present.truncate(need);
                    if present.contains(&me) {
                        let founder = present[0];
                        self.phase = Phase::Following;
                        self.founder = Some(founder);
                        self.last_synced = now;
                        return vec![Action::Found { founders: present }];
                    }
                    Wait::ForFounder(present[0])
                } else {
                    Wait::ForPeers {
                        heard: present.len(),
                        need,
                    }
                };
                if *waiting_reported {
                    return Vec::new();
                }
                *waiting_reported = true;
                vec![Action::Waiting(wait)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_may_not_found_waits_for_a_member() {
        let mut cfg = Config::new(1_000, 1);
        cfg.may_found = false;
        let mut d = Discovery::new(cfg, key(1), 0, true);
        let acts = d.handle(5_000, Event::Tick, None);
        assert_eq!(acts, vec![Action::Waiting(Wait::ForMember)]);
        assert!(d.is_discovering());
        let acts = d.handle(6_000, hello(2, true, 4, 3, 2), None);
        assert!(matches!(acts.as_slice(), [Action::Join { .. }]));
    }

    fn key(b: u8) -> PeerKey {
        PeerKey([b; 32])
    }

    fn hello(from: u8, synced: bool, round: u64, members: u32, founder: u8) -> Event {
        Event::Hello {
            from: key(from),
            hello: Hello {
                version: HELLO_VERSION,
                peer: [from; 32],
                seq: 1,
                synced,
                round,
                members,
                founder: [founder; 32],
            },
        }
    }

    const SYNCED: Option<Local> = Some(Local {
        synced: true,
        round: 5,
        members: 2,
    });

    #[test]
    fn the_lowest_id_heard_founds_after_the_wait() {
        let cfg = Config::new(5_000, 1);
        let mut lo = Discovery::new(cfg, key(1), 0, true);
        let mut hi = Discovery::new(cfg, key(2), 0, true);
        for t in [1_000, 2_000, 3_000, 4_000] {
            lo.handle(t, hello(2, false, 0, 0, 0), None);
            hi.handle(t, hello(1, false, 0, 0, 0), None);
        }
        assert!(lo.handle(4_999, Event::Tick, None).is_empty());
        assert_eq!(
            lo.handle(5_000, Event::Tick, None),
            vec![Action::Found {
                founders: vec![key(1)]
            }]
        );
        assert_eq!(lo.founder(), Some(key(1)));
        assert_eq!(
            hi.handle(5_000, Event::Tick, None),
            vec![Action::Waiting(Wait::ForFounder(key(1)))]
        );
        // Reported once.
        assert!(hi.handle(6_000, Event::Tick, None).is_empty());
        // The founder's HELLO, once synced, makes the other join it.
        let a = hi.handle(6_500, hello(1, true, 0, 1, 1), None);
        assert_eq!(
            a,
            vec![Action::Join {
                contacts: vec![key(1)],
                founder: key(1),
                abandon: false,
                round: 0,
                members: 1
            }]
        );
    }

    #[test]
    fn the_wait_starts_when_the_network_is_reached() {
        let cfg = Config::new(5_000, 1);
        let mut d = Discovery::new(cfg, key(1), 0, false);
        assert!(d.handle(60_000, Event::Tick, None).is_empty());
        assert_eq!(
            d.handle(60_000, Event::Bootstrapped, None),
            vec![Action::Started]
        );
        assert!(d.handle(64_999, Event::Tick, None).is_empty());
        assert!(matches!(
            d.handle(65_000, Event::Tick, None)[..],
            [Action::Found { .. }]
        ));
    }

    #[test]
    fn several_founders_need_enough_peers() {
        let cfg = Config::new(1_000, 3);
        let mut d = Discovery::new(cfg, key(2), 0, true);
        d.handle(500, hello(1, false, 0, 0, 0), None);
        assert_eq!(
            d.handle(1_000, Event::Tick, None),
            vec![Action::Waiting(Wait::ForPeers { heard: 2, need: 3 })]
        );
        d.handle(1_500, hello(9, false, 0, 0, 0), None);
        d.handle(1_500, hello(5, false, 0, 0, 0), None);
        assert_eq!(
            d.handle(2_000, Event::Tick, None),
            vec![Action::Found {
                founders: vec![key(1), key(2), key(5)]
            }]
        );
        // The founder of the history is the lowest founding id, not this node.
        assert_eq!(d.founder(), Some(key(1)));
    }

    #[test]
    fn peers_not_heard_recently_do_not_count() {
        let cfg = Config::new(10_000, 1);
        let mut d = Discovery::new(cfg, key(5), 0, true);
        d.handle(1_000, hello(1, false, 0, 0, 0), None);
        // Heard 9 s ago > recent (5 s): key(1) is gone, this node founds.
        assert!(matches!(
            d.handle(10_000, Event::Tick, None)[..],
            [Action::Found { .. }]
        ));
    }

    /// Feeds a HELLO of peer 7 to `d`; if it probes, answers with `proven` as verified.
    fn claim_then_prove(
        d: &mut Discovery,
        claim: Event,
        proven: Option<(u64, usize)>,
    ) -> Vec<Action> {
        let a = d.handle(1, claim, SYNCED);
        match (&a[..], proven) {
            ([Action::Probe { peer, .. }], Some((round, members))) => d.handle(
                2,
                Event::Verified {
                    from: *peer,
                    rival: RivalHistory { round, members },
                },
                SYNCED,
            ),
            ([Action::Probe { .. }], None) => Vec::new(),
            _ => a,
        }
    }

    #[test]
    fn forks_resolve_by_proven_members_then_round_then_lower_founder() {
        let cfg = Config::new(1_000, 1);
        let ours_founder = 4;
        let mk = || Discovery::restored(cfg, key(9), 0, Some(key(ours_founder)));
        let join = |a: &[Action]| matches!(a, [Action::Join { abandon: true, .. }]);
        // A claim of fewer members is not even probed.
        assert!(mk().handle(1, hello(7, true, 100, 1, 3), SYNCED).is_empty());
        // A claim of more members is probed, never followed on its own.
        let mut d = mk();
        let a = d.handle(1, hello(7, true, 0, 3, 6), SYNCED);
        assert_eq!(
            a,
            vec![Action::Probe {
                peer: key(7),
                round: 0
            }]
        );
        assert_eq!(d.founder(), Some(key(ours_founder)));
        // Proven more members wins.
        let mut d = mk();
        let a = claim_then_prove(&mut d, hello(7, true, 0, 3, 6), Some((1, 3)));
        assert!(
            matches!(&a[..], [Action::Join { abandon: true, founder, .. }] if *founder == key(6))
        );
        assert_eq!(d.founder(), Some(key(6)));
        // The proof, not the claim, is ranked: a claim of 50 members proven to have 2 at round
        // 4 loses to ours (2 members, round 5).
        assert!(claim_then_prove(&mut mk(), hello(7, true, 9, 50, 3), Some((4, 2))).is_empty());
        // No answer: nothing happens.
        assert!(claim_then_prove(&mut mk(), hello(7, true, 9, 50, 3), None).is_empty());
        // Equal members: more rounds wins.
        assert!(claim_then_prove(&mut mk(), hello(7, true, 4, 2, 3), Some((4, 2))).is_empty());
        assert!(join(&claim_then_prove(
            &mut mk(),
            hello(7, true, 6, 2, 6),
            Some((6, 2))
        )));
        // Equal members and rounds: the lower founder id wins.
        assert!(join(&claim_then_prove(
            &mut mk(),
            hello(7, true, 5, 2, 3),
            Some((5, 2))
        )));
        assert!(mk().handle(1, hello(7, true, 5, 2, 6), SYNCED).is_empty());
        // The same history is never a fork; an unsynced peer is never followed.
        assert!(mk()
            .handle(1, hello(7, true, 50, 9, ours_founder), SYNCED)
            .is_empty());
        assert!(mk().handle(1, hello(7, false, 50, 9, 1), SYNCED).is_empty());
        // A proof from a peer never probed is ignored.
        let mut d = mk();
        let v = Event::Verified {
            from: key(8),
            rival: RivalHistory {
                round: 9,
                members: 9,
            },
        };
        assert!(d.handle(1, v, SYNCED).is_empty());
    }

    #[test]
    fn probes_are_bounded_and_old_histories_are_never_abandoned() {
        let cfg = Config::new(1_000, 1);
        let mut d = Discovery::restored(cfg, key(200), 0, Some(key(100)));
        // One probe per peer per PROBE_RETRY.
        assert_eq!(d.handle(0, hello(7, true, 9, 9, 1), SYNCED).len(), 1);
        assert!(d
            .handle(PROBE_RETRY - 1, hello(7, true, 9, 9, 1), SYNCED)
            .is_empty());
        assert_eq!(
            d.handle(PROBE_RETRY, hello(7, true, 9, 9, 1), SYNCED).len(),
            1
        );
        // At most MAX_PROBES at once.
        let probes: usize = (10..40)
            .map(|p| d.handle(PROBE_RETRY, hello(p, true, 9, 9, 1), SYNCED).len())
            .sum();
        assert_eq!(probes, MAX_PROBES - 1);
        // Past the fork window: a rival is reported once per founder, not probed; a late proof
        // is not followed either.
        let old = Some(Local {
            synced: true,
            round: FORK_WINDOW_ROUNDS,
            members: 2,
        });
        let mut d = Discovery::restored(cfg, key(200), 0, Some(key(100)));
        assert!(matches!(
            d.handle(1, hello(7, true, 1_000, 9, 1), old)[..],
            [Action::Rival { .. }]
        ));
        assert!(d.handle(2, hello(8, true, 1_000, 9, 1), old).is_empty());
        let mut d = Discovery::restored(cfg, key(200), 0, Some(key(100)));
        assert_eq!(d.handle(1, hello(7, true, 9, 9, 1), SYNCED).len(), 1);
        let v = Event::Verified {
            from: key(7),
            rival: RivalHistory {
                round: 9,
                members: 9,
            },
        };
        assert!(d.handle(2, v, old).is_empty());
        assert_eq!(d.founder(), Some(key(100)));
    }

    #[test]
    fn a_joiner_takes_contacts_and_gives_up_when_nobody_synced_is_heard() {
        let cfg = Config::new(5_000, 1);
        let joining = Some(Local {
            synced: false,
            round: 0,
            members: 0,
        });
        let mut d = Discovery::new(cfg, key(3), 0, true);
        d.handle(100, hello(1, true, 2, 1, 1), None);
        assert_eq!(
            d.handle(200, hello(2, true, 2, 1, 1), joining),
            vec![Action::Contact(key(2))]
        );
        assert!(d.handle(30_200, Event::Tick, joining).is_empty());
        assert_eq!(
            d.handle(30_201, Event::Tick, joining),
            vec![Action::GiveUp { silent_ms: 30_001 }]
        );
        assert!(d.is_discovering());
        assert_eq!(d.founder(), None);
        // A synced node never gives up, however quiet the network.
        let mut s = Discovery::restored(cfg, key(3), 0, Some(key(1)));
        assert!(s.handle(1_000_000, Event::Tick, SYNCED).is_empty());
    }

    #[test]
    fn hellos_that_name_another_peer_are_ignored() {
        let cfg = Config::new(1_000, 1);
        let mut d = Discovery::new(cfg, key(5), 0, true);
        let Event::Hello { hello, .. } = hello(1, true, 0, 1, 1) else {
            unreachable!()
        };
        assert!(d
            .handle(
                10,
                Event::Hello {
                    from: key(2),
                    hello
                },
                None
            )
            .is_empty());
        assert!(d.is_discovering());
    }

    #[test]
    fn hellos_carry_the_local_view() {
        let cfg = Config::new(1_000, 1);
        let mut d = Discovery::restored(cfg, key(5), 0, Some(key(2)));
        let h = d.hello(SYNCED);
        assert_eq!(
            (h.synced, h.round, h.members, h.founder),
            (true, 5, 2, [2; 32])
        );
        assert_eq!(d.hello(None).seq, 2);
    }
}
