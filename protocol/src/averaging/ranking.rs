//! Who leads and who owns what: the leader order of a round, the rendezvous-ranked shard owners
//! and backups, and the shard count, memoized per thread (every peer computes the same ones).

use std::sync::Arc;

use crate::codec;
use crate::wire::{Hash, PeerKey};

use super::Config;

/// Number of shards for a round with `members` members.
pub fn shard_count(cfg: &Config, members: usize) -> usize {
    cfg.max_shards
        .min(members)
        .min(cfg.len.div_ceil(codec::BLOCK))
        .max(1)
}

/// Owner then backup per shard, shared by the memo below.
type OwnerTable = Arc<Vec<Vec<PeerKey>>>;

thread_local! {
    // Owner and leader rankings are pure functions of (chain, peers, k); every peer of a round
    // computes the same ones, which in the simulator means n times per round in one process.
    // One memoized result per thread (keyed by a hash of all inputs) makes that one.
    static LEADERS: std::cell::RefCell<Option<(Hash, Arc<Vec<PeerKey>>)>> =
        const { std::cell::RefCell::new(None) };
    static OWNERS: std::cell::RefCell<Option<(Hash, OwnerTable)>> =
        const { std::cell::RefCell::new(None) };
}

fn inputs_key(tag: &[u8], chain: &Hash, peers: &[PeerKey], k: usize) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(tag);
    h.update(&chain.0);
    h.update(&(k as u64).to_le_bytes());
    for p in peers {
        h.update(&p.0);
    }
    Hash(*h.finalize().as_bytes())
}

/// Leader order of a round: members ranked by `blake3(chain, "close", peer)`.
pub fn leader_order(chain: &Hash, members: &[PeerKey]) -> Vec<PeerKey> {
    let key = inputs_key(b"leaders", chain, members, 0);
    if let Some(hit) = LEADERS.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }) {
        return (*hit).clone();
    }
    let mut m: Vec<(Hash, PeerKey)> = members
        .iter()
        .map(|p| (Hash::of_parts(&[&chain.0, b"close", &p.0]), *p))
        .collect();
    m.sort();
    let order: Vec<PeerKey> = m.into_iter().map(|(_, p)| p).collect();
    LEADERS.with(|c| *c.borrow_mut() = Some((key, Arc::new(order.clone()))));
    order
}

/// Owner then backups for each of `k` shards, among `servers` (sorted), rendezvous-ranked by
/// `blake3(chain, s, peer)`, at most `ceil(k / servers)` shards per owner.
pub fn shard_owners(chain: &Hash, servers: &[PeerKey], k: usize) -> Vec<Vec<PeerKey>> {
    if servers.is_empty() {
        return vec![Vec::new(); k];
    }
    let key = inputs_key(b"owners", chain, servers, k);
    if let Some(hit) = OWNERS.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }) {
        return (*hit).clone();
    }
    let cap = k.div_ceil(servers.len());
    let mut load: Vec<usize> = vec![0; servers.len()];
    let mut ranks: Vec<(Hash, usize)> = Vec::with_capacity(servers.len());
    let owners: Vec<Vec<PeerKey>> = (0..k)
        .map(|s| {
            ranks.clear();
            ranks.extend(servers.iter().enumerate().map(|(i, p)| {
                (
                    Hash::of_parts(&[&chain.0, &(s as u64).to_le_bytes(), &p.0]),
                    i,
                )
            }));
            // The owner is the best-ranked server below its cap (the best-ranked one if all
            // are full), the backup the best-ranked other one: two linear scans instead of a
            // sort (ranks are distinct hashes, so this is the order a sort would give).
            let best = |skip: Option<usize>, load: Option<&[usize]>| {
                ranks
                    .iter()
                    .filter(|(_, i)| Some(*i) != skip && load.is_none_or(|l| l[*i] < cap))
                    .min()
                    .map(|(_, i)| *i)
            };
            let owner = best(None, Some(&load))
                .or_else(|| best(None, None))
                .unwrap_or(0);
            let backup = best(Some(owner), None);
            load[owner] += 1;
            let mut out = vec![servers[owner]];
            out.extend(backup.map(|i| servers[i]));
            out
        })
        .collect();
    OWNERS.with(|c| *c.borrow_mut() = Some((key, Arc::new(owners.clone()))));
    owners
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The owner ranking as first written (full sort per shard), to check the linear-scan
    /// version and its memo against.
    fn owners_by_sorting(chain: &Hash, servers: &[PeerKey], k: usize) -> Vec<Vec<PeerKey>> {
        let cap = k.div_ceil(servers.len());
        let mut load: HashMap<PeerKey, usize> = HashMap::new();
        (0..k)
            .map(|s| {
                let mut ranked: Vec<(Hash, PeerKey)> = servers
                    .iter()
                    .map(|p| {
                        (
                            Hash::of_parts(&[&chain.0, &(s as u64).to_le_bytes(), &p.0]),
                            *p,
                        )
                    })
                    .collect();
                ranked.sort();
                let ranked: Vec<PeerKey> = ranked.into_iter().map(|(_, p)| p).collect();
                let pos = ranked
                    .iter()
                    .position(|p| load.get(p).copied().unwrap_or(0) < cap)
                    .unwrap_or(0);
                let owner = ranked[pos];
                *load.entry(owner).or_default() += 1;
                let mut out = vec![owner];
                out.extend(ranked.iter().copied().filter(|p| *p != owner).take(1));
                out
            })
            .collect()
    }

    #[test]
    fn shard_owners_match_the_sorted_ranking() {
        for n in [1usize, 2, 3, 7, 64, 300] {
            for k in [1usize, 5, 64, 256] {
                let mut servers: Vec<PeerKey> = (0..n as u32)
                    .map(|i| PeerKey(Hash::of(&(i + 1000 * n as u32).to_le_bytes()).0))
                    .collect();
                servers.sort();
                let chain = Hash::of(&[n as u8, k as u8]);
                let want = owners_by_sorting(&chain, &servers, k);
                assert_eq!(shard_owners(&chain, &servers, k), want, "n={n} k={k}");
                // Memoized second call.
                assert_eq!(shard_owners(&chain, &servers, k), want, "n={n} k={k}");
            }
        }
    }
}
