//! The agent's global allocator: large blocks are their own mappings, and
//! freed ones are kept for the next allocation of the same size.
//!
//! Why: a static `MALLOC_MMAP_THRESHOLD_` keeps glibc's heap from fragmenting
//! under model switching by making every allocation over 1 MiB a private
//! mapping that `free` returns to the kernel. But a denoising step allocates
//! and frees the same large buffers (each op's output, gemm's packing space)
//! every step, and each fresh mapping is page-faulted and zeroed again: on
//! the CPU that cost 8–44% of an SD 1.5 step. A freed mapping is handed, whole, to the
//! next allocation of its page-rounded size instead, so from the second step
//! on those buffers cost no system call and no page fault. The pool never
//! splits or merges blocks, so it cannot fragment: each block is one mapping,
//! and releasing it is one `munmap`. What it holds is bounded by its cap
//! (oldest blocks unmapped first) and reported in metrics; it keeps blocks
//! only while some work holds a [`Busy`] guard (a generation), and is emptied
//! when the last guard drops, so an idle agent holds nothing extra.
//!
//! Configuration must be known before the first allocation, so it comes from
//! the environment, read with `getenv` (which does not allocate):
//! `MODELCACHE_ALLOC_POOL_BYTES` is the cap (a byte count with an optional
//! `Ki`/`Mi`/`Gi` suffix; default [`DEFAULT_CAP`]), and `0` turns the whole
//! allocator into a pass-through to malloc, for comparison.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Allocations of at least this many bytes are mappings (glibc's threshold
/// in the agent's deployment).
pub const MIN_BLOCK: usize = 1 << 20;
/// The pool's default cap: one SD-1.5-sized step's large buffers on the CPU.
pub const DEFAULT_CAP: usize = 1 << 30;
/// The environment variable holding the cap.
pub const ENV: &str = "MODELCACHE_ALLOC_POOL_BYTES";
const ENV_C: &std::ffi::CStr = c"MODELCACHE_ALLOC_POOL_BYTES";
/// How many free blocks the pool can hold at once.
const SLOTS: usize = 256;
/// Block sizes are rounded to this, so that equal requests share blocks.
const PAGE: usize = 4096;

/// The global allocator; install it in a binary with `#[global_allocator]`.
pub struct PoolAllocator;

/// `usize::MAX` until the environment is read; then the cap, or `OFF`.
static CAP: AtomicUsize = AtomicUsize::new(UNREAD);
const UNREAD: usize = usize::MAX;
const OFF: usize = usize::MAX - 1;

/// The process's pool, behind [`PoolAllocator`].
static POOL: Pool = Pool::new();

/// Freed large blocks and what was done with them.
struct Pool {
    free: Mutex<Free>,
    /// Live [`Busy`] guards: blocks are kept only while there is one.
    busy: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    pooled: AtomicUsize,
}

struct Free {
    /// (address, rounded length), oldest first.
    blocks: [(usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

/// What the pool has done since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Whether the allocator manages large blocks (false: everything is malloc's).
    pub enabled: bool,
    /// The cap on free bytes held.
    pub cap_bytes: usize,
    /// Free bytes held now.
    pub pooled_bytes: usize,
    /// Large allocations served from the pool.
    pub hits: u64,
    /// Large allocations that mapped fresh memory.
    pub misses: u64,
}

/// The pool's counters.
pub fn stats() -> PoolStats {
    let cap = cap();
    PoolStats {
        enabled: cap != OFF,
        cap_bytes: if cap == OFF { 0 } else { cap },
        pooled_bytes: POOL.pooled.load(Ordering::Relaxed),
        hits: POOL.hits.load(Ordering::Relaxed),
        misses: POOL.misses.load(Ordering::Relaxed),
    }
}

/// Marks work whose large buffers repeat (a generation's steps): freed blocks
/// are kept while any guard lives, and all released when the last one drops.
#[must_use = "the pool keeps blocks only while the guard lives"]
pub struct Busy(&'static Pool);

/// Starts a stretch of work during which freed large blocks are kept.
pub fn busy() -> Busy {
    POOL.busy()
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.release();
        }
    }
}

/// Unmaps every pooled block; returns the bytes released.
pub fn release() -> usize {
    POOL.release()
}

/// Parses the cap's text: bytes with an optional binary suffix. `None` when
/// malformed (the default applies).
pub fn parse_cap(s: &[u8]) -> Option<usize> {
    let (digits, mult) = match s {
        [d @ .., b'K', b'i'] => (d, 1usize << 10),
        [d @ .., b'M', b'i'] => (d, 1 << 20),
        [d @ .., b'G', b'i'] => (d, 1 << 30),
        d => (d, 1),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: usize = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as usize)?;
    }
    // OFF and UNREAD are sentinels; a cap that large means "unbounded" anyway.
    Some(v.checked_mul(mult)?.min(OFF - 1))
}

fn cap() -> usize {
    let c = CAP.load(Ordering::Relaxed);
    if c != UNREAD {
        return c;
    }
    // SAFETY: getenv with a NUL-terminated name; the result is read at once,
    // before anything could change the environment.
    let raw = unsafe { libc::getenv(ENV_C.as_ptr()) };
    let c = if raw.is_null() {
        DEFAULT_CAP
    } else {
        // SAFETY: getenv returns a NUL-terminated string.
        let bytes = unsafe { std::ffi::CStr::from_ptr(raw) }.to_bytes();
        match parse_cap(bytes) {
            Some(0) => OFF,
            Some(v) => v,
            None => DEFAULT_CAP,
        }
    };
    CAP.store(c, Ordering::Relaxed);
    c
}

impl Free {
    fn take(&mut self, len: usize) -> Option<usize> {
        // Newest first: its pages are the likeliest to be in cache.
        let i = self.blocks[..self.len].iter().rposition(|b| b.1 == len)?;
        let (addr, _) = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= len;
        Some(addr)
    }

    fn pop_oldest(&mut self) -> Option<(usize, usize)> {
        if self.len == 0 {
            return None;
        }
        let b = self.blocks[0];
        self.blocks.copy_within(1..self.len, 0);
        self.len -= 1;
        self.bytes -= b.1;
        Some(b)
    }

    fn push(&mut self, block: (usize, usize)) {
        self.blocks[self.len] = block;
        self.len += 1;
        self.bytes += block.1;
    }
}

fn rounded(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

/// Whether a layout is this allocator's: decided from the layout alone, so
/// `dealloc` and `realloc` route exactly as `alloc` did.
fn is_large(layout: &Layout) -> bool {
    layout.size() >= MIN_BLOCK && layout.align() <= PAGE && cap() != OFF
}

fn map(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping has no preconditions.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: (addr, len) is a whole mapping this allocator made and no longer hands out.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            free: Mutex::new(Free {
                blocks: [(0, 0); SLOTS],
                len: 0,
                bytes: 0,
            }),
            busy: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            pooled: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // The critical sections cannot panic; a poisoned lock still holds valid data.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy(&'static self) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    fn release(&self) -> usize {
        let mut released = 0;
        loop {
            let oldest = {
                let mut free = self.lock();
                let b = free.pop_oldest();
                self.pooled.store(free.bytes, Ordering::Relaxed);
                b
            };
            let Some((addr, len)) = oldest else {
                return released;
            };
            unmap(addr, len);
            released += len;
        }
    }

    /// A large block: from the pool, or freshly mapped (already zeroed).
    fn alloc(&self, len: usize) -> (*mut u8, bool) {
        let reused = {
            let mut free = self.lock();
            let b = free.take(len);
            self.pooled.store(free.bytes, Ordering::Relaxed);
            b
        };
        if let Some(addr) = reused {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return (addr as *mut u8, false);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        (map(len), true)
    }

    /// Keeps a freed block while work is in progress and it fits the cap
    /// (the oldest blocks make room), or unmaps it.
    fn free(&self, addr: usize, len: usize, cap: usize) {
        if len > cap {
            return unmap(addr, len);
        }
        loop {
            let oldest = {
                let mut free = self.lock();
                // Read under the lock: the last guard's release takes it after
                // the count drops, so no block is left behind by a race.
                if self.busy.load(Ordering::Acquire) == 0 {
                    drop(free);
                    return unmap(addr, len);
                }
                if free.bytes + len <= cap && free.len < SLOTS {
                    free.push((addr, len));
                    self.pooled.store(free.bytes, Ordering::Relaxed);
                    return;
                }
                let b = free.pop_oldest();
                self.pooled.store(free.bytes, Ordering::Relaxed);
                b
            };
            // Unmapped outside the lock: munmap of a large block takes a while.
            match oldest {
                Some((a, l)) => unmap(a, l),
                None => return unmap(addr, len),
            }
        }
    }
}

// SAFETY: large blocks are whole page-aligned mappings (alignment ≤ a page is
// checked), never handed out twice (the pool holds only freed blocks), and
// routed by layout so each is freed by the path that made it; everything else
// is the system allocator's.
unsafe impl GlobalAlloc for PoolAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            POOL.alloc(rounded(layout.size())).0
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            let (p, fresh) = POOL.alloc(rounded(layout.size()));
            if !fresh && !p.is_null() {
                // SAFETY: the block is at least layout.size() bytes and ours.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            }
            p
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) {
            POOL.free(ptr as usize, rounded(layout.size()), cap());
        } else {
            // SAFETY: the block came from System with this layout (routing is by layout).
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return std::ptr::null_mut(),
        };
        match (is_large(&layout), is_large(&new)) {
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                let (old_len, new_len) = (rounded(layout.size()), rounded(new_size));
                if old_len == new_len {
                    return ptr;
                }
                // SAFETY: ptr is a whole mapping of old_len bytes; the kernel moves it if needed.
                let p = unsafe { libc::mremap(ptr.cast(), old_len, new_len, libc::MREMAP_MAYMOVE) };
                if p == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    p.cast()
                }
            }
            _ => {
                // Crossing the threshold: a copy between the two allocators.
                // SAFETY: `new` is a valid layout; both blocks hold at least
                // min(old, new) bytes and do not overlap.
                unsafe {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_with_binary_suffixes_and_refuse_garbage() {
        assert_eq!(parse_cap(b"0"), Some(0));
        assert_eq!(parse_cap(b"1048576"), Some(1 << 20));
        assert_eq!(parse_cap(b"512Mi"), Some(512 << 20));
        assert_eq!(parse_cap(b"2Gi"), Some(2 << 30));
        assert_eq!(parse_cap(b"64Ki"), Some(64 << 10));
        for bad in [
            &b""[..],
            b"Gi",
            b"1.5Gi",
            b"-1",
            b"12MB",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_cap(bad), None, "{:?}", std::str::from_utf8(bad));
        }
    }

    #[test]
    fn blocks_are_kept_only_while_work_is_in_progress_within_the_cap() {
        static P: Pool = Pool::new();
        let pooled = || P.pooled.load(Ordering::Relaxed);
        let len = 2 << 20;
        let (a, fresh) = P.alloc(len);
        assert!(fresh && !a.is_null());
        P.free(a as usize, len, 1 << 30);
        assert_eq!(pooled(), 0, "no work in progress: unmapped at once");

        let (first, second) = (P.busy(), P.busy());
        let (b, _) = P.alloc(len);
        // SAFETY: a fresh mapping of `len` bytes, written and read back.
        unsafe { b.write_bytes(9, len) };
        P.free(b as usize, len, 1 << 30);
        assert_eq!(pooled(), len);
        let (c, fresh) = P.alloc(len);
        assert_eq!((c, fresh), (b, false), "the same block, reused");
        assert_eq!(unsafe { *c.add(len - 1) }, 9);
        P.free(c as usize, len, 1 << 30);
        drop(first);
        assert_eq!(pooled(), len, "another piece of work is still running");
        drop(second);
        assert_eq!(pooled(), 0, "released with the last guard");

        let busy = P.busy();
        let blocks: Vec<_> = (0..3).map(|_| P.alloc(len).0).collect();
        for b in &blocks {
            P.free(*b as usize, len, 2 * len);
        }
        assert_eq!(pooled(), 2 * len, "the oldest block made room");
        let (big, _) = P.alloc(3 * len);
        P.free(big as usize, 3 * len, 2 * len);
        assert_eq!(pooled(), 2 * len, "a block over the cap is never kept");
        drop(busy);
        assert_eq!(pooled(), 0);
        assert_eq!(P.hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_free_list_hands_back_the_newest_block_of_a_size_and_drops_the_oldest() {
        let mut f = Free {
            blocks: [(0, 0); SLOTS],
            len: 0,
            bytes: 0,
        };
        f.push((0x1000, 8192));
        f.push((0x5000, 4096));
        f.push((0x9000, 8192));
        assert_eq!(f.take(8192), Some(0x9000));
        assert_eq!(f.take(12288), None);
        assert_eq!(f.bytes, 8192 + 4096);
        assert_eq!(f.pop_oldest(), Some((0x1000, 8192)));
        assert_eq!(f.take(4096), Some(0x5000));
        assert_eq!((f.len, f.bytes), (0, 0));
    }
}
