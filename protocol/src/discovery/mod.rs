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
//!   the node whose history ranks lower abandons it and joins the other.
//! * **Giving up.** A joiner that hears no synced peer for `give_up` (the history it was
//!   joining died, say its lone founder was killed before anyone synced) drops its state and
//!   discovers again, so the peers present found the run afresh.

pub mod sim;

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::averaging::Time;
use crate::wire::{Hello, PeerKey, HELLO_VERSION};

/// Most peers remembered while discovering.
pub const MAX_HEARD: usize = 4096;

/// A joiner gives up after at least this long without a synced HELLO (ms).
pub const MIN_GIVE_UP: Time = 30_000;

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
                let rank_theirs = (h.members as usize, h.round, Reverse(theirs));
                let rank_ours = (l.members, l.round, Reverse(mine));
                if rank_theirs <= rank_ours {
                    return Vec::new();
                }
                self.follow(now, theirs);
                vec![Action::Join {
                    contacts: vec![from],
                    founder: theirs,
                    abandon: true,
                    round: h.round,
                    members: h.members,
                }]
            }
        }
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

    #[test]
    fn forks_resolve_by_members_then_round_then_lower_founder() {
        let cfg = Config::new(1_000, 1);
        let ours_founder = 4;
        let mk = || Discovery::restored(cfg, key(9), 0, Some(key(ours_founder)));
        // Fewer members loses, whatever the rounds.
        assert!(mk().handle(1, hello(7, true, 100, 1, 3), SYNCED).is_empty());
        // More members wins.
        let mut d = mk();
        let a = d.handle(1, hello(7, true, 0, 3, 6), SYNCED);
        assert!(
            matches!(&a[..], [Action::Join { abandon: true, founder, .. }] if *founder == key(6))
        );
        assert_eq!(d.founder(), Some(key(6)));
        // Equal members: more rounds wins.
        assert!(mk().handle(1, hello(7, true, 4, 2, 3), SYNCED).is_empty());
        assert!(!mk().handle(1, hello(7, true, 6, 2, 6), SYNCED).is_empty());
        // Equal members and rounds: the lower founder id wins.
        assert!(!mk().handle(1, hello(7, true, 5, 2, 3), SYNCED).is_empty());
        assert!(mk().handle(1, hello(7, true, 5, 2, 6), SYNCED).is_empty());
        // The same history is never a fork; an unsynced peer is never followed.
        assert!(mk()
            .handle(1, hello(7, true, 50, 9, ours_founder), SYNCED)
            .is_empty());
        assert!(mk().handle(1, hello(7, false, 50, 9, 1), SYNCED).is_empty());
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
