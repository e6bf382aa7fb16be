//! Downloads a model's files from an object store into a folder: ranged,
//! parallel within a file and bounded across files, resumed after a cut
//! connection or a restart, verified, and moved into place at once.
//!
//! Files are written into `.<name>.partial/` beside the destination, each
//! pre-sized, with a journal of the chunks already complete and each chunk's
//! CRC-32; only when every file is complete (and matches its checksum, where
//! one is known) does the folder take its final name. A failed checksum
//! removes the partial folder.
//!
//! Chunks are not synced one by one: that halves the throughput on a disk
//! that syncs at a few hundred MB/s. Instead a resumed download reads every
//! journaled chunk back and keeps only those whose CRC still matches, so a
//! journal line that reached the disk before its data (a power cut) costs a
//! refetch, not a corrupt model. Writeback of each chunk is started as it
//! completes, each file is synced once, when complete, and the folder after
//! its rename.

use futures::{StreamExt, TryStreamExt};
use object_store::{path::Path as ObjectPath, GetOptions, GetRange, ObjectStore};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// One file of a remote model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Where it is in the store.
    pub location: ObjectPath,
    /// Its path inside the model's folder.
    pub name: String,
    pub size: u64,
    /// The source's version of it (an ETag), if it says: a partial copy of
    /// another version is not resumed.
    pub version: Option<String>,
    /// Lowercase hex SHA-256 the source publishes for it, if any.
    pub sha256: Option<String>,
}

/// How a download is spread and how long it waits.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per ranged request.
    pub chunk_bytes: u64,
    /// Ranged requests in flight per file.
    pub chunks_in_flight: usize,
    /// Files downloaded at once.
    pub files_in_flight: usize,
    /// A response that sends nothing for this long is abandoned and resumed.
    pub idle_timeout: Duration,
    /// Failed attempts in a row (without a byte of progress) before a chunk,
    /// and so the download, fails.
    pub attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_bytes: 16 << 20,
            chunks_in_flight: 4,
            files_in_flight: 2,
            idle_timeout: Duration::from_secs(30),
            attempts: 5,
        }
    }
}

/// Why a download failed. Messages name the file and never carry credentials
/// (object_store's errors name the request, not its signature).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: {message}")]
    Source { name: String, message: String },
    #[error("{name}: the source sent more than the {size} bytes it listed")]
    TooLong { name: String, size: u64 },
    #[error(
        "{name}: sha256 is {got} but the source lists {want}; the partial download was removed"
    )]
    Checksum {
        name: String,
        want: String,
        got: String,
    },
    #[error("{0} already exists; a download never replaces a model")]
    Exists(PathBuf),
    #[error("{name}: not a relative path inside the model's folder")]
    BadName { name: String },
}

/// Bytes gathered before a write to the partial file.
const WRITE_BUFFER: usize = 4 << 20;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a model being downloaded to `dest` is staged.
pub fn partial_dir(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

/// Downloads `files` into the folder `dest`, which must not exist yet;
/// `progress` hears the bytes on disk and the total after every write.
/// Returns the bytes transferred in this call (what a resumed download did
/// not have yet).
pub async fn download(
    store: Arc<dyn ObjectStore>,
    files: &[RemoteFile],
    dest: &Path,
    opts: &Options,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<u64, DownloadError> {
    if tokio::fs::try_exists(dest).await.map_err(io(dest))? {
        return Err(DownloadError::Exists(dest.to_path_buf()));
    }
    for f in files {
        let ok = !f.name.is_empty()
            && Path::new(&f.name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(DownloadError::BadName {
                name: f.name.clone(),
            });
        }
    }
    let staging = partial_dir(dest);
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(io(&staging))?;
    let transfer = Transfer {
        store: store.as_ref(),
        opts,
        done: AtomicU64::new(0),
        fetched: AtomicU64::new(0),
        total: files.iter().map(|f| f.size).sum(),
        progress,
    };
    // The futures are made up front (they start when polled): a stream that
    // maps with a closure over `&RemoteFile` is not `Send` to the compiler,
    // and a placement runs this on a spawned task.
    let files_futures: Vec<_> = files.iter().map(|f| transfer.file(f, &staging)).collect();
    let result = futures::stream::iter(files_futures)
        .buffer_unordered(opts.files_in_flight.max(1))
        .try_collect::<Vec<()>>()
        .await;
    if let Err(e) = result {
        if matches!(e, DownloadError::Checksum { .. }) {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        return Err(e);
    }
    // Journals go; the folder takes its name in one rename.
    for f in files {
        let journal = journal_path(&staging, &f.name);
        tokio::fs::remove_file(&journal)
            .await
            .map_err(io(&journal))?;
    }
    tokio::fs::rename(&staging, dest).await.map_err(io(dest))?;
    // The rename lasts once the folder holding it is synced.
    if let Some(parent) = dest.parent() {
        let dir = tokio::fs::File::open(parent).await.map_err(io(parent))?;
        dir.sync_all().await.map_err(io(parent))?;
    }
    Ok(transfer.fetched.load(Ordering::Relaxed))
}

fn journal_path(staging: &Path, name: &str) -> PathBuf {
    let file = staging.join(name);
    let base = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.with_file_name(format!(".{base}.chunks"))
}

/// The chunks a journal lists as complete, with their CRC-32s, if it was
/// written for this version of the file (its first line: size and version).
fn read_journal(text: &str, header: &str) -> Option<BTreeMap<u64, u32>> {
    let mut lines = text.lines();
    if lines.next()? != header {
        return None;
    }
    Some(
        lines
            .filter_map(|l| {
                let (i, crc) = l.trim().split_once(' ')?;
                Some((i.parse().ok()?, u32::from_str_radix(crc, 16).ok()?))
            })
            .collect(),
    )
}

/// The journaled chunks of `path` whose bytes on disk still match their
/// CRC-32, read off the async workers.
async fn still_intact(
    path: &Path,
    journaled: BTreeMap<u64, u32>,
    chunk: u64,
    size: u64,
) -> Result<BTreeSet<u64>, DownloadError> {
    let p = path.to_path_buf();
    blocking(path, move || {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&p)?;
        let mut buf = Vec::new();
        let mut intact = BTreeSet::new();
        for (i, crc) in journaled {
            let start = i.saturating_mul(chunk);
            if start >= size {
                continue;
            }
            buf.resize(chunk.min(size - start) as usize, 0);
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut buf)?;
            if crc32fast::hash(&buf) == crc {
                intact.insert(i);
            }
        }
        Ok(intact)
    })
    .await
}

/// Runs file work on the blocking pool, its errors naming `path`.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, DownloadError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(io(path))
}

/// One download in progress: where from, how, and how far it got.
struct Transfer<'a> {
    store: &'a dyn ObjectStore,
    opts: &'a Options,
    /// Bytes on disk, resumed ones included.
    done: AtomicU64,
    /// Bytes received in this call.
    fetched: AtomicU64,
    total: u64,
    progress: &'a (dyn Fn(u64, u64) + Send + Sync),
}

impl Transfer<'_> {
    /// Downloads one file into `staging`, skipping the chunks its journal
    /// lists, and checks its SHA-256 when the source publishes one.
    async fn file(&self, file: &RemoteFile, staging: &Path) -> Result<(), DownloadError> {
        let path = staging.join(&file.name);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        let journal = journal_path(staging, &file.name);
        let header = format!("{} {}", file.size, file.version.as_deref().unwrap_or("-"));
        let complete = match tokio::fs::read_to_string(&journal).await {
            Ok(text) => read_journal(&text, &header),
            Err(_) => None,
        };
        let chunk = self.opts.chunk_bytes.max(1);
        let complete = match complete {
            Some(c) if tokio::fs::try_exists(&path).await.unwrap_or(false) => {
                still_intact(&path, c, chunk, file.size).await?
            }
            _ => {
                // Nothing reusable: start this file over.
                let f = tokio::fs::File::create(&path).await.map_err(io(&path))?;
                f.set_len(file.size).await.map_err(io(&path))?;
                tokio::fs::write(&journal, format!("{header}\n"))
                    .await
                    .map_err(io(&journal))?;
                Default::default()
            }
        };
        let chunks: Vec<(u64, std::ops::Range<u64>)> = (0..file.size.div_ceil(chunk))
            .map(|i| (i, i * chunk..((i + 1) * chunk).min(file.size)))
            .collect();
        for (_, r) in chunks.iter().filter(|(i, _)| complete.contains(i)) {
            self.done.fetch_add(r.end - r.start, Ordering::Relaxed);
        }
        (self.progress)(self.done.load(Ordering::Relaxed), self.total);
        let log = tokio::sync::Mutex::new(
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(&journal)
                .await
                .map_err(io(&journal))?,
        );
        futures::stream::iter(chunks.into_iter().filter(|(i, _)| !complete.contains(i)))
            .map(|(i, range)| {
                let (path, log) = (&path, &log);
                async move {
                    let crc = self.range(file, path, range).await?;
                    let mut log = log.lock().await;
                    log.write_all(format!("{i} {crc:08x}\n").as_bytes())
                        .await
                        .map_err(io(path))?;
                    log.flush().await.map_err(io(path))
                }
            })
            .buffer_unordered(self.opts.chunks_in_flight.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let written = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await
            .map_err(io(&path))?;
        written.sync_all().await.map_err(io(&path))?;
        if let Some(want) = &file.sha256 {
            let got = sha256_of(&path).await?;
            if !got.eq_ignore_ascii_case(want) {
                return Err(DownloadError::Checksum {
                    name: file.name.clone(),
                    want: want.to_ascii_lowercase(),
                    got,
                });
            }
        }
        Ok(())
    }

    /// Fetches `range` of `file` into `path` at the same offsets, resuming
    /// from the last byte written when a response fails, stalls or ends
    /// early; returns the range's CRC-32.
    async fn range(
        &self,
        file: &RemoteFile,
        path: &Path,
        range: std::ops::Range<u64>,
    ) -> Result<u32, DownloadError> {
        let opts = self.opts;
        let mut crc = crc32fast::Hasher::new();
        let mut at = range.start;
        let mut failures = 0u32;
        // Frames are small (tens of KiB); each write to a tokio file is a
        // trip to the blocking pool, so they are gathered into large writes.
        let mut out = tokio::io::BufWriter::with_capacity(
            WRITE_BUFFER,
            tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .map_err(io(path))?,
        );
        let mut last_error = String::new();
        while at < range.end {
            if failures >= opts.attempts.max(1) {
                return Err(DownloadError::Source {
                    name: file.name.clone(),
                    message: format!("{last_error} (after {failures} attempts)"),
                });
            }
            if failures > 0 {
                tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
            }
            let get = GetOptions {
                range: Some(GetRange::Bounded(at..range.end)),
                ..Default::default()
            };
            let mut stream = match self.store.get_opts(&file.location, get).await {
                Ok(r) => r.into_stream(),
                Err(e) => {
                    // A missing object or refused credentials do not get better.
                    if matches!(
                        e,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                    ) {
                        return Err(DownloadError::Source {
                            name: file.name.clone(),
                            message: e.to_string(),
                        });
                    }
                    last_error = e.to_string();
                    failures += 1;
                    continue;
                }
            };
            out.seek(std::io::SeekFrom::Start(at))
                .await
                .map_err(io(path))?;
            loop {
                match tokio::time::timeout(opts.idle_timeout, stream.next()).await {
                    Err(_) => {
                        last_error = format!("no data for {} s", opts.idle_timeout.as_secs());
                        failures += 1;
                        break;
                    }
                    Ok(None) => {
                        if at < range.end {
                            last_error =
                                format!("the response ended at byte {at} of {}", range.end);
                            failures += 1;
                        }
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        last_error = e.to_string();
                        failures += 1;
                        break;
                    }
                    Ok(Some(Ok(bytes))) => {
                        let n = bytes.len() as u64;
                        if at + n > range.end {
                            return Err(DownloadError::TooLong {
                                name: file.name.clone(),
                                size: file.size,
                            });
                        }
                        out.write_all(&bytes).await.map_err(io(path))?;
                        crc.update(&bytes);
                        at += n;
                        failures = 0;
                        self.fetched.fetch_add(n, Ordering::Relaxed);
                        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
                        (self.progress)(done, self.total);
                    }
                }
            }
        }
        out.flush().await.map_err(io(path))?;
        start_writeback(out.into_inner(), range).await;
        Ok(crc.finalize())
    }
}

/// Asks the kernel to start writing `range` of the file to disk now, without
/// waiting for it: the disk then works while the network does, and the
/// file's one sync at the end has little left to wait for.
async fn start_writeback(file: tokio::fs::File, range: std::ops::Range<u64>) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let file = file.into_std().await;
        let _ = tokio::task::spawn_blocking(move || {
            // SAFETY: the descriptor is open for as long as `file` lives.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    range.start as libc::off64_t,
                    (range.end - range.start) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            }
        })
        .await;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, range);
}

/// Lowercase hex SHA-256 of a file, read off the async workers.
pub async fn sha256_of(path: &Path) -> Result<String, DownloadError> {
    let p = path.to_path_buf();
    blocking(path, move || {
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(crate::store::identity::hex(&h.finalize()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_of_another_version_is_not_reused() {
        assert_eq!(
            read_journal("10 abc\n0 0000000a\n2 ffffffff\nbroken\n", "10 abc"),
            Some([(0, 10), (2, u32::MAX)].into_iter().collect())
        );
        assert_eq!(read_journal("10 abc\n0 00000000\n", "10 def"), None);
        assert_eq!(read_journal("", "10 abc"), None);
    }

    #[test]
    fn staging_is_a_hidden_sibling() {
        assert_eq!(
            partial_dir(Path::new("/m/.downloads/sdxl")),
            Path::new("/m/.downloads/.sdxl.partial")
        );
    }
}
