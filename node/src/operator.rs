//! The run operator's side of a reconfiguration (`diloco-node reconfig`): from a surviving
//! node's `/status` (its round, the round's chain and members, whether it is stalled) and the
//! members to keep or drop, the RECONFIG to sign with the operator key; the node it is handed
//! to checks it again, applies it and relays it to the run (docs/PROTOCOL.md, "Liveness").

use crate::driver::status::Status;
use crate::runconfig::parse_peer;
use diloco_protocol::wire::{Body, Envelope, Hash, PeerKey, Reconfig};
use ed25519_dalek::SigningKey;
use thiserror::Error;

/// Why no RECONFIG can be made.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// The node's status lacks what a RECONFIG is bound to.
    #[error(
        "the node's /status has no {0} (is it a diloco-node of this version, synced to the run?)"
    )]
    Status(&'static str),
    /// The node is not stalled: its group still decides rounds.
    #[error(
        "the node is not stalled (it reports no stalled_s): a reconfiguration is for a run that \
         lost its quorum; wait until /status shows stalled_s, or look at another survivor"
    )]
    NotStalled,
    /// A peer named is not a member of the round.
    #[error("{0} is no member of round {1}")]
    NotAMember(String, u64),
    /// A peer id did not parse.
    #[error("{0}")]
    BadPeer(String),
    /// Nobody would be left.
    #[error("no member would be left: name the survivors with --keep, or the lost with --drop")]
    Empty,
    /// Nothing would change.
    #[error(
        "every member is kept: name the lost members with --drop (or the survivors with --keep)"
    )]
    Unchanged,
}

/// A reconfiguration to sign: the round it restarts and with whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Run id.
    pub run: Hash,
    /// The stalled round.
    pub round: u64,
    /// Its chain (the RECONFIG replaces this instance).
    pub chain: Hash,
    /// The round's members now.
    pub members: Vec<PeerKey>,
    /// The members it restarts with (sorted).
    pub keep: Vec<PeerKey>,
}

fn hex32(s: &str, what: &'static str) -> Result<[u8; 32], PlanError> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).map_err(|_| PlanError::Status(what))?;
    Ok(b)
}

/// The reconfiguration of the round `status` is in that keeps `keep` (if given) or every
/// member but `drop`.
pub fn plan(status: &Status, keep: &[String], drop: &[String]) -> Result<Plan, PlanError> {
    let run = Hash(hex32(&status.run_hash, "run id")?);
    let chain = Hash(hex32(&status.chain, "chain")?);
    if status.member_ids.is_empty() {
        return Err(PlanError::Status("member list"));
    }
    let members = status
        .member_ids
        .iter()
        .map(|m| hex32(m, "member list").map(PeerKey))
        .collect::<Result<Vec<_>, _>>()?;
    if status.stalled_s.is_none() {
        return Err(PlanError::NotStalled);
    }
    let parse = |list: &[String]| -> Result<Vec<PeerKey>, PlanError> {
        list.iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let k = parse_peer(s).map_err(PlanError::BadPeer)?;
                if members.contains(&k) {
                    Ok(k)
                } else {
                    Err(PlanError::NotAMember(s.trim().to_string(), status.round))
                }
            })
            .collect()
    };
    let mut chosen = if keep.iter().any(|s| !s.trim().is_empty()) {
        parse(keep)?
    } else {
        let dropped = parse(drop)?;
        members
            .iter()
            .filter(|m| !dropped.contains(m))
            .copied()
            .collect()
    };
    chosen.sort();
    chosen.dedup();
    if chosen.is_empty() {
        return Err(PlanError::Empty);
    }
    if chosen.len() == members.len() {
        return Err(PlanError::Unchanged);
    }
    Ok(Plan {
        run,
        round: status.round,
        chain,
        members,
        keep: chosen,
    })
}

impl Plan {
    /// The RECONFIG envelope, signed with the operator key.
    pub fn sign(&self, operator: &SigningKey) -> Envelope {
        Envelope::sign(
            operator,
            self.run,
            self.round,
            self.chain,
            Body::Reconfig(Reconfig {
                members: self.keep.clone(),
            }),
        )
    }

    /// What the reconfiguration does, for the operator to read before sending it.
    pub fn describe(&self) -> String {
        let short = |k: &PeerKey| hex::encode(&k.0[..8]);
        let dropped: Vec<String> = self
            .members
            .iter()
            .filter(|m| !self.keep.contains(m))
            .map(short)
            .collect();
        format!(
            "restart round {} (chain {}) with {} of its {} members; left out: {}\n\
             The state stays the survivors' last decided one. If the members left out are alive \
             and decided this round among themselves, the run forks: reconfigure only members \
             that are gone.",
            self.round,
            hex::encode(&self.chain.0[..8]),
            self.keep.len(),
            self.members.len(),
            dropped.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> PeerKey {
        PeerKey::of(&SigningKey::from_bytes(&[i; 32]))
    }

    fn status(n: u8) -> Status {
        let mut ids: Vec<PeerKey> = (1..=n).map(key).collect();
        ids.sort();
        Status {
            run_hash: hex::encode([7u8; 32]),
            round: 12,
            chain: hex::encode([9u8; 32]),
            member_ids: ids.iter().map(|k| hex::encode(k.0)).collect(),
            stalled_s: Some(40.0),
            ..Status::default()
        }
    }

    #[test]
    fn keep_and_drop_name_the_survivors() {
        let s = status(5);
        let hexid = |i: u8| hex::encode(key(i).0);
        let p = plan(&s, &[], &[hexid(1), hexid(2), hexid(3)]).unwrap();
        let mut want = vec![key(4), key(5)];
        want.sort();
        assert_eq!(p.keep, want);
        assert_eq!(p.round, 12);
        let q = plan(&s, &[hexid(5), hexid(4), hexid(4)], &[]).unwrap();
        assert_eq!(q.keep, want);
        let env = p.sign(&SigningKey::from_bytes(&[42; 32]));
        assert!(env.verify_signature());
        assert_eq!((env.round, env.chain, env.run), (12, p.chain, p.run));
        assert!(p.describe().contains("2 of its 5 members"));
    }

    #[test]
    fn bad_plans_say_what_is_wrong() {
        let s = status(3);
        let hexid = |i: u8| hex::encode(key(i).0);
        assert_eq!(
            plan(&s, &[hexid(8)], &[]),
            Err(PlanError::NotAMember(hexid(8), 12))
        );
        assert!(matches!(
            plan(&s, &["nonsense".into()], &[]),
            Err(PlanError::BadPeer(_))
        ));
        assert_eq!(
            plan(&s, &[], &[hexid(1), hexid(2), hexid(3)]),
            Err(PlanError::Empty)
        );
        assert_eq!(plan(&s, &[], &[]), Err(PlanError::Unchanged));
        let mut live = s.clone();
        live.stalled_s = None;
        assert_eq!(plan(&live, &[], &[hexid(1)]), Err(PlanError::NotStalled));
        let mut old = s.clone();
        old.chain.clear();
        assert_eq!(
            plan(&old, &[], &[hexid(1)]),
            Err(PlanError::Status("chain"))
        );
    }
}
