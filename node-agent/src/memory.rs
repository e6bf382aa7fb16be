//! Process memory and glibc allocator introspection and tuning.
//!
//! Why this exists: model switching fragments glibc's heap until the host runs
//! out of memory (docs/memory.md). The cache keeps weights outside malloc, and
//! this module guards every other large allocation with a static
//! `M_MMAP_THRESHOLD`, measures RSS and `mallinfo2`, and logs a memory diff
//! around every load and move.

pub mod pool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;

/// glibc's `struct mallinfo2`: ten `size_t` fields in this order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MallInfo2 {
    pub arena: usize,
    pub ordblks: usize,
    pub smblks: usize,
    pub hblks: usize,
    pub hblkhd: usize,
    pub usmblks: usize,
    pub fsmblks: usize,
    pub uordblks: usize,
    pub fordblks: usize,
    pub keepcost: usize,
}

impl MallInfo2 {
    /// Free bytes malloc holds ÷ all bytes it holds (arena + mmapped); 0 when it holds nothing.
    pub fn fragmentation_ratio(&self) -> f64 {
        let held = (self.arena + self.hblkhd) as f64;
        if held == 0.0 {
            0.0
        } else {
            self.fordblks as f64 / held
        }
    }
}

type MallInfo2Fn = unsafe extern "C" fn() -> MallInfo2;

/// `mallinfo2`, looked up at run time so that an older glibc (before 2.33) or
/// another libc degrades to "unavailable" instead of failing to start.
fn mallinfo2_fn() -> Option<MallInfo2Fn> {
    static F: OnceLock<Option<MallInfo2Fn>> = OnceLock::new();
    *F.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches loaded objects.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallinfo2".as_ptr()) };
        if sym.is_null() {
            None
        } else {
            // SAFETY: glibc's mallinfo2 has exactly this signature.
            Some(unsafe { std::mem::transmute::<*mut libc::c_void, MallInfo2Fn>(sym) })
        }
    })
}

/// Current allocator statistics, when glibc provides them.
pub fn mallinfo2() -> Option<MallInfo2> {
    // SAFETY: calling glibc's mallinfo2 has no preconditions.
    mallinfo2_fn().map(|f| unsafe { f() })
}

/// Resident set size of this process, from /proc/self/statm.
pub fn resident_bytes() -> u64 {
    let page = page_size();
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

/// Peak RSS (VmHWM) of this process.
pub fn peak_resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The static mmap threshold in force; 0 means glibc's dynamic threshold.
static MMAP_THRESHOLD: AtomicU64 = AtomicU64::new(0);
static TRIM_RELEASED: AtomicU64 = AtomicU64::new(0);

/// Where the threshold in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdSource {
    /// `MALLOC_MMAP_THRESHOLD_` was set when the process started.
    Environment,
    /// Applied with `mallopt` from the agent's configuration.
    Mallopt,
    /// Neither worked: glibc's dynamic threshold is in effect.
    Dynamic,
}

/// Makes sure a static `M_MMAP_THRESHOLD` is in force: the environment's value
/// if `MALLOC_MMAP_THRESHOLD_` is set (glibc read it at start), otherwise
/// `configured` applied with `mallopt`, with a warning that the deployment
/// should set the variable. `configured` 0 leaves glibc's dynamic threshold
/// in effect (for measuring what the threshold buys; alerted).
pub fn ensure_mmap_threshold(configured: u64) -> (ThresholdSource, u64) {
    if let Some(v) = std::env::var("MALLOC_MMAP_THRESHOLD_")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        MMAP_THRESHOLD.store(v, Ordering::Relaxed);
        return (ThresholdSource::Environment, v);
    }
    if configured == 0 {
        tracing::warn!("--malloc-mmap-threshold 0: glibc's dynamic threshold is in effect and the heap may fragment");
        MMAP_THRESHOLD.store(0, Ordering::Relaxed);
        return (ThresholdSource::Dynamic, 0);
    }
    let value = configured.min(i32::MAX as u64) as libc::c_int;
    // SAFETY: mallopt is thread-safe and has no memory preconditions.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) } == 1;
    if ok {
        tracing::warn!(
            threshold = configured,
            "MALLOC_MMAP_THRESHOLD_ is not set; applied M_MMAP_THRESHOLD={configured} with mallopt (set the variable in the deployment to cover allocations made before start-up)"
        );
        MMAP_THRESHOLD.store(configured, Ordering::Relaxed);
        (ThresholdSource::Mallopt, configured)
    } else {
        tracing::warn!("could not set M_MMAP_THRESHOLD: glibc's dynamic threshold is in effect and the heap may fragment");
        MMAP_THRESHOLD.store(0, Ordering::Relaxed);
        (ThresholdSource::Dynamic, 0)
    }
}

/// The static mmap threshold in force (0: dynamic).
pub fn mmap_threshold() -> u64 {
    MMAP_THRESHOLD.load(Ordering::Relaxed)
}

/// Returns free heap memory to the system (`malloc_trim(0)`), and the bytes it released.
pub fn trim() -> u64 {
    let before = resident_bytes();
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let released = before.saturating_sub(resident_bytes());
    TRIM_RELEASED.fetch_add(released, Ordering::Relaxed);
    released
}

/// Bytes released by [`trim`] since start.
pub fn trim_released_total() -> u64 {
    TRIM_RELEASED.load(Ordering::Relaxed)
}

/// Memory of the process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryReading {
    pub resident: u64,
    pub device: Option<u64>,
    pub malloc: Option<MallInfo2>,
}

impl MemoryReading {
    pub fn capture(device_used: Option<u64>) -> Self {
        MemoryReading {
            resident: resident_bytes(),
            device: device_used,
            malloc: mallinfo2(),
        }
    }

    /// Multi-line diff in InvokeAI's format: label padded to 30 columns, the
    /// signed change and both values in GiB.
    pub fn diff(&self, after: &MemoryReading) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let line = |label: &str, a: u64, b: u64| {
            format!(
                "{label:<30}({:+.3}): {:.3}GB -> {:.3}GB",
                gib(b) - gib(a),
                gib(a),
                gib(b)
            )
        };
        let mut lines = vec![line("Process RAM", self.resident, after.resident)];
        if let (Some(a), Some(b)) = (self.malloc, after.malloc) {
            lines.push(line(
                "libc mmap allocated",
                a.hblkhd as u64,
                b.hblkhd as u64,
            ));
            lines.push(line(
                "libc arena used",
                a.uordblks as u64,
                b.uordblks as u64,
            ));
            lines.push(line(
                "libc arena free",
                a.fordblks as u64,
                b.fordblks as u64,
            ));
            lines.push(line(
                "libc total allocated",
                (a.arena + a.hblkhd) as u64,
                (b.arena + b.hblkhd) as u64,
            ));
            lines.push(line(
                "libc total used",
                (a.uordblks + a.hblkhd) as u64,
                (b.uordblks + b.hblkhd) as u64,
            ));
        }
        if let (Some(a), Some(b)) = (self.device, after.device) {
            lines.push(line("VRAM", a, b));
        }
        lines.join("\n")
    }
}

/// True when a measured change is far from the accounted size: more than 10%
/// of the larger of the two and more than 10 MiB apart.
pub fn misaccounted(measured: u64, accounted: u64) -> bool {
    let diff = measured.abs_diff(accounted);
    let tolerance = ((measured.max(accounted) as f64) * 0.1) as u64;
    diff > tolerance.max(10 * MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mallinfo2_layout_is_ten_words() {
        assert_eq!(std::mem::size_of::<MallInfo2>(), 10 * 8);
        assert_eq!(std::mem::offset_of!(MallInfo2, hblkhd), 4 * 8);
        assert_eq!(std::mem::offset_of!(MallInfo2, keepcost), 9 * 8);
        assert!(mallinfo2().is_some(), "this machine has glibc >= 2.33");
    }

    #[test]
    fn diff_format_and_sections() {
        let g = 1u64 << 30;
        let a = MemoryReading {
            resident: g,
            device: None,
            malloc: None,
        };
        let b = MemoryReading {
            resident: g + g / 2,
            device: None,
            malloc: None,
        };
        let d = a.diff(&b);
        assert_eq!(
            d,
            format!("{:<30}(+0.500): 1.000GB -> 1.500GB", "Process RAM")
        );
        let m = MallInfo2 {
            arena: 1,
            hblkhd: 2,
            uordblks: 3,
            fordblks: 4,
            ..Default::default()
        };
        let a = MemoryReading {
            resident: g,
            device: Some(0),
            malloc: Some(m),
        };
        let b = MemoryReading {
            resident: g,
            device: Some(g),
            malloc: Some(m),
        };
        let lines: Vec<_> = a
            .diff(&b)
            .lines()
            .map(|l| l[..30].trim().to_string())
            .collect();
        assert_eq!(
            lines,
            [
                "Process RAM",
                "libc mmap allocated",
                "libc arena used",
                "libc arena free",
                "libc total allocated",
                "libc total used",
                "VRAM"
            ]
        );
        let no_vram = MemoryReading { device: None, ..a };
        assert!(!no_vram.diff(&b).contains("VRAM"));
    }

    #[test]
    fn misaccounting_tolerance() {
        let mib = 1u64 << 20;
        assert!(!misaccounted(905 * mib, 1000 * mib));
        assert!(misaccounted(880 * mib, 1000 * mib));
        assert!(!misaccounted(14 * mib, 5 * mib));
        assert!(!misaccounted(5 * mib + 9 * mib, 5 * mib));
        assert!(misaccounted(5 * mib + 11 * mib, 5 * mib));
    }

    #[test]
    fn fragmentation_ratio_definition() {
        let m = MallInfo2 {
            arena: 300,
            hblkhd: 100,
            fordblks: 100,
            ..Default::default()
        };
        assert_eq!(m.fragmentation_ratio(), 0.25);
        assert_eq!(MallInfo2::default().fragmentation_ratio(), 0.0);
    }
}
