//! raft-rs `Storage`: the log from the last checkpoint on, kept in memory. Entries are
//! appended when a Ready hands them to the WAL (raft-rs tracks which are durable);
//! owned by the raft actor and mutated only through `RawNode::mut_store`.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

pub struct RaftLog {
    hard_state: HardState,
    /// Index/term/conf state of the last checkpoint: entries up to it live only in LMDB.
    snapshot_meta: SnapshotMetadata,
    /// Entries after `snapshot_meta.index`, contiguous.
    entries: Vec<Entry>,
    /// The latest snapshot file made for followers (data = its path).
    prepared: Option<Snapshot>,
    /// Set when raft-rs asked for a snapshot newer than `prepared` (Storage::snapshot
    /// takes &self).
    snapshot_wanted: std::cell::Cell<bool>,
}

impl RaftLog {
    pub fn new(
        checkpoint_index: u64,
        checkpoint_term: u64,
        conf_state: ConfState,
        hard_state: HardState,
        entries: Vec<Entry>,
    ) -> RaftLog {
        let meta = SnapshotMetadata {
            index: checkpoint_index,
            term: checkpoint_term,
            conf_state: Some(conf_state).into(),
            ..Default::default()
        };
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.index > checkpoint_index)
            .collect();
        assert!(
            entries
                .first()
                .is_none_or(|e| e.index == checkpoint_index + 1),
            "raft log must continue right after the checkpoint"
        );
        RaftLog {
            hard_state,
            snapshot_meta: meta,
            entries,
            prepared: None,
            snapshot_wanted: std::cell::Cell::new(false),
        }
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Appends entries; an entry at an existing index truncates the log there.
    pub fn append(&mut self, ents: Vec<Entry>) {
        let Some(first) = ents.first() else { return };
        assert!(
            first.index > self.snapshot_meta.index,
            "append below checkpoint"
        );
        let keep = self.entries.partition_point(|e| e.index < first.index);
        self.entries.truncate(keep);
        assert!(
            self.entries
                .last()
                .map_or(first.index == self.snapshot_meta.index + 1, |l| l.index + 1
                    == first.index),
            "appended entries must be contiguous"
        );
        self.entries.extend(ents);
    }

    /// Forgets entries up to `index` (they are in a synced LMDB checkpoint).
    pub fn compact(&mut self, index: u64) {
        if index <= self.snapshot_meta.index || index > self.last_index_value() {
            return;
        }
        let offset = self.snapshot_meta.index + 1;
        let term = self.entries[(index - offset) as usize].term;
        let drop = self.entries.partition_point(|e| e.index <= index);
        self.entries.drain(..drop);
        self.snapshot_meta.index = index;
        self.snapshot_meta.term = term;
        assert!(self.entries.first().is_none_or(|e| e.index == index + 1));
    }

    /// The log restarts after an installed snapshot.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) {
        assert!(meta.index > 0, "empty snapshot");
        self.entries.clear();
        self.snapshot_meta = meta.clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
    }

    /// A snapshot file made from LMDB, offered to raft-rs for lagging followers.
    pub fn set_prepared_snapshot(&mut self, snap: Snapshot) {
        self.prepared = Some(snap);
        self.snapshot_wanted.set(false);
    }

    /// Whether raft-rs asked for a snapshot that is not prepared yet.
    pub fn snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.get()
    }

    pub fn conf_state(&self) -> &ConfState {
        self.snapshot_meta.get_conf_state()
    }

    pub fn last_index_value(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_meta.index, |e| e.index)
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.snapshot_meta.get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot_meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index_value() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.snapshot_meta.index + 1;
        let mut ents: Vec<Entry> =
            self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.snapshot_meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let offset = self.snapshot_meta.index + 1;
        match self.entries.get((idx - offset) as usize) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_meta.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_value())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // A snapshot must reach the log's first entry, or the follower would need
        // another one right after installing it.
        let floor = request_index.max(self.snapshot_meta.index);
        match &self.prepared {
            Some(s) if s.get_metadata().index >= floor => Ok(s.clone()),
            _ => {
                // The raft actor sees the flag and makes one off the executor; raft-rs
                // asks again on its next attempt.
                self.snapshot_wanted.set(true);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}
