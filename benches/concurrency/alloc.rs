//! A counting global allocator: how many allocations (and bytes) a stretch of code makes, across
//! every thread of the process.
//!
//! Counting is off unless [`Counter::start`] switched it on, so the timed passes pay one relaxed
//! load per allocation and nothing else; the counts come from separate, untimed passes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct CountingAllocator;

static ENABLED: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);

fn count_allocation(size: usize) {
    if ENABLED.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(size as u64, Ordering::Relaxed);
    }
}

fn count_free(size: usize) {
    if ENABLED.load(Ordering::Relaxed) {
        FREED.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every method delegates to `System` with the caller's arguments unchanged; the counting
// touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_free(layout.size());
        // SAFETY: as above; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc may move the block: counted as one allocation of the new size and a free of
        // the old one.
        count_allocation(new_size);
        count_free(layout.size());
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocation counts over a window.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Allocs {
    /// Calls to `alloc`, `alloc_zeroed` and `realloc`.
    pub allocations: u64,
    /// Bytes those calls asked for.
    pub allocated_bytes: u64,
    /// Bytes freed (by `dealloc`, and the old block of each `realloc`).
    pub freed_bytes: u64,
}

impl Allocs {
    /// Bytes allocated and not freed within the window (negative: more freed than allocated).
    pub fn net_bytes(&self) -> i64 {
        self.allocated_bytes as i64 - self.freed_bytes as i64
    }
}

fn now() -> Allocs {
    Allocs {
        allocations: ALLOCATIONS.load(Ordering::Relaxed),
        allocated_bytes: ALLOCATED.load(Ordering::Relaxed),
        freed_bytes: FREED.load(Ordering::Relaxed),
    }
}

/// A counting window: switched on by [`Counter::start`], read by [`Counter::read`], switched off
/// when dropped. One at a time.
pub struct Counter {
    start: Allocs,
}

impl Counter {
    pub fn start() -> Self {
        ENABLED.store(true, Ordering::SeqCst);
        Self { start: now() }
    }

    /// What was counted since [`Counter::start`] (counting goes on).
    pub fn read(&self) -> Allocs {
        let end = now();
        Allocs {
            allocations: end.allocations - self.start.allocations,
            allocated_bytes: end.allocated_bytes - self.start.allocated_bytes,
            freed_bytes: end.freed_bytes - self.start.freed_bytes,
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::SeqCst);
    }
}
