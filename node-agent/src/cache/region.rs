//! The RAM tier's memory: one anonymous, 2 MiB-aligned mapping per cached model,
//! filled straight from the file with positioned reads on several threads and
//! released with one `munmap`. Cached weights never pass through malloc, so
//! model switching cannot fragment the heap (docs/memory.md).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Alignment (and size granularity) of regions: one transparent huge page.
pub const REGION_ALIGN: usize = 2 << 20;
/// Bytes per positioned read.
const CHUNK: usize = 16 << 20;

/// An anonymous memory mapping owned by one cache entry.
pub struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; shared access is
// read-only after the fill, and the fill hands out disjoint slices.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Maps `bytes` (rounded up to 2 MiB) of zeroed anonymous memory aligned to
    /// 2 MiB, asking for transparent huge pages where the kernel allows them.
    pub fn new(bytes: usize) -> std::io::Result<Region> {
        let len = bytes.max(1).div_ceil(REGION_ALIGN) * REGION_ALIGN;
        let over = len + REGION_ALIGN;
        // SAFETY: anonymous private mapping; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(REGION_ALIGN);
        let head = aligned - start;
        let tail = over - head - len;
        // SAFETY: unmapping the unaligned head and tail of our own mapping.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Advisory: failure (THP disabled) only costs speed.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Region {
            ptr: aligned as *mut u8,
            len,
        })
    }

    /// A region of `bytes` (rounded up to 2 MiB) made from the regions of
    /// models just evicted for it, where they are large enough: their pages
    /// are resident already, so filling it costs a copy and no page faults.
    /// Fresh pages cost far more than the copy (the kernel zeroes each one,
    /// and on a VM that returns free memory to its host, the host faults it
    /// in again). Best fit: the smallest spare that holds `bytes`, its tail
    /// unmapped; else the largest, moved (not copied) into the head of a new
    /// region whose tail is fresh. Spares not used are unmapped, so resident
    /// memory never exceeds what the tier accounts. The old contents stay
    /// where the fill does not write (alignment padding), which nothing reads.
    pub fn reuse(mut spares: Vec<Region>, bytes: usize) -> std::io::Result<Region> {
        let len = bytes.max(1).div_ceil(REGION_ALIGN) * REGION_ALIGN;
        spares.sort_by_key(|r| r.len);
        if let Some(i) = spares.iter().position(|r| r.len >= len) {
            let mut r = spares.swap_remove(i);
            if r.len > len {
                // SAFETY: unmapping the tail of our own mapping; the region
                // keeps its head.
                unsafe {
                    libc::munmap(r.ptr.add(len) as *mut libc::c_void, r.len - len);
                }
                r.len = len;
            }
            return Ok(r);
        }
        let Some(largest) = spares.pop() else {
            return Region::new(bytes);
        };
        let fresh = Region::new(len)?;
        // SAFETY: moves the spare's pages over the head of `fresh` (both our
        // own mappings; MREMAP_FIXED replaces what was there). The spare's
        // address range is unmapped by the move, so it is forgotten rather
        // than dropped.
        let moved = unsafe {
            libc::mremap(
                largest.ptr as *mut libc::c_void,
                largest.len,
                largest.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                fresh.ptr as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            // The spare is still mapped where it was: dropping it unmaps it.
            return Ok(fresh);
        }
        std::mem::forget(largest);
        Ok(fresh)
    }

    /// Bytes mapped (what the RAM tier is charged).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: exclusive access through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we own, once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// A byte range of a file to copy into a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub file_offset: u64,
    pub len: u64,
    pub region_offset: u64,
}

/// Why a fill failed.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Open(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: file ended at byte {at}, expected {expected} bytes (was it truncated while loading?)")]
    Truncated {
        path: PathBuf,
        at: u64,
        expected: u64,
    },
    #[error("segment of {path} does not fit in the region")]
    OutOfRegion { path: PathBuf },
}

/// Copies `segments` into `region` with `threads` workers, each taking whole
/// 16 MiB chunks (pread straight into the region: no staging buffer).
pub fn fill(region: &mut Region, segments: &[Segment], threads: usize) -> Result<(), FillError> {
    struct Job {
        file: usize,
        file_offset: u64,
        region_offset: usize,
        len: usize,
    }
    let mut files = Vec::new();
    let mut jobs = Vec::new();
    for s in segments {
        if s.region_offset + s.len > region.len() as u64 {
            return Err(FillError::OutOfRegion {
                path: s.path.clone(),
            });
        }
        let f = crate::store::file::open_regular(&s.path)?;
        files.push((s.path.clone(), f));
        let mut done = 0u64;
        while done < s.len {
            let len = (s.len - done).min(CHUNK as u64);
            jobs.push(Job {
                file: files.len() - 1,
                file_offset: s.file_offset + done,
                region_offset: (s.region_offset + done) as usize,
                len: len as usize,
            });
            done += len;
        }
    }
    let base = region.as_mut_slice().as_mut_ptr() as usize;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> Result<(), FillError> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(job) = jobs.get(i) else {
                return Ok(());
            };
            let (path, file) = &files[job.file];
            // SAFETY: jobs cover disjoint ranges inside the region (checked above),
            // and the region outlives the scope.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((base + job.region_offset) as *mut u8, job.len)
            };
            let mut got = 0usize;
            while got < job.len {
                match file.read_at(&mut dst[got..], job.file_offset + got as u64) {
                    Ok(0) => {
                        return Err(FillError::Truncated {
                            path: path.clone(),
                            at: job.file_offset + got as u64,
                            expected: job.file_offset + job.len as u64,
                        })
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(FillError::Io {
                            path: path.clone(),
                            source,
                        })
                    }
                }
            }
        }
    };
    let threads = threads.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut result = work();
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(FillError::OutOfRegion {
                    path: PathBuf::from("<worker panicked>"),
                })
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_aligned_and_rounded() {
        let r = Region::new(10).unwrap();
        assert_eq!(r.len(), REGION_ALIGN);
        assert_eq!(r.as_slice().as_ptr() as usize % REGION_ALIGN, 0);
        assert!(r.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn fill_copies_segments_with_threads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(40 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut r = Region::new(data.len()).unwrap();
        let segs = [
            Segment {
                path: p.clone(),
                file_offset: 100,
                len: (20 << 20) - 100,
                region_offset: 0,
            },
            Segment {
                path: p.clone(),
                file_offset: 20 << 20,
                len: 20 << 20,
                region_offset: (20 << 20) - 100,
            },
        ];
        fill(&mut r, &segs, 3).unwrap();
        assert_eq!(&r.as_slice()[..data.len() - 100], &data[100..]);
    }

    #[test]
    fn reuse_takes_the_best_fitting_spare_or_moves_the_largest_into_a_bigger_region() {
        let mark = |r: &mut Region, b: u8| r.as_mut_slice().fill(b);
        let (mut small, mut big) = (Region::new(4 << 20).unwrap(), Region::new(8 << 20).unwrap());
        mark(&mut small, 1);
        mark(&mut big, 2);
        let small_at = small.as_slice().as_ptr();
        // 3 MiB fits the 4 MiB spare: it is that spare, unchanged.
        let r = Region::reuse(vec![big, small], 3 << 20).unwrap();
        assert_eq!((r.as_slice().as_ptr(), r.len()), (small_at, 4 << 20));
        assert!(r.as_slice().iter().all(|&b| b == 1));
        // 5 MiB from spares of 4 and 2 MiB: the 4 MiB spare's pages at the
        // head of a new aligned 6 MiB region, fresh zeroes after them.
        let mut two = Region::new(2 << 20).unwrap();
        mark(&mut two, 3);
        let r = Region::reuse(vec![r, two], 5 << 20).unwrap();
        assert_eq!(r.len(), 6 << 20);
        assert_eq!(r.as_slice().as_ptr() as usize % REGION_ALIGN, 0);
        assert!(r.as_slice()[..4 << 20].iter().all(|&b| b == 1));
        assert!(r.as_slice()[4 << 20..].iter().all(|&b| b == 0));
        // No spares: a fresh region.
        let r = Region::reuse(Vec::new(), 1).unwrap();
        assert_eq!(r.len(), REGION_ALIGN);
        assert!(r.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn fill_reports_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8; 100]).unwrap();
        let mut r = Region::new(200).unwrap();
        let err = fill(
            &mut r,
            &[Segment {
                path: p,
                file_offset: 0,
                len: 200,
                region_offset: 0,
            }],
            2,
        )
        .unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
