//! Write-ahead log format and recovery (the writer lives in `actors::wal`).
//!
//! A segment is a preallocated, zero-filled file `<seq:016x>-<first_index:016x>.wal`
//! holding records `[len u32][crc32c u32][type u8][payload]`, each padded to 8 bytes;
//! `len` covers type + payload and `len == 0` marks the end of written data. Records are
//! contiguous: every group-commit batch continues at the byte where the previous ended.

use crate::error::KvError;
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const RECORD_ALIGN: usize = 8;
pub const HEADER_BYTES: usize = 9;
/// Largest record accepted when reading: bounds allocations driven by disk contents.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    Entry = 1,
    HardState = 2,
    /// A snapshot (index, term) was installed in LMDB: the log restarts after it.
    Snapshot = 3,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal: {file}: corrupt record at offset {offset}: {reason}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal: {0}")]
    Io(String),
}

impl From<WalError> for KvError {
    fn from(e: WalError) -> Self {
        KvError::Internal(e.to_string())
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> WalError {
    WalError::Io(format!("{what} {}: {e}", path.display()))
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, kind: RecordType, payload: &[u8]) {
    let len = (payload.len() + 1) as u32;
    let mut crc = crc32c::crc32c(&[kind as u8]);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    let padded = out.len().next_multiple_of(RECORD_ALIGN);
    out.resize(padded, 0);
}

pub fn encode_entry(out: &mut Vec<u8>, e: &Entry) {
    let bytes = e.write_to_bytes().unwrap_or_default();
    encode_record(out, RecordType::Entry, &bytes);
}

pub fn encode_hard_state(out: &mut Vec<u8>, hs: &HardState) {
    let bytes = hs.write_to_bytes().unwrap_or_default();
    encode_record(out, RecordType::HardState, &bytes);
}

pub fn encode_snapshot_marker(out: &mut Vec<u8>, index: u64, term: u64) {
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&term.to_le_bytes());
    encode_record(out, RecordType::Snapshot, &payload);
}

pub enum Decoded<'a> {
    Record {
        kind: u8,
        payload: &'a [u8],
        next: usize,
    },
    End,
    Bad(String),
}

/// Decodes the record at `pos` of `buf`.
pub fn decode_at(buf: &[u8], pos: usize) -> Decoded<'_> {
    if pos + HEADER_BYTES > buf.len() {
        // Trailing bytes too short for a header: only zeros are a clean end.
        return if buf[pos.min(buf.len())..].iter().all(|b| *b == 0) {
            Decoded::End
        } else {
            Decoded::Bad("truncated record header".into())
        };
    }
    let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
    if len == 0 {
        return Decoded::End;
    }
    if len > MAX_RECORD_BYTES {
        return Decoded::Bad(format!("record length {len} too large"));
    }
    let body = pos + 8;
    if body + len > buf.len() {
        return Decoded::Bad(format!("record length {len} runs past the end of the file"));
    }
    let crc = u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
    if crc32c::crc32c(&buf[body..body + len]) != crc {
        return Decoded::Bad("crc mismatch".into());
    }
    Decoded::Record {
        kind: buf[body],
        payload: &buf[body + 1..body + len],
        next: (body + len).next_multiple_of(RECORD_ALIGN),
    }
}

#[derive(Clone, Debug)]
pub struct Segment {
    pub seq: u64,
    pub first_index: u64,
    pub path: PathBuf,
}

pub fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (a, b) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// Segments in `dir`, ordered by sequence number (which must have no gaps).
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>, WalError> {
    let mut segs = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(segs),
        Err(e) => return Err(io_err("read dir", dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| io_err("read dir", dir, e))?;
        let name = ent.file_name().to_string_lossy().to_string();
        if let Some((seq, first_index)) = parse_segment_name(&name) {
            segs.push(Segment {
                seq,
                first_index,
                path: ent.path(),
            });
        }
    }
    segs.sort_by_key(|s| s.seq);
    for w in segs.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            return Err(WalError::Io(format!(
                "missing segment between {} and {}",
                w[0].path.display(),
                w[1].path.display()
            )));
        }
    }
    Ok(segs)
}

/// What a restart finds in the WAL.
#[derive(Debug, Default)]
pub struct Recovered {
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub segments: Vec<Segment>,
    /// Where the next record goes in the last segment.
    pub tail_offset: u64,
    /// Set when a torn final record was cut off (its offset).
    pub truncated_at: Option<u64>,
    /// Index of the last installed snapshot marker.
    pub snapshot_index: Option<u64>,
}

/// Reads every segment, checking every record's CRC (also of records already applied).
/// A bad record at the very end of the last segment is a torn write and is cut off;
/// a bad record followed by any valid one is corruption and recovery refuses.
pub fn recover(dir: &Path) -> Result<Recovered, WalError> {
    let segments = list_segments(dir)?;
    let mut rec = Recovered::default();
    let n = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        let buf = fs::read(&seg.path).map_err(|e| io_err("read", &seg.path, e))?;
        let mut pos = 0usize;
        loop {
            match decode_at(&buf, pos) {
                Decoded::End => break,
                Decoded::Record {
                    kind,
                    payload,
                    next,
                } => {
                    apply_record(&mut rec, seg, pos, kind, payload)?;
                    pos = next;
                }
                Decoded::Bad(reason) => {
                    let corrupt = WalError::Corrupt {
                        file: seg.path.clone(),
                        offset: pos as u64,
                        reason,
                    };
                    if i + 1 != n || valid_record_after(&buf, pos) {
                        return Err(corrupt);
                    }
                    tracing::warn!("{corrupt}: torn final write, truncating");
                    zero_from(&seg.path, pos as u64, buf.len() as u64)?;
                    rec.truncated_at = Some(pos as u64);
                    break;
                }
            }
        }
        if i + 1 == n {
            rec.tail_offset = pos as u64;
        }
    }
    rec.segments = segments;
    Ok(rec)
}

fn apply_record(
    rec: &mut Recovered,
    seg: &Segment,
    pos: usize,
    kind: u8,
    payload: &[u8],
) -> Result<(), WalError> {
    let corrupt = |reason: String| WalError::Corrupt {
        file: seg.path.clone(),
        offset: pos as u64,
        reason,
    };
    match kind {
        k if k == RecordType::Entry as u8 => {
            let e = Entry::parse_from_bytes(payload).map_err(|e| corrupt(format!("entry: {e}")))?;
            let idx = e.index;
            if let (None, Some(snap)) = (rec.entries.last(), rec.snapshot_index) {
                if idx != snap + 1 {
                    return Err(corrupt(format!(
                        "entry {idx} follows snapshot {snap}: entries missing"
                    )));
                }
            }
            if let Some(last) = rec.entries.last() {
                if idx > last.index + 1 {
                    return Err(corrupt(format!(
                        "entry {idx} follows {}: entries missing",
                        last.index
                    )));
                }
                // A later entry at an index overwrites the log from there (raft truncation).
                let keep = rec.entries.partition_point(|x| x.index < idx);
                rec.entries.truncate(keep);
            }
            rec.entries.push(e);
        }
        k if k == RecordType::HardState as u8 => {
            let hs = HardState::parse_from_bytes(payload)
                .map_err(|e| corrupt(format!("hard state: {e}")))?;
            rec.hard_state = Some(hs);
        }
        k if k == RecordType::Snapshot as u8 => {
            if payload.len() != 16 {
                return Err(corrupt("snapshot marker: bad length".into()));
            }
            let index = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
            // Installed snapshots replace the whole log (raft restores only when the
            // log does not match at the snapshot's index).
            rec.entries.clear();
            rec.snapshot_index = Some(index);
        }
        other => return Err(corrupt(format!("unknown record type {other}"))),
    }
    Ok(())
}

/// Whether any valid record starts after a bad one at `bad`: then the bad one is not a
/// torn tail but damage in the middle of the log.
fn valid_record_after(buf: &[u8], bad: usize) -> bool {
    let mut pos = bad + RECORD_ALIGN;
    while pos + HEADER_BYTES <= buf.len() {
        if let Decoded::Record { .. } = decode_at(buf, pos) {
            return true;
        }
        pos += RECORD_ALIGN;
    }
    false
}

/// Zeroes `[from, to)` so stale bytes of a torn write are never read as records again.
fn zero_from(path: &Path, from: u64, to: u64) -> Result<(), WalError> {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], off)
            .map_err(|e| io_err("zero", path, e))?;
        off += n as u64;
    }
    f.sync_data().map_err(|e| io_err("sync", path, e))?;
    Ok(())
}

/// Syncs a directory so created, renamed or removed files survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync dir", dir, e))
}

/// Writes a pre-zeroed segment file of `size_bytes` with plain I/O (used by tests and
/// tools; the server prepares segments asynchronously in the WAL actor).
pub fn write_zeroed(path: &Path, size_bytes: u64) -> Result<(), WalError> {
    let mut f = fs::File::create(path).map_err(|e| io_err("create", path, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size_bytes;
    while left > 0 {
        let n = (left as usize).min(zeros.len());
        f.write_all(&zeros[..n])
            .map_err(|e| io_err("write", path, e))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| io_err("sync", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        Entry {
            index: i,
            term: 1,
            data: vec![i as u8; 13].into(),
            ..Default::default()
        }
    }

    fn write_log(dir: &Path, n: u64) -> (PathBuf, Vec<usize>) {
        let path = dir.join(segment_name(0, 1));
        write_zeroed(&path, 1 << 16).unwrap();
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 1..=n {
            starts.push(buf.len());
            encode_entry(&mut buf, &entry(i));
        }
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&buf, 0).unwrap();
        (path, starts)
    }

    #[test]
    fn roundtrip_torn_tail_and_mid_log_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (path, starts) = write_log(dir.path(), 10);
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.entries.len(), 10);
        assert_eq!(r.truncated_at, None);

        // Torn tail: the last record loses its second half.
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&[0u8; 12], starts[9] as u64 + 10).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.entries.len(), 9);
        assert_eq!(r.truncated_at, Some(starts[9] as u64));
        assert_eq!(r.tail_offset, starts[9] as u64);

        // A flipped byte in the middle refuses, naming file and offset.
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, starts[3] as u64 + 12).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], starts[3] as u64 + 12)
            .unwrap();
        let err = recover(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("offset {}", starts[3])), "{err}");
        assert!(err.contains(".wal"), "{err}");
    }
}
