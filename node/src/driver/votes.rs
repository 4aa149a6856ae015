//! The durable vote record: the highest round this node signed a protocol message in, in
//! `VOTED` in the checkpoint directory, written (temp file, fsync, rename) before the message
//! leaves the node.
//!
//! A restarted node does not sign again up to that round (`State::set_vote_from`, and
//! [`VoteLog::may_sign`] here) and sends nothing but JOIN in those rounds, so redoing a round's
//! work after a restart can never look like equivocation.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// The vote record could not be read or written: the node stops rather than risk voting twice.
#[derive(Debug, Error)]
#[error("cannot record the vote in {path} (is the disk full?)")]
pub struct VoteError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The vote record of one node.
#[derive(Debug)]
pub struct VoteLog {
    path: Option<PathBuf>,
    highest: Option<u64>,
    /// Highest round signed in before this process started: nothing but JOIN is signed up to
    /// it.
    silent_until: Option<u64>,
}

impl VoteLog {
    /// Opens the record in `dir` (none without a checkpoint directory: nothing is durable).
    pub fn open(dir: Option<&Path>) -> Result<Self, VoteError> {
        let path = dir.map(|d| d.join("VOTED"));
        let highest = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(s) => s.trim().parse::<u64>().ok(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(VoteError {
                        path: p.clone(),
                        source,
                    })
                }
            },
            None => None,
        };
        Ok(Self {
            path,
            highest,
            silent_until: highest,
        })
    }

    /// The highest round voted in, before or since the restart.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// The first round this process may vote in (after the rounds voted in before it started).
    pub fn vote_from(&self) -> Option<u64> {
        self.silent_until.map(|r| r + 1)
    }

    /// Forgets every vote (after abandoning a history for another).
    pub fn reset(&mut self) -> Result<(), VoteError> {
        if let Some(p) = &self.path {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VoteError {
                        path: p.clone(),
                        source,
                    })
                }
            }
        }
        self.highest = None;
        Ok(())
    }

    /// Whether a message of `round` may be signed and sent, recording the vote first: JOIN
    /// always (it is no vote), anything else only past the rounds signed before the restart.
    pub fn may_sign(&mut self, round: u64, join: bool) -> Result<bool, VoteError> {
        if join {
            return Ok(true);
        }
        if self.silent_until.is_some_and(|r| round <= r) {
            return Ok(false);
        }
        self.record(round)?;
        Ok(true)
    }

    /// Records a vote in `round` before it is sent.
    pub fn record(&mut self, round: u64) -> Result<(), VoteError> {
        if self.highest.is_some_and(|h| h >= round) {
            return Ok(());
        }
        if let Some(p) = &self.path {
            let err = |source| VoteError {
                path: p.clone(),
                source,
            };
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(err)?;
            }
            let tmp = p.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(err)?;
                f.write_all(round.to_string().as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)?;
            }
            std::fs::rename(&tmp, p).map_err(err)?;
        }
        self.highest = Some(round);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_are_durable_and_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        assert_eq!(v.highest(), None);
        v.record(3).unwrap();
        v.record(2).unwrap();
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest(), Some(3));
        v.record(7).unwrap();
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest(), Some(7));
    }

    #[test]
    fn a_restarted_node_signs_nothing_but_join_up_to_its_last_vote() {
        let dir = tempfile::tempdir().unwrap();
        VoteLog::open(Some(dir.path())).unwrap().record(5).unwrap();
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        assert_eq!(v.vote_from(), Some(6));
        assert!(!v.may_sign(5, false).unwrap());
        assert!(!v.may_sign(4, false).unwrap());
        assert!(v.may_sign(5, true).unwrap());
        assert!(v.may_sign(6, false).unwrap());
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest(), Some(6));
    }
}
