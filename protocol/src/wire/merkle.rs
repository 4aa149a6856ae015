//! blake3 Merkle trees over a contributor's shard hashes (READY commits to the root; each
//! pushed shard carries its proof).

use super::Hash;

/// blake3 Merkle root over leaf hashes (the tree is padded to a power of two with zero hashes).
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    let mut level: Vec<Hash> = leaves.to_vec();
    if level.is_empty() {
        return Hash::default();
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| Hash::of_parts(&[&p[0].0, &p.get(1).copied().unwrap_or_default().0]))
            .collect();
    }
    level[0]
}

/// Sibling hashes from leaf `index` up to the root.
pub fn merkle_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let mut proof = Vec::new();
    let mut level: Vec<Hash> = leaves.to_vec();
    let mut i = index;
    while level.len() > 1 {
        proof.push(level.get(i ^ 1).copied().unwrap_or_default());
        level = level
            .chunks(2)
            .map(|p| Hash::of_parts(&[&p[0].0, &p.get(1).copied().unwrap_or_default().0]))
            .collect();
        i /= 2;
    }
    proof
}

/// Checks that `leaf` sits at `index` under `root`. Proofs longer than 64 levels are refused.
pub fn merkle_verify(root: Hash, leaf: Hash, index: usize, proof: &[Hash]) -> bool {
    if proof.len() > 64 || (proof.len() < 64 && index >> proof.len() != 0) {
        return false;
    }
    let mut h = leaf;
    for (level, sib) in proof.iter().enumerate() {
        h = if (index >> level) & 1 == 0 {
            Hash::of_parts(&[&h.0, &sib.0])
        } else {
            Hash::of_parts(&[&sib.0, &h.0])
        };
    }
    h == root
}
