//! The durable vote record: the highest round this node signed a protocol message in, in
//! `VOTED` in the checkpoint directory, written (temp file, fsync, rename) before the message
//! leaves the node.
//!
//! Kept per history of the run (by founder) and never deleted: abandoning a history for
//! another keeps the old record.
//!
//! A restarted node does not sign again up to that round (`State::set_vote_from`, and
//! [`VoteLog::may_sign`] here) and sends nothing but JOIN in those rounds, so redoing a round's
//! work after a restart can never look like equivocation.

use diloco_protocol::wire::PeerKey;
use std::collections::BTreeMap;
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

/// The vote record of one node: per history of the run (keyed by its founder), the highest
/// round signed in. Never deleted or lowered: a node that abandons its history for another
/// keeps the old history's record, and should it ever follow that history again it stays
/// silent up to it.
#[derive(Debug)]
pub struct VoteLog {
    path: Option<PathBuf>,
    /// Highest round signed in, per founder (hex of the key).
    records: BTreeMap<String, u64>,
    /// A record written before histories were told apart (a bare number): it holds for every
    /// history.
    legacy: Option<u64>,
    /// The history followed now.
    active: String,
    /// Highest round signed in the active history before it became active (in this process or
    /// an earlier one): nothing but JOIN is signed up to it.
    silent_until: Option<u64>,
}

/// The history key used before discovery has named one.
const UNKNOWN: &str = "unknown";

impl VoteLog {
    /// Opens the record in `dir` (none without a checkpoint directory: nothing is durable).
    pub fn open(dir: Option<&Path>) -> Result<Self, VoteError> {
        let path = dir.map(|d| d.join("VOTED"));
        let mut log = Self {
            path: path.clone(),
            records: BTreeMap::new(),
            legacy: None,
            active: UNKNOWN.into(),
            silent_until: None,
        };
        let Some(p) = &path else { return Ok(log) };
        let text = match std::fs::read_to_string(p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(log),
            Err(source) => {
                return Err(VoteError {
                    path: p.clone(),
                    source,
                })
            }
        };
        let bad = |line: &str| {
            VoteError {
            path: p.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable line '{line}' (expected '<founder> <round>'); the file must not be edited or deleted while the run goes on"),
            ),
        }
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.split_once(' ') {
                None => log.legacy = Some(line.parse().map_err(|_| bad(line))?),
                Some((founder, round)) => {
                    let r: u64 = round.trim().parse().map_err(|_| bad(line))?;
                    let e = log.records.entry(founder.to_string()).or_insert(r);
                    *e = (*e).max(r);
                }
            }
        }
        log.silent_until = log.current();
        Ok(log)
    }

    /// The highest round signed in the active history (or by a legacy record).
    fn current(&self) -> Option<u64> {
        let r = self.records.get(&self.active).copied();
        match (r, self.legacy) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Follows the history founded by `founder` from now on: nothing but JOIN is signed up to
    /// the highest round ever signed in it.
    pub fn switch(&mut self, founder: Option<PeerKey>) {
        self.active = founder.map_or_else(|| UNKNOWN.into(), |f| hex::encode(f.0));
        self.silent_until = self.current();
    }

    /// The highest round voted in within the active history, before or since the restart.
    pub fn highest(&self) -> Option<u64> {
        self.current()
    }

    /// The first round this node may vote in within the active history.
    pub fn vote_from(&self) -> Option<u64> {
        self.silent_until.map(|r| r + 1)
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

    /// Records a vote in `round` of the active history before it is sent.
    pub fn record(&mut self, round: u64) -> Result<(), VoteError> {
        if self.records.get(&self.active).is_some_and(|h| *h >= round) {
            return Ok(());
        }
        let mut records = self.records.clone();
        records.insert(self.active.clone(), round);
        if let Some(p) = &self.path {
            let err = |source| VoteError {
                path: p.clone(),
                source,
            };
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(err)?;
            }
            let mut text = String::new();
            if let Some(l) = self.legacy {
                text.push_str(&format!("{l}\n"));
            }
            for (f, r) in &records {
                text.push_str(&format!("{f} {r}\n"));
            }
            let tmp = p.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(err)?;
                f.write_all(text.as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)?;
            }
            std::fs::rename(&tmp, p).map_err(err)?;
        }
        self.records = records;
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

    #[test]
    fn abandoning_a_history_keeps_its_record_and_returning_to_it_stays_silent() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PeerKey([1; 32]), PeerKey([2; 32]));
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        v.switch(Some(a));
        assert!(v.may_sign(9, false).unwrap());
        // Abandon a for b: b's rounds are free, a's record stays.
        v.switch(Some(b));
        assert_eq!(v.vote_from(), None);
        assert!(v.may_sign(3, false).unwrap());
        v.switch(Some(a));
        assert_eq!(v.vote_from(), Some(10));
        assert!(!v.may_sign(9, false).unwrap());
        // Both survive a restart.
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        v.switch(Some(b));
        assert_eq!(v.vote_from(), Some(4));
        v.switch(Some(a));
        assert_eq!(v.vote_from(), Some(10));
    }

    #[test]
    fn a_legacy_record_holds_for_every_history_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("VOTED"), "7").unwrap();
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        v.switch(Some(PeerKey([5; 32])));
        assert_eq!(v.vote_from(), Some(8));
        assert!(v.may_sign(8, false).unwrap());
        let v = VoteLog::open(Some(dir.path())).unwrap();
        assert_eq!(v.vote_from(), Some(8));
        std::fs::write(dir.path().join("VOTED"), "abc def\n").unwrap();
        let e = VoteLog::open(Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("VOTED"), "{e}");
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_an_empty_one() {
        // Any read error but "not found" must stop the node: taken for an empty record, a
        // restarted node would sign again in the rounds it already voted in.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("VOTED")).unwrap();
        let e = VoteLog::open(Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("VOTED"), "{e}");
    }

    #[test]
    fn a_vote_that_cannot_be_written_is_not_signed() {
        // The record is written before the message leaves: if it cannot be (disk full, here a
        // directory where the temporary file goes), may_sign fails and nothing is recorded.
        let dir = tempfile::tempdir().unwrap();
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        v.record(2).unwrap();
        std::fs::create_dir(dir.path().join("VOTED.tmp")).unwrap();
        assert!(v.may_sign(3, false).is_err());
        assert_eq!(v.highest(), Some(2));
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest(), Some(2));
        assert!(
            v.may_sign(3, true).unwrap(),
            "a JOIN is no vote and needs no record"
        );
    }
}
