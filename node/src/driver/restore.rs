//! Restoring a node from its checkpoint: the agreed state it saved (round, chain, members,
//! global parameters, outer momentum) becomes an averaging state that catches up with the run
//! through decision proofs or a state transfer; the AdamW moments go back into the replica.

use crate::runconfig::Run;
use crate::train::checkpoint::{self, CheckpointError, Loaded};
use crate::train::flat::ParamInfo;
use crate::train::worker::OPT_SUFFIXES;
use diloco_protocol::averaging::State;
use diloco_protocol::wire::{Hash, PeerKey};
use ed25519_dalek::SigningKey;
use hex::FromHex;
use std::path::Path;

/// 64 hex digits as 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    <[u8; 32]>::from_hex(s).ok()
}

/// The averaging state and the checkpoint it came from, if `dir` holds a checkpoint of `run`.
pub fn restore(
    dir: Option<&Path>,
    run: &Run,
    layout: &[ParamInfo],
    key: &SigningKey,
) -> Result<Option<(State, Loaded)>, CheckpointError> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let Some(loaded) = checkpoint::load_latest(dir, layout, &OPT_SUFFIXES)? else {
        return Ok(None);
    };
    checkpoint::check_run(&loaded, &run.json(), &[])?;
    let corrupt = |reason: &str| CheckpointError::Corrupt {
        path: loaded.path.clone(),
        reason: reason.to_string(),
    };
    let net = loaded
        .state
        .net
        .clone()
        .ok_or_else(|| corrupt("no network state (written by `train`, not `join`?)"))?;
    let chain = unhex32(&net.chain).ok_or_else(|| corrupt("bad chain hash"))?;
    let members = net
        .members
        .iter()
        .map(|m| unhex32(m).map(PeerKey))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| corrupt("bad member id"))?;
    let momentum = loaded
        .optimizer
        .get(OPT_SUFFIXES[2])
        .cloned()
        .ok_or_else(|| corrupt("no outer momentum"))?;
    let proto = run.protocol(loaded.params.len());
    let st = State::restore(
        proto,
        key.clone(),
        loaded.state.round,
        Hash(chain),
        members,
        loaded.params.clone(),
        momentum,
    );
    Ok(Some((st, loaded)))
}

/// The founder recorded in a checkpoint, if any.
pub fn founder(loaded: &Loaded) -> Option<PeerKey> {
    loaded
        .state
        .net
        .as_ref()
        .and_then(|n| unhex32(&n.founder))
        .map(PeerKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse_as_hex_and_nothing_else() {
        let h = [0xab; 32];
        assert_eq!(unhex32(&hex::encode(h)), Some(h));
        assert_eq!(unhex32(&"ab".repeat(31)), None);
        assert_eq!(unhex32(&"zz".repeat(32)), None);
        assert_eq!(unhex32(""), None);
    }
}
