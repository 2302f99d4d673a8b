//! Memory per idle watching, measured with a counting allocator: 100k watchers on one
//! key spread over 100 streams in a watch hub, bytes allocated divided by watchers.
//! (RSS deltas of a running server are too noisy for this: the allocator reuses memory
//! freed by earlier work.) The target is <= 100 B; etcd 3.4 is ~350 B.

use corekv::actors::watch::{WatchHub, WatchSpec};
use corekv::storage::backend::{Backend, Store};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn idle_watcher_memory() {
    const WATCHERS: usize = 100_000;
    const STREAMS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::open(dir.path(), 64 << 20).unwrap();
    let mut hub = WatchHub::new(
        Store::new(b),
        1,
        2,
        Rc::new(Cell::new(1)),
        Default::default(),
    )
    .unwrap();
    let mut rxs = Vec::new();
    let before_streams = LIVE_BYTES.load(Ordering::Relaxed);
    for s in 0..STREAMS {
        // Room for every "created" notice, so nothing is owed (queued) afterwards.
        let (tx, rx) = futures::channel::mpsc::channel(WATCHERS / STREAMS + 8);
        hub.open_stream(s as u64, tx);
        rxs.push(rx);
    }
    let streams_bytes = LIVE_BYTES.load(Ordering::Relaxed) - before_streams;
    // Drain the created notices as they come so the channels' buffers do not count.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..WATCHERS {
        let spec = WatchSpec {
            key: b"/config/app".to_vec(),
            ..Default::default()
        };
        hub.create((i % STREAMS) as u64, spec);
        if i % 1000 == 999 {
            for rx in &mut rxs {
                while rx.try_recv().is_ok() {}
            }
        }
    }
    for rx in &mut rxs {
        while rx.try_recv().is_ok() {}
    }
    let per_watcher = (LIVE_BYTES.load(Ordering::Relaxed) - before) as f64 / WATCHERS as f64;
    assert_eq!(hub.watcher_count(), WATCHERS);
    eprintln!(
        "idle watching: {per_watcher:.1} B per watcher over {WATCHERS} watchers (streams: {} B each)",
        streams_bytes / STREAMS as isize
    );
    assert!(
        per_watcher <= 100.0,
        "{per_watcher:.1} B per idle watcher, target <= 100 B"
    );
}
