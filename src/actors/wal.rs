//! WAL actor: appends each ready's entries and hard state to O_DIRECT, preallocated,
//! zero-filled segments and issues ONE fdatasync per batch (group commit). Whatever
//! arrives while a write + fdatasync runs waits in the mailbox and forms the next batch.

use super::{BoxStream, Persisted, ToWal};
use crate::model::WalStats;
use crate::storage::wal::{self as format, Recovered, Segment};
use futures::{FutureExt, StreamExt};
use glommio::channels::shared_channel::ConnectedSender;
use glommio::io::{DmaFile, OpenOptions};
use glommio::task::JoinHandle;
use hdrhistogram::Histogram;
use raft::eraftpb::HardState;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

const BLOCK_BYTES: u64 = 4096;
/// Messages per batch are bounded so one batch never monopolizes the disk.
const MAX_BATCH_MESSAGES: usize = 1024;
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Pause between zeroing chunks: 64 MiB takes ~0.2 s more, and WAL writes get the disk.
const ZERO_PACING: std::time::Duration = std::time::Duration::from_millis(2);

/// How a batch is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Segments are opened O_DSYNC: a completed write is durable (FUA or write+flush
    /// inside the kernel). Through io_uring this is one operation, where a separate
    /// fdatasync is punted to a worker thread (~60 µs more per batch on the dev VM).
    Dsync,
    /// Write, then fdatasync.
    Fdatasync,
}

impl SyncMode {
    pub fn parse(s: &str) -> SyncMode {
        if s == "fdatasync" {
            SyncMode::Fdatasync
        } else {
            SyncMode::Dsync
        }
    }
    fn open_flags(self) -> i32 {
        match self {
            SyncMode::Dsync => libc::O_DSYNC,
            SyncMode::Fdatasync => 0,
        }
    }
}

pub struct WalActor {
    dir: PathBuf,
    sync: SyncMode,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    file: DmaFile,
    /// Logical end of written records in the current segment.
    offset: u64,
    /// Bytes of the current partial block (rewritten with the next batch: O_DIRECT
    /// writes whole blocks).
    tail: Vec<u8>,
    next_segment: Option<JoinHandle<std::io::Result<(DmaFile, PathBuf)>>>,
    hard_state: HardState,
    stats: WalStats,
    fsync_us: Histogram<u64>,
    /// When group-commit statistics were last logged, and the batch count then.
    logged: (Instant, u64),
}

/// How often group-commit statistics go to the log while writes flow.
const STATS_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    // An unwritable WAL cannot acknowledge anything; etcd panics here too (fsyncgate:
    // retrying fsync after a failure can silently lose data).
    tracing::error!("wal: {what}: {e}; stopping");
    eprintln!("corekv: fatal: wal: {what}: {e}");
    std::process::exit(2)
}

/// Creates `<seq>.tmp`, fills it with zeros and syncs it, so later syncs never allocate
/// blocks or extend the file (4 ms vs 0.2 ms on the dev machine). Zeroing goes through a
/// plain O_DIRECT handle with one fdatasync at the end, paced so it does not starve the
/// live segment's writes; the returned handle carries the sync mode's flags.
async fn prepare_segment(
    dir: PathBuf,
    seq: u64,
    size_bytes: u64,
    sync: SyncMode,
) -> std::io::Result<(DmaFile, PathBuf)> {
    let path = dir.join(format!("{seq:016x}.tmp"));
    let zeroing = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .dma_open(&path)
        .await?;
    zeroing.pre_allocate(size_bytes, false).await?;
    let mut off = 0u64;
    while off < size_bytes {
        let n = (size_bytes - off).min(ZERO_CHUNK_BYTES as u64) as usize;
        let mut buf = zeroing.alloc_dma_buffer(n);
        buf.as_bytes_mut().fill(0);
        let written = zeroing.write_at(buf, off).await?;
        if written != n {
            return Err(std::io::Error::other("short write while zeroing segment"));
        }
        off += n as u64;
        glommio::timer::sleep(ZERO_PACING).await;
    }
    zeroing.fdatasync().await?;
    zeroing
        .close()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(sync.open_flags())
        .dma_open(&path)
        .await?;
    Ok((file, path))
}

/// Directory fsync on the blocking pool: rare (segment creation), and glommio's
/// `Directory` cannot open directories on this kernel.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || format::sync_dir(&dir))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

impl WalActor {
    /// Opens the WAL for appending after recovery. `start_index` is the index the first
    /// segment starts at when the WAL is empty.
    pub async fn open(
        dir: PathBuf,
        segment_bytes: u64,
        sync: SyncMode,
        recovered: Recovered,
        start_index: u64,
    ) -> std::io::Result<WalActor> {
        assert!(segment_bytes.is_multiple_of(BLOCK_BYTES) && segment_bytes >= 1 << 20);
        let mut segments: VecDeque<Segment> = recovered.segments.into();
        let (file, offset, tail) = match segments.back() {
            Some(seg) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(sync.open_flags())
                    .dma_open(&seg.path)
                    .await?;
                let off = recovered.tail_offset;
                let block = off - off % BLOCK_BYTES;
                let tail = if off > block {
                    let r = file.read_at_aligned(block, BLOCK_BYTES as usize).await?;
                    r[..(off - block) as usize].to_vec()
                } else {
                    Vec::new()
                };
                (file, off, tail)
            }
            None => {
                let (file, tmp) = prepare_segment(dir.clone(), 0, segment_bytes, sync).await?;
                let seg = Segment {
                    seq: 0,
                    first_index: start_index,
                    path: dir.join(format::segment_name(0, start_index)),
                };
                glommio::io::rename(&tmp, &seg.path).await?;
                sync_dir(&dir).await?;
                segments.push_back(seg);
                (file, 0, Vec::new())
            }
        };
        let next_seq = segments.back().map_or(0, |s| s.seq) + 1;
        let next_segment = Some(
            glommio::spawn_local(prepare_segment(dir.clone(), next_seq, segment_bytes, sync))
                .detach(),
        );
        Ok(WalActor {
            dir,
            sync,
            segment_bytes,
            segments,
            file,
            offset,
            tail,
            next_segment,
            hard_state: recovered.hard_state.unwrap_or_default(),
            stats: WalStats::default(),
            fsync_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("static histogram bounds"),
            logged: (Instant::now(), 0),
        })
    }

    pub async fn run(mut self, mut inbox: BoxStream<ToWal>, to_raft: ConnectedSender<Persisted>) {
        // Bounded by the mailbox: ends when the raft actor goes away.
        while let Some(first) = inbox.next().await {
            let mut msgs = vec![first];
            while msgs.len() < MAX_BATCH_MESSAGES {
                match inbox.next().now_or_never() {
                    Some(Some(m)) => msgs.push(m),
                    _ => break,
                }
            }
            let mut persisted: Option<Persisted> = None;
            let mut records: Vec<u8> = Vec::new();
            let mut release_below = None;
            let mut batch_entries = 0u64;
            for m in msgs {
                match m {
                    ToWal::Persist {
                        number,
                        entries,
                        hard_state,
                        snapshot,
                    } => {
                        let p = persisted.get_or_insert_with(|| Persisted {
                            number,
                            stats: WalStats::default(),
                        });
                        assert!(number >= p.number, "ready numbers must increase");
                        p.number = number;
                        if let Some((index, term)) = snapshot {
                            format::encode_snapshot_marker(&mut records, index, term);
                        }
                        for e in &entries {
                            // Protobuf framing adds < 64 bytes to data + context.
                            let need = format::HEADER_BYTES + 64 + e.data.len() + e.context.len();
                            if self.would_overflow(records.len() + need) {
                                self.write(&records).await;
                                records.clear();
                                self.rotate(e.index).await;
                            }
                            format::encode_entry(&mut records, e);
                        }
                        if let Some(hs) = &hard_state {
                            format::encode_hard_state(&mut records, hs);
                            self.hard_state = hs.clone();
                        }
                        self.stats.entries += entries.len() as u64;
                        batch_entries += entries.len() as u64;
                    }
                    ToWal::Release { index } => release_below = Some(index),
                }
            }
            if let Some(mut p) = persisted {
                // The durability latency: write + fdatasync, or the O_DSYNC write.
                let started = Instant::now();
                self.write(&records).await;
                if self.sync == SyncMode::Fdatasync {
                    if let Err(e) = self.file.fdatasync().await {
                        fatal("fdatasync", e);
                    }
                }
                let us = started.elapsed().as_micros() as u64;
                let _ = self.fsync_us.record(us.max(1));
                self.stats.batches += 1;
                self.stats.max_batch = self.stats.max_batch.max(batch_entries);
                self.stats.fsync_p50_us = self.fsync_us.value_at_quantile(0.5);
                self.stats.fsync_p99_us = self.fsync_us.value_at_quantile(0.99);
                p.stats = self.stats;
                self.maybe_log_stats();
                if to_raft.send(p).await.is_err() {
                    return;
                }
            }
            if let Some(index) = release_below {
                self.release(index).await;
            }
        }
    }

    fn maybe_log_stats(&mut self) {
        if self.logged.0.elapsed() < STATS_LOG_INTERVAL {
            return;
        }
        let batches = self.stats.batches - self.logged.1;
        tracing::info!(
            batches,
            entries_total = self.stats.entries,
            avg_batch = format!(
                "{:.1}",
                self.stats.entries as f64 / self.stats.batches.max(1) as f64
            ),
            max_batch = self.stats.max_batch,
            sync_p50_us = self.stats.fsync_p50_us,
            sync_p99_us = self.stats.fsync_p99_us,
            "wal group commit"
        );
        self.logged = (Instant::now(), self.stats.batches);
    }

    /// Whether `extra` more bytes (plus the records already encoded) would pass the end
    /// of the current segment.
    fn would_overflow(&self, extra: usize) -> bool {
        self.offset + extra as u64 + 2 * format::HEADER_BYTES as u64 + 256 > self.segment_bytes
    }

    /// Writes `records` after the current tail, whole blocks at a time (no fsync).
    async fn write(&mut self, records: &[u8]) {
        if records.is_empty() {
            return;
        }
        assert!(
            self.offset + records.len() as u64 <= self.segment_bytes,
            "segment overflow"
        );
        let start = self.offset - self.offset % BLOCK_BYTES;
        let data_len = self.tail.len() + records.len();
        let buf_len = (data_len as u64).next_multiple_of(BLOCK_BYTES) as usize;
        let mut buf = self.file.alloc_dma_buffer(buf_len);
        let bytes = buf.as_bytes_mut();
        bytes[..self.tail.len()].copy_from_slice(&self.tail);
        bytes[self.tail.len()..data_len].copy_from_slice(records);
        bytes[data_len..].fill(0);
        let new_offset = self.offset + records.len() as u64;
        let new_block = new_offset - new_offset % BLOCK_BYTES;
        self.tail = bytes[(new_block - start) as usize..(new_offset - start) as usize].to_vec();
        match self.file.write_at(buf, start).await {
            Ok(n) if n == buf_len => {}
            Ok(n) => fatal("write", format!("short write {n} of {buf_len} bytes")),
            Err(e) => fatal("write", e),
        }
        self.offset = new_offset;
    }

    /// Seals the current segment and continues in the prepared one; the new segment
    /// starts with the latest hard state so older segments can be released.
    async fn rotate(&mut self, first_index: u64) {
        if let Err(e) = self.file.fdatasync().await {
            fatal("fdatasync", e);
        }
        let seq = self.segments.back().map_or(0, |s| s.seq) + 1;
        let prepared = match self.next_segment.take() {
            Some(task) => task.await,
            None => None,
        };
        let (file, tmp) = match prepared {
            Some(Ok(x)) => x,
            Some(Err(e)) => fatal("prepare segment", e),
            None => {
                match prepare_segment(self.dir.clone(), seq, self.segment_bytes, self.sync).await {
                    Ok(x) => x,
                    Err(e) => fatal("prepare segment", e),
                }
            }
        };
        let seg = Segment {
            seq,
            first_index,
            path: self.dir.join(format::segment_name(seq, first_index)),
        };
        if let Err(e) = glommio::io::rename(&tmp, &seg.path).await {
            fatal("rename segment", e);
        }
        if let Err(e) = sync_dir(&self.dir).await {
            fatal("sync wal dir", e);
        }
        tracing::info!(segment = %seg.path.display(), "wal: new segment");
        let old = std::mem::replace(&mut self.file, file);
        let _ = old.close().await;
        self.segments.push_back(seg);
        self.offset = 0;
        self.tail.clear();
        let mut hs = Vec::new();
        format::encode_hard_state(&mut hs, &self.hard_state);
        self.write(&hs).await;
        self.next_segment = Some(
            glommio::spawn_local(prepare_segment(
                self.dir.clone(),
                seq + 1,
                self.segment_bytes,
                self.sync,
            ))
            .detach(),
        );
    }

    /// Removes segments that hold only entries <= `index` (never the current one).
    async fn release(&mut self, index: u64) {
        while self.segments.len() >= 2 && self.segments[1].first_index <= index + 1 {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            if let Err(e) = glommio::io::remove(&seg.path).await {
                tracing::warn!("wal: remove {}: {e}", seg.path.display());
            } else {
                tracing::debug!("wal: released {}", seg.path.display());
            }
        }
        assert!(
            !self.segments.is_empty(),
            "the current segment is never released"
        );
    }
}
