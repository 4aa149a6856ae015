//! Discovery properties in the seeded simulator, each over 200 seeds: two histories founded
//! apart converge on the one the fork-choice rule ranks first (on proven numbers); a lone
//! founder killed before anyone synced leaves the others to found the run afresh; a joiner
//! whose donors vanish gives up and founds on its own; an outsider's fake HELLOs make no synced
//! node abandon its history; past the fork window a rival is reported, never followed. Replay one seed with `SEED=<seed>`.

use diloco_protocol::discovery::sim::{self, Report, Scenario};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn describe(r: &Report) -> String {
    format!(
        "histories {:?}\nnodes {:?}\nkilled {:?} settled {:?}",
        r.histories, r.nodes, r.killed, r.settled_at
    )
}

#[test]
fn two_histories_founded_apart_converge_on_the_better_one() {
    for seed in sim::seeds(200) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = 1 + (rng.next_u32() % 3) as usize;
        let b = 1 + (rng.next_u32() % 3) as usize;
        let mut sc = Scenario::new(seed, a + b);
        sc.partition = (0..a + b).map(|i| u8::from(i >= a)).collect();
        sc.start = (0..a + b)
            .map(|_| (rng.next_u32() % 2_000) as u64)
            .collect();
        let heal = 20_000 + (rng.next_u32() % 10_000) as u64;
        sc.heal_at = Some(heal);
        sc.duration = heal + 90_000;
        let r = sim::run(sc);
        let why = describe(&r);
        // Each side founded its own history before they met.
        let before: Vec<_> = r.histories.iter().filter(|h| h.founded_at < heal).collect();
        assert_eq!(before.len(), 2, "seed {seed}: {why}");
        assert_eq!(
            r.histories.len(),
            2,
            "seed {seed}: nobody founds after the heal: {why}"
        );
        let winner = r
            .agreed()
            .unwrap_or_else(|| panic!("seed {seed}: no agreement: {why}"));
        let settled = r.settled_at.unwrap_or(u64::MAX);
        assert!(
            settled <= heal + 30_000,
            "seed {seed}: settled {settled} ms, heal at {heal}: {why}"
        );
        // The rule: more members wins; at equal members, the older history (more rounds) or
        // the lower founder id.
        let side = |h: &sim::HistoryEnd| usize::from(h.founded_by >= a);
        let sizes = [a, b];
        let w = &r.histories[winner];
        let l = &r.histories[1 - winner];
        if sizes[side(w)] != sizes[side(l)] {
            assert!(
                sizes[side(w)] > sizes[side(l)],
                "seed {seed}: the smaller side won: {why}"
            );
        }
        // Every node of the losing side abandoned its history once.
        let abandons: usize = r.nodes.iter().map(|n| n.abandons).sum();
        assert_eq!(abandons, sizes[side(l)], "seed {seed}: {why}");
        assert!(
            r.nodes.iter().all(|n| n.give_ups == 0),
            "seed {seed}: {why}"
        );
    }
}

#[test]
fn a_lone_founder_killed_before_anyone_synced_leaves_the_others_to_found_again() {
    for seed in sim::seeds(200) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = 3 + (rng.next_u32() % 4) as usize;
        let mut sc = Scenario::new(seed, n);
        sc.start = (0..n).map(|_| (rng.next_u32() % 1_000) as u64).collect();
        // Joiners start joining about a second after the founding and need 6 s to sync:
        // killed 2.5 s after founding, the founder takes the run with it.
        sc.kill_founder_after = Some(2_500);
        sc.duration = 150_000;
        let give_up = sc.discovery.give_up;
        let wait = sc.discovery.genesis_wait;
        let r = sim::run(sc);
        let why = describe(&r);
        assert_eq!(r.killed.len(), 1, "seed {seed}: {why}");
        let first = &r.histories[0];
        assert_eq!(r.killed[0].1, first.founded_by, "seed {seed}: {why}");
        assert!(
            r.synced.iter().all(|&(_, _, h)| h != 0),
            "seed {seed}: somebody synced on the dead history: {why}"
        );
        let h = r
            .agreed()
            .unwrap_or_else(|| panic!("seed {seed}: no agreement: {why}"));
        assert_ne!(h, 0, "seed {seed}: {why}");
        assert_eq!(r.histories[h].members, n - 1, "seed {seed}: {why}");
        // Those that had started joining gave up, then the survivors founded afresh.
        assert!(r.nodes.iter().any(|n| n.give_ups > 0), "seed {seed}: {why}");
        let bound = first.founded_at + give_up + wait + 20_000;
        let settled = r.settled_at.unwrap_or(u64::MAX);
        assert!(
            settled <= bound,
            "seed {seed}: settled {settled} > {bound}: {why}"
        );
    }
}

#[test]
fn a_joiner_whose_donors_vanish_gives_up_and_founds_alone() {
    for seed in sim::seeds(200) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = 1 + (rng.next_u32() % 4) as usize;
        let late = k;
        let mut sc = Scenario::new(seed, k + 1);
        let joins_at = 30_000 + (rng.next_u32() % 10_000) as u64;
        sc.start = (0..k).map(|_| (rng.next_u32() % 2_000) as u64).collect();
        sc.start.push(joins_at);
        sc.kill_donors_of = Some(late);
        sc.duration = joins_at + 120_000;
        let give_up = sc.discovery.give_up;
        let wait = sc.discovery.genesis_wait;
        let r = sim::run(sc);
        let why = describe(&r);
        // Every member of the run died; the late node survived, alone.
        assert_eq!(r.killed.len(), k, "seed {seed}: {why}");
        assert!(r.nodes[late].alive, "seed {seed}: {why}");
        assert_eq!(r.nodes[late].give_ups, 1, "seed {seed}: {why}");
        let h = r
            .agreed()
            .unwrap_or_else(|| panic!("seed {seed}: no agreement: {why}"));
        assert_eq!(r.histories[h].founded_by, late, "seed {seed}: {why}");
        assert_eq!(
            r.histories[h].founder, r.nodes[late].key,
            "seed {seed}: {why}"
        );
        let bound = joins_at + give_up + wait + 20_000;
        let settled = r.settled_at.unwrap_or(u64::MAX);
        assert!(
            settled <= bound,
            "seed {seed}: settled {settled} > {bound}: {why}"
        );
    }
}

#[test]
fn an_outsiders_fake_hellos_make_no_synced_node_abandon_its_history() {
    for seed in sim::seeds(200) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = 2 + (rng.next_u32() % 4) as usize;
        let mut sc = Scenario::new(seed, n);
        // The run is founded and every node synced by 20 s; the outsider then claims a far
        // bigger history every second, which no node can see proven.
        sc.liar_from = Some(20_000 + (rng.next_u32() % 5_000) as u64);
        sc.duration = 90_000;
        let r = sim::run(sc);
        let why = describe(&r);
        assert_eq!(r.histories.len(), 1, "seed {seed}: {why}");
        assert!(r.agreed().is_some(), "seed {seed}: no agreement: {why}");
        let abandons: usize = r.nodes.iter().map(|n| n.abandons).sum();
        assert_eq!(abandons, 0, "seed {seed}: {why}");
        // Every node probed the claim (once per PROBE_RETRY), none followed it.
        assert!(r.probes >= n, "seed {seed}: {} probes: {why}", r.probes);
    }
}

#[test]
fn past_the_fork_window_a_rival_is_reported_and_not_followed() {
    for seed in sim::seeds(200) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (a, b) = (
            1 + (rng.next_u32() % 2) as usize,
            2 + (rng.next_u32() % 2) as usize,
        );
        let mut sc = Scenario::new(seed, a + b);
        sc.partition = (0..a + b).map(|i| u8::from(i >= a)).collect();
        // Rounds of 1 s and a window of 10 rounds: both histories are past it at the heal.
        sc.round_ms = 1_000;
        sc.discovery.fork_window = 10;
        let heal = 20_000;
        sc.heal_at = Some(heal);
        sc.duration = heal + 60_000;
        let r = sim::run(sc);
        let why = describe(&r);
        assert_eq!(r.histories.len(), 2, "seed {seed}: {why}");
        let abandons: usize = r.nodes.iter().map(|n| n.abandons).sum();
        assert_eq!(abandons, 0, "seed {seed}: {why}");
        assert!(
            r.rivals >= a,
            "seed {seed}: {} rivals reported: {why}",
            r.rivals
        );
        assert_eq!(r.probes, 0, "seed {seed}: {why}");
    }
}
