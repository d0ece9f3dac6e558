//! A bump allocator for policy instances.
//!
//! Every call into a policy runs in a fresh instance that lives for that one call, so freeing
//! memory is pointless: the whole instance is discarded. Allocating from a static arena costs a
//! pointer increment and, above all, never grows the linear memory, which would make the host
//! map and later reset new pages on every decision (measured: a few microseconds per call).
//! When the arena is exhausted (a large `configure`), allocation falls back to the system
//! allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Size of the static arena.
const ARENA_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: wasm policy instances are single-threaded; the offset is still kept in an atomic so
// the type is sound anywhere.
#[allow(unsafe_code)]
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The allocator [`crate::export_policy!`] installs in wasm builds.
#[derive(Debug, Default)]
pub struct ArenaAlloc;

impl ArenaAlloc {
    fn contains(ptr: *mut u8) -> bool {
        let base = ARENA.0.get() as usize;
        (base..base + ARENA_SIZE).contains(&(ptr as usize))
    }
}

// SAFETY: every pointer returned is either inside the arena, aligned as requested and never
// handed out twice (the offset only grows), or comes from `System`; `dealloc` routes each
// pointer back to where it came from.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for ArenaAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = ARENA.0.get() as usize;
        let mut next = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (base + next).next_multiple_of(layout.align());
            let end = start + layout.size();
            if end > base + ARENA_SIZE {
                // SAFETY: forwarding the caller's valid layout.
                return unsafe { System.alloc(layout) };
            }
            match NEXT.compare_exchange_weak(next, end - base, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(current) => next = current,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::contains(ptr) {
            // SAFETY: not from the arena, hence from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}
