//! The disk tier's block file: one preallocated file of `num_slots` fixed-size slots, plus a
//! small worker pool to run disk I/O off the caller's thread.
//!
//! Design: the file starts with a 4 KiB header (`HEADER_BYTES`: a magic line naming it a
//! ferrumkv disk tier file, then its geometry), and slot `i` lives at byte offset
//! `HEADER_BYTES + i * slot_bytes`. The whole file is preallocated at construction
//! (`posix_fallocate`, or `set_len` where the filesystem cannot preallocate), so a full disk
//! fails once, at [`DiskFile::create`], with an error naming the path, rather than on some
//! later write.
//!
//! Whose file it is: the user names the path, so the file there may be anything. The rule:
//! - a path that does not exist is created (`O_CREAT | O_EXCL`, mode 0600);
//! - a path that exists must be a regular file whose last component is not a symbolic link
//!   (checked, then opened with `O_NOFOLLOW`, so a link swapped in meanwhile fails too), and
//!   it is taken over only if it is empty or starts with the magic line (a disk tier file an
//!   earlier cache left behind). Anything else is refused with an error naming the path, so
//!   a file the user had is never truncated or overwritten, whatever links point at it;
//! - the file is locked (`flock(LOCK_EX | LOCK_NB)`) before anything about it changes, so two
//!   caches given the same path cannot wipe each other's tier: the second fails, naming the
//!   path, and the first keeps working. The lock lasts until [`DiskFile::release`] (the
//!   engine's close) or the drop;
//! - a failed preallocation removes the file only if this call created it (and the path
//!   still names it); a file that was there gets its old length back.
//!
//! Every access is a positioned read or write (`pread`/`pwrite`), so `&DiskFile` methods
//! run from many threads at once with no seek lock.
//!
//! Integrity: each slot has an in-memory record `Option<u64>`, the xxh3-64 checksum of the
//! bytes last written successfully (`None`: never written, or its last write failed, so a
//! checksum of 0 is an ordinary value). A write first clears the record, then writes, then
//! records the new checksum; a read reads the bytes, then compares them with the record
//! taken *after* the read. So:
//! - Invariant: `read_block` returns `Ok` only for bytes whose checksum equals the record of
//!   the slot's last successful write; anything else (never written, failed write, bit rot,
//!   a read racing a write of the same slot) is [`ReadError::Corrupt`] or [`ReadError::Io`],
//!   which the caller treats as a cache miss. The races can only produce a false `Corrupt`,
//!   never stale or torn bytes handed out as good.
//! - Invariant: a failed or short write leaves the slot's record `None`; it never keeps a
//!   stale checksum that would validate old bytes as new.
//! - The checksums live only in memory: the file is kept when the `DiskFile` is dropped (the
//!   user chose its path), but its slots are meaningless once the process exits; a later
//!   cache taking the file over trusts none of them.
//!
//! Fault injection ([`DiskFile::inject`]) is compiled always but reachable only through that
//! explicit call; the engine never calls it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::thread::JoinHandle;
use crate::sync::{Arc, Condvar, Mutex};

/// Why a [`DiskFile::read_block`] gave no data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The read itself failed or came back short.
    #[error("{0}")]
    Io(String),
    /// The slot was never written, its last write failed, or its bytes fail their checksum.
    #[error("disk tier slot {slot}: checksum mismatch (corrupt or never written)")]
    Corrupt { slot: usize },
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        Error::Io(e.to_string())
    }
}

/// A fault for tests; see [`DiskFile::inject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next `write_block` returns an `Io` error without writing (and invalidates its slot).
    FailNextWrite,
    /// The next `read_block` that reaches the file (its slot holds a checksum) reads fewer
    /// bytes than a slot and returns the short-read error.
    ShortNextRead,
    /// Flips (XOR 0xFF) one byte of a slot in the file, bypassing the checksum: bit rot.
    FlipByte { slot: usize, offset: usize },
}

/// Cumulative I/O counters of one [`DiskFile`].
///
/// `blocks_written`/`bytes_written`: successful writes. `blocks_read`/`bytes_read`: reads
/// that transferred a whole slot off the file, whether or not it then passed its checksum.
/// `checksum_failures`: such reads whose bytes failed their checksum (a never-written slot
/// returns `Corrupt` without any I/O and is not counted). `*_seconds`: time spent in the
/// positioned I/O of every attempt, failed ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IoStats {
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub checksum_failures: u64,
    pub write_seconds: f64,
    pub read_seconds: f64,
}

#[derive(Debug, Default)]
struct Counters {
    blocks_written: AtomicU64,
    blocks_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    checksum_failures: AtomicU64,
    write_nanos: AtomicU64,
    read_nanos: AtomicU64,
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(nanos, Ordering::Relaxed);
}

/// Counts one operation as in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The disk tier's preallocated block file. `Send + Sync`; every method takes `&self`.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    num_slots: usize,
    slot_bytes: usize,
    /// Per slot: checksum of the last successful write; `None` = no valid contents.
    checksums: Vec<Mutex<Option<u64>>>,
    fail_next_write: AtomicBool,
    short_next_read: AtomicBool,
    counters: Counters,
    in_flight: AtomicUsize,
    /// Set by `release`: the lock is given up and no I/O may follow.
    released: AtomicBool,
}

/// The first bytes of every disk tier file: what makes a file at `disk_path` ours.
const MAGIC: &[u8] = b"ferrumkv disk tier\n";

/// The file's header: `MAGIC`, a line of geometry for humans, zeros. Slots start after it
/// (4 KiB keeps them aligned as they were).
pub const HEADER_BYTES: usize = 4096;

fn header(num_slots: usize, slot_bytes: usize) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(format!("v1 slots={num_slots} slot_bytes={slot_bytes}\n").as_bytes());
    h.resize(HEADER_BYTES, 0);
    h
}

/// An open of `path` that never follows a symbolic link in its last component.
fn open_nofollow(path: &Path, create_new: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY);
    if create_new {
        // O_CREAT | O_EXCL: fails on anything already there, a symbolic link included.
        o.create_new(true).mode(0o600);
    }
    o.open(path)
}

fn is_symlink_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Opens the file at `path` for the disk tier: creates it, or reopens one that is there.
/// Returns the file and whether this call created it.
fn open_file(path: &Path) -> Result<(File, bool)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Io(format!(
            "cannot {what} disk tier file {}: {e}",
            path.display()
        ))
    };
    let symlink = || {
        Error::Io(format!(
            "disk tier file {} is a symbolic link; the disk tier does not follow links (give \
             it the link's target, or another path)",
            path.display()
        ))
    };
    // The path may appear or vanish between the two opens (another process): retry then.
    for _ in 0..8 {
        match open_nofollow(path, true) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail("create", &e)),
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink()),
            Ok(m) if !m.file_type().is_file() => {
                return Err(Error::Io(format!(
                    "disk tier file {} exists and is not a regular file",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail("inspect", &e)),
        }
        match open_nofollow(path, false) {
            Ok(f) => return Ok((f, false)),
            Err(e) if is_symlink_error(&e) => return Err(symlink()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail("open", &e)),
        }
    }
    Err(Error::Io(format!(
        "cannot open disk tier file {}: it keeps appearing and vanishing",
        path.display()
    )))
}

/// Takes the exclusive lock that makes the file one cache's (`flock`, so it belongs to this
/// open file: a second open, in this process or another, cannot take it).
fn lock_exclusive(path: &Path, file: &File) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: `file` owns an open descriptor for the whole call; flock takes integers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::Io(format!(
                    "disk tier file {} is in use by another cache (it holds the file's lock); \
                     give each cache its own disk_path",
                    path.display()
                )))
            }
            _ => {
                return Err(Error::Io(format!(
                    "cannot lock disk tier file {}: {e}",
                    path.display()
                )))
            }
        }
    }
}

/// Whether `file` holds nothing a user could lose: empty, or a disk tier file (`MAGIC`).
fn is_ours_or_empty(file: &File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let mut head = vec![0u8; MAGIC.len()];
    let got = read_fully_at(file, &mut head, 0)?;
    Ok(got == MAGIC.len() && head == MAGIC)
}

/// Whether `path` still names `file` (not something put in its place since).
fn path_names(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl DiskFile {
    /// Opens the disk tier's file at `path`, locks it, and preallocates a header and
    /// `num_slots * slot_bytes` bytes of slots.
    ///
    /// The rule (see the module header): a path that does not exist is created (mode 0600);
    /// a path that exists must be a regular file reached without a symbolic link, and is
    /// taken over only if it is empty or starts with our header (a disk tier file left by an
    /// earlier cache), so no file the user had is ever truncated or overwritten. A file
    /// another `DiskFile` holds (its lock) is refused before anything changes. A failed
    /// preallocation removes the file only if this call created it, else puts its length
    /// back. Every such refusal or failure is an `Error::Io` naming the path; a zero
    /// `slot_bytes` or a size too large is an `Error::InvalidArgument`.
    pub fn create(path: &Path, num_slots: usize, slot_bytes: usize) -> Result<DiskFile> {
        if slot_bytes == 0 {
            return Err(Error::InvalidArgument(
                "disk tier slot size must be at least 1 byte".into(),
            ));
        }
        let total = num_slots
            .checked_mul(slot_bytes)
            .and_then(|t| t.checked_add(HEADER_BYTES))
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| i64::try_from(t).is_ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "disk tier file of {num_slots} slots of {slot_bytes} bytes is too large"
                ))
            })?;
        let (file, created) = open_file(path)?;
        let io_err = |what: &str, e: io::Error| {
            Error::Io(format!(
                "cannot {what} disk tier file {}: {e}",
                path.display()
            ))
        };
        let meta = file.metadata().map_err(|e| io_err("inspect", e))?;
        if !meta.file_type().is_file() {
            return Err(Error::Io(format!(
                "disk tier file {} exists and is not a regular file",
                path.display()
            )));
        }
        // From here on the file is ours alone; a lost race leaves it to its holder, untouched.
        lock_exclusive(path, &file)?;
        let old_len = meta.len();
        if !created && !is_ours_or_empty(&file, old_len).map_err(|e| io_err("read", e))? {
            return Err(Error::Io(format!(
                "{} exists and is not a ferrumkv disk tier file; refusing to overwrite it \
                 (remove it, or give the disk tier another path)",
                path.display()
            )));
        }
        let setup = || -> io::Result<()> {
            preallocate(&file, total)?;
            if old_len > total {
                file.set_len(total)?; // our own, larger file from an earlier run
            }
            file.write_all_at(&header(num_slots, slot_bytes), 0)
        };
        if let Err(e) = setup() {
            // Best effort: leave no trace, and never remove a file that was there before.
            if created {
                if path_names(path, &file) {
                    let _ = std::fs::remove_file(path);
                }
            } else if file.metadata().is_ok_and(|m| m.len() != old_len) {
                let _ = file.set_len(old_len);
            }
            return Err(Error::Io(format!(
                "cannot preallocate {total} bytes for disk tier file {}: {e}",
                path.display()
            )));
        }
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            num_slots,
            slot_bytes,
            checksums: (0..num_slots).map(|_| Mutex::new(None)).collect(),
            fail_next_write: AtomicBool::new(false),
            short_next_read: AtomicBool::new(false),
            counters: Counters::default(),
            in_flight: AtomicUsize::new(0),
            released: AtomicBool::new(false),
        })
    }

    /// Gives the file up (the engine's close, once its disk threads are joined): releases
    /// the lock, so another cache may take the file over, and fails every later read or
    /// write with an `Io` error, so this one never touches it again. Idempotent.
    pub fn release(&self) {
        use std::os::unix::io::AsRawFd;
        if !self.released.swap(true, Ordering::AcqRel) {
            // SAFETY: `self.file` owns an open descriptor; flock takes integers. Unlocking
            // cannot fail on a descriptor we hold; closing it (drop) would unlock it anyway.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }

    fn released_error(&self) -> String {
        format!(
            "disk tier file {} was released (the cache is closed)",
            self.path.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Byte offset of `slot` in the file. Panics on a slot out of range (an engine bug).
    fn offset(&self, slot: usize) -> u64 {
        assert!(
            slot < self.num_slots,
            "disk slot {slot} out of range ({} slots)",
            self.num_slots
        );
        // Cannot overflow: the header and `num_slots * slot_bytes` fit in i64 at `create`.
        (HEADER_BYTES + slot * self.slot_bytes) as u64
    }

    fn check_len(&self, len: usize) {
        assert_eq!(
            len, self.slot_bytes,
            "disk block buffer must be exactly one slot"
        );
    }

    /// Writes one block (`data.len() == slot_bytes`) to `slot` and records its checksum.
    /// On failure the slot is left invalid (reads of it are `Corrupt`).
    /// Panics on a slot out of range or a buffer of the wrong length (engine bugs).
    pub fn write_block(&self, slot: usize, data: &[u8]) -> Result<()> {
        let off = self.offset(slot);
        self.check_len(data.len());
        let _guard = InFlight::enter(&self.in_flight);
        // Invalidate first: from here until the new checksum is recorded, no read can
        // validate whatever bytes the slot holds.
        *self.checksums[slot].lock() = None;
        if self.released.load(Ordering::Acquire) {
            return Err(Error::Io(self.released_error()));
        }
        if self.fail_next_write.swap(false, Ordering::AcqRel) {
            return Err(Error::Io(format!(
                "write of disk tier slot {slot} to {} failed: injected fault",
                self.path.display()
            )));
        }
        let hash = xxh3_64(data);
        let start = Instant::now();
        let res = self.file.write_all_at(data, off);
        add_elapsed(&self.counters.write_nanos, start);
        res.map_err(|e| {
            Error::Io(format!(
                "write of disk tier slot {slot} ({} bytes at offset {off}) to {} failed: {e}",
                data.len(),
                self.path.display()
            ))
        })?;
        *self.checksums[slot].lock() = Some(hash);
        self.counters.blocks_written.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the block of `slot` into `out` (`out.len() == slot_bytes`) and verifies it.
    /// On any `Err` the contents of `out` are unspecified and must not be used.
    /// Panics on a slot out of range or a buffer of the wrong length (engine bugs).
    pub fn read_block(&self, slot: usize, out: &mut [u8]) -> std::result::Result<(), ReadError> {
        let off = self.offset(slot);
        self.check_len(out.len());
        let _guard = InFlight::enter(&self.in_flight);
        if self.checksums[slot].lock().is_none() {
            return Err(ReadError::Corrupt { slot });
        }
        if self.released.load(Ordering::Acquire) {
            return Err(ReadError::Io(self.released_error()));
        }
        let want = if self.short_next_read.swap(false, Ordering::AcqRel) {
            out.len() - 1 // slot_bytes >= 1
        } else {
            out.len()
        };
        let start = Instant::now();
        let res = read_fully_at(&self.file, &mut out[..want], off);
        add_elapsed(&self.counters.read_nanos, start);
        let got = res.map_err(|e| {
            ReadError::Io(format!(
                "read of disk tier slot {slot} ({} bytes at offset {off}) from {} failed: {e}",
                out.len(),
                self.path.display()
            ))
        })?;
        if got < out.len() {
            return Err(ReadError::Io(format!(
                "short read of disk tier slot {slot} from {}: got {got} of {} bytes at offset {off}",
                self.path.display(),
                out.len()
            )));
        }
        self.counters.blocks_read.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        // The record is taken after the read: a write racing this read has cleared it or
        // replaced it, so torn or stale bytes can only fail here.
        let expected = *self.checksums[slot].lock();
        if expected != Some(xxh3_64(out)) {
            self.counters
                .checksum_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(ReadError::Corrupt { slot });
        }
        Ok(())
    }

    /// Arms or applies a fault, for tests. `FailNextWrite`/`ShortNextRead` affect the next
    /// `write_block`/`read_block` on any thread; `FlipByte` flips the byte now, on disk.
    /// Panics if `FlipByte` is out of range or its I/O fails (a test API, never the engine's).
    pub fn inject(&self, fault: Fault) {
        match fault {
            Fault::FailNextWrite => self.fail_next_write.store(true, Ordering::Release),
            Fault::ShortNextRead => self.short_next_read.store(true, Ordering::Release),
            Fault::FlipByte { slot, offset } => {
                assert!(offset < self.slot_bytes, "FlipByte offset out of range");
                let pos = self.offset(slot) + offset as u64;
                let mut b = [0u8; 1];
                self.file
                    .read_exact_at(&mut b, pos)
                    .expect("FlipByte: read of the disk tier file failed");
                b[0] ^= 0xFF;
                self.file
                    .write_all_at(&b, pos)
                    .expect("FlipByte: write of the disk tier file failed");
            }
        }
    }

    /// A snapshot of the cumulative I/O counters.
    pub fn io_stats(&self) -> IoStats {
        let c = &self.counters;
        let secs = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 * 1e-9;
        IoStats {
            blocks_written: c.blocks_written.load(Ordering::Relaxed),
            blocks_read: c.blocks_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            checksum_failures: c.checksum_failures.load(Ordering::Relaxed),
            write_seconds: secs(&c.write_nanos),
            read_seconds: secs(&c.read_nanos),
        }
    }

    /// Operations currently inside `write_block`/`read_block` (the `inflight_disk_ops` gauge).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Reads into `buf` from `off` until it is full or the file ends; returns the bytes read.
fn read_fully_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reserves `len` bytes of disk for `file`, so later writes cannot fail for lack of space.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let len_off = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file size too large"))?;
    loop {
        // SAFETY: `file` owns an open descriptor for the whole call; posix_fallocate takes
        // plain integers and touches no memory of ours.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            // The filesystem cannot preallocate: size the file instead (sparse).
            libc::EOPNOTSUPP | libc::ENOSYS => return file.set_len(len),
            code => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A fixed pool of threads ("ferrumkv-disk-N") running disk I/O jobs in submission order.
///
/// Invariant: every job submitted is run exactly once: by a worker, or, once the pool is
/// shut down, inline on the submitting thread. `shutdown` (and `Drop`) runs every queued
/// job before it returns. A panicking job is contained; its worker keeps going.
pub struct DiskWorkers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for DiskWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskWorkers")
            .field("threads", &self.threads.lock().len())
            .field("queued", &self.shared.queue.lock().jobs.len())
            .finish()
    }
}

impl DiskWorkers {
    /// Starts `threads` workers (at least one). Failing to spawn a thread is `Error::Io`.
    pub fn new(threads: usize) -> Result<DiskWorkers> {
        let pool = DiskWorkers {
            shared: Arc::new(Shared::default()),
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let handle = crate::sync::thread::Builder::new()
                .name(format!("ferrumkv-disk-{i}"))
                .spawn(move || worker(&shared))
                .map_err(|e| Error::Io(format!("cannot start disk worker thread: {e}")))?;
            pool.threads.lock().push(handle);
        }
        Ok(pool)
    }

    /// Queues `job`. After `shutdown` it runs inline on the caller's thread instead.
    pub fn submit(&self, job: Job) {
        let mut q = self.shared.queue.lock();
        if q.closed {
            drop(q);
            run_job(job);
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Jobs queued and not yet started.
    pub fn queued(&self) -> usize {
        self.shared.queue.lock().jobs.len()
    }

    /// Runs every queued job, then joins the workers. Idempotent. Called from a worker's own
    /// job, it does not wait for that worker (which would deadlock).
    pub fn shutdown(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.ready.notify_all();
        let handles = std::mem::take(&mut *self.threads.lock());
        let me = crate::sync::thread::current().id();
        for h in handles {
            if h.thread().id() != me {
                // Jobs run under catch_unwind, so a worker never panics.
                let _ = h.join();
            }
        }
    }
}

impl Drop for DiskWorkers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_job(job: Job) {
    // The panic hook has already reported a panic; keep the worker alive for later jobs.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                shared.ready.wait(&mut q);
            }
        };
        run_job(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    /// Deterministic pseudo-random bytes (splitmix64).
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    fn file(dir: &tempfile::TempDir, slots: usize, slot_bytes: usize) -> DiskFile {
        DiskFile::create(&dir.path().join("blocks.bin"), slots, slot_bytes).unwrap()
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<DiskFile>();
        check::<DiskWorkers>();
    }

    #[test]
    fn create_preallocates() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 10, 4096);
        assert_eq!(
            std::fs::metadata(f.path()).unwrap().len(),
            HEADER_BYTES as u64 + 10 * 4096
        );
        assert_eq!((f.num_slots(), f.slot_bytes()), (10, 4096));
    }

    #[test]
    fn round_trip_many_slots() {
        let dir = tempfile::tempdir().unwrap();
        let (slots, sb) = (64, 1000);
        let f = file(&dir, slots, sb);
        let blocks: Vec<Vec<u8>> = (0..slots).map(|i| bytes(i as u64 + 1, sb)).collect();
        // Write in a scrambled order, then overwrite some.
        for i in (0..slots).rev().step_by(2).chain((0..slots).step_by(2)) {
            f.write_block(i, &blocks[i]).unwrap();
        }
        let mut out = vec![0u8; sb];
        for (i, b) in blocks.iter().enumerate() {
            f.read_block(i, &mut out).unwrap();
            assert_eq!(&out, b, "slot {i}");
        }
        let newer = bytes(999, sb);
        f.write_block(7, &newer).unwrap();
        f.read_block(7, &mut out).unwrap();
        assert_eq!(out, newer);
        f.read_block(8, &mut out).unwrap();
        assert_eq!(out, blocks[8]);
    }

    #[test]
    fn zero_checksum_block_is_valid() {
        // Whatever the hash of a block, `Some(h)` marks it valid; all zero bytes (the state of
        // a freshly preallocated slot) must still read back once written.
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 2, 16);
        let mut out = [1u8; 16];
        assert_eq!(
            f.read_block(0, &mut out),
            Err(ReadError::Corrupt { slot: 0 })
        );
        f.write_block(0, &[0u8; 16]).unwrap();
        f.read_block(0, &mut out).unwrap();
        assert_eq!(out, [0u8; 16]);
    }

    #[test]
    fn concurrent_writers_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let (threads, per, sb) = (4usize, 32usize, 4096usize);
        let f = file(&dir, threads * per, sb);
        std::thread::scope(|s| {
            for t in 0..threads {
                let f = &f;
                s.spawn(move || {
                    let mut out = vec![0u8; sb];
                    for round in 0..4u64 {
                        for k in 0..per {
                            let slot = t * per + k;
                            let data = bytes(round * 10_000 + slot as u64, sb);
                            f.write_block(slot, &data).unwrap();
                            f.read_block(slot, &mut out).unwrap();
                            assert_eq!(out, data);
                        }
                    }
                });
            }
        });
        let mut out = vec![0u8; sb];
        for slot in 0..threads * per {
            f.read_block(slot, &mut out).unwrap();
            assert_eq!(out, bytes(3 * 10_000 + slot as u64, sb));
        }
        assert_eq!(f.in_flight(), 0);
        let st = f.io_stats();
        assert_eq!(st.blocks_written, (threads * per * 4) as u64);
        assert_eq!(st.blocks_read, (threads * per * 5) as u64);
    }

    #[test]
    fn unwritable_path_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no_such_dir").join("blocks.bin");
        for p in [missing.as_path(), dir.path()] {
            match DiskFile::create(p, 4, 64) {
                Err(Error::Io(msg)) => {
                    assert!(msg.contains(&p.display().to_string()), "{msg}");
                }
                other => panic!("expected Io error, got {other:?}"),
            }
        }
        assert!(matches!(
            DiskFile::create(&dir.path().join("x"), 4, 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            DiskFile::create(&dir.path().join("x"), usize::MAX, 2),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn full_disk_fails_at_create() {
        // Larger than any test filesystem: posix_fallocate fails with ENOSPC/EFBIG (or, where
        // preallocation is unsupported, set_len may succeed sparsely; then there is nothing to
        // check).
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.bin");
        match DiskFile::create(&p, 1 << 20, 1 << 30) {
            Err(Error::Io(msg)) => {
                assert!(msg.contains(&p.display().to_string()), "{msg}");
                assert!(msg.contains("preallocate"), "{msg}");
                assert!(!p.exists(), "a failed file is removed");
            }
            Ok(_) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }

    fn io_err(r: Result<DiskFile>) -> String {
        match r {
            Err(Error::Io(msg)) => msg,
            other => panic!("expected an Io error, got {other:?}"),
        }
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious.txt");
        std::fs::write(&target, b"the user's own bytes").unwrap();
        let link = dir.path().join("kv.bin");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let msg = io_err(DiskFile::create(&link, 4, 64));
        assert!(msg.contains(&link.display().to_string()), "{msg}");
        assert!(msg.contains("symbolic link"), "{msg}");
        assert_eq!(std::fs::read(&target).unwrap(), b"the user's own bytes");
        // A dangling link is refused too, and nothing is created at its target.
        let gone = dir.path().join("gone.bin");
        let dangling = dir.path().join("dangling.bin");
        std::os::unix::fs::symlink(&gone, &dangling).unwrap();
        let msg = io_err(DiskFile::create(&dangling, 4, 64));
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(!gone.exists());
    }

    #[test]
    fn an_existing_file_that_is_not_ours_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, b"not a ferrumkv file").unwrap();
        let msg = io_err(DiskFile::create(&p, 4, 64));
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains("not a ferrumkv disk tier file"), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), b"not a ferrumkv file");
        // A hard link to it is the same file: refused the same way.
        let hard = dir.path().join("kv.bin");
        std::fs::hard_link(&p, &hard).unwrap();
        io_err(DiskFile::create(&hard, 4, 64));
        assert_eq!(std::fs::read(&p).unwrap(), b"not a ferrumkv file");
        // Neither is a directory or a FIFO written to.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let msg = io_err(DiskFile::create(&fifo, 4, 64));
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    #[test]
    fn an_empty_file_or_our_own_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.bin");
        std::fs::write(&p, b"").unwrap(); // e.g. made by mktemp
        let f = DiskFile::create(&p, 4, 64).unwrap();
        f.write_block(3, &bytes(1, 64)).unwrap();
        drop(f);
        // A later cache takes its predecessor's file over (its contents are not trusted:
        // the checksums lived in the old process), resized to its own geometry.
        let f = DiskFile::create(&p, 2, 32).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            HEADER_BYTES as u64 + 64
        );
        let mut out = vec![0u8; 32];
        assert_eq!(
            f.read_block(1, &mut out),
            Err(ReadError::Corrupt { slot: 1 })
        );
        f.write_block(1, &bytes(2, 32)).unwrap();
        f.read_block(1, &mut out).unwrap();
        assert_eq!(out, bytes(2, 32));
    }

    #[test]
    fn a_failed_preallocation_keeps_a_file_that_was_there() {
        // 2^50 bytes: more than any test filesystem holds or allows (ENOSPC/EFBIG); where
        // preallocation is unsupported and a sparse file results, there is nothing to check.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.bin");
        std::fs::write(&p, b"").unwrap();
        match DiskFile::create(&p, 1 << 20, 1 << 30) {
            Err(Error::Io(msg)) => {
                assert!(msg.contains("preallocate"), "{msg}");
                let meta = std::fs::metadata(&p).expect("the user's file is still there");
                assert_eq!(meta.len(), 0, "and as it was");
            }
            Ok(_) => return,
            Err(e) => panic!("unexpected error {e:?}"),
        }
        // Our own file from an earlier run is kept as it was too.
        drop(DiskFile::create(&p, 4, 64).unwrap());
        let before = std::fs::read(&p).unwrap();
        io_err(DiskFile::create(&p, 1 << 20, 1 << 30));
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn a_second_file_on_a_locked_path_fails_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.bin");
        let first = DiskFile::create(&p, 4, 64).unwrap();
        first.write_block(2, &bytes(7, 64)).unwrap();
        let before = std::fs::read(&p).unwrap();
        let msg = io_err(DiskFile::create(&p, 8, 128));
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains("in use"), "{msg}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "not resized, not rewritten"
        );
        let mut out = vec![0u8; 64];
        first.read_block(2, &mut out).unwrap();
        assert_eq!(out, bytes(7, 64));
        first.write_block(3, &bytes(8, 64)).unwrap();
        first.read_block(3, &mut out).unwrap();
        assert_eq!(out, bytes(8, 64));
        // Dropping the first releases its lock.
        drop(first);
        let second = DiskFile::create(&p, 8, 128).unwrap();
        // So does `release`, which also ends the holder's I/O on the file.
        second.write_block(0, &bytes(9, 128)).unwrap();
        second.release();
        second.release();
        let third = DiskFile::create(&p, 2, 64).unwrap();
        let mut out = vec![0u8; 128];
        assert!(
            matches!(second.read_block(0, &mut out), Err(ReadError::Io(m)) if m.contains("released"))
        );
        assert!(matches!(second.write_block(1, &out), Err(Error::Io(m)) if m.contains("released")));
        third.write_block(1, &bytes(10, 64)).unwrap();
    }

    #[test]
    fn a_lost_race_for_a_new_file_leaves_it_to_its_holder() {
        // The file is there and locked by another open (as when two caches start at once):
        // refused, and the holder's file is neither removed nor changed.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.bin");
        let holder = DiskFile::create(&p, 1, 16).unwrap();
        let before = std::fs::read(&p).unwrap();
        let msg = io_err(DiskFile::create(&p, 1 << 20, 1 << 30));
        assert!(msg.contains("in use"), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
        drop(holder);
    }

    #[test]
    fn never_written_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 3, 32);
        let mut out = [0u8; 32];
        let err = f.read_block(2, &mut out).unwrap_err();
        assert_eq!(err, ReadError::Corrupt { slot: 2 });
        let e: Error = err.into();
        assert!(
            matches!(&e, Error::Io(m) if m.contains("checksum mismatch")),
            "{e:?}"
        );
        assert_eq!(
            f.io_stats().checksum_failures,
            0,
            "no I/O, no checksum failure"
        );
    }

    #[test]
    fn flip_byte_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 3, 128);
        let data = bytes(5, 128);
        f.write_block(1, &data).unwrap();
        f.write_block(2, &data).unwrap();
        f.inject(Fault::FlipByte {
            slot: 1,
            offset: 77,
        });
        let mut out = vec![0u8; 128];
        assert_eq!(
            f.read_block(1, &mut out),
            Err(ReadError::Corrupt { slot: 1 })
        );
        assert_eq!(f.io_stats().checksum_failures, 1);
        f.read_block(2, &mut out).unwrap();
        assert_eq!(out, data, "neighbours untouched");
        // A rewrite heals the slot.
        f.write_block(1, &data).unwrap();
        f.read_block(1, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(f.io_stats().checksum_failures, 1);
    }

    #[test]
    fn fail_next_write_invalidates_slot() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 2, 64);
        let old = bytes(1, 64);
        let new = bytes(2, 64);
        f.write_block(0, &old).unwrap();
        f.inject(Fault::FailNextWrite);
        match f.write_block(0, &new) {
            Err(Error::Io(msg)) => assert!(msg.contains("blocks.bin"), "{msg}"),
            other => panic!("expected Io error, got {other:?}"),
        }
        let mut out = vec![0u8; 64];
        assert_eq!(
            f.read_block(0, &mut out),
            Err(ReadError::Corrupt { slot: 0 })
        );
        // The fault is one-shot.
        f.write_block(0, &new).unwrap();
        f.read_block(0, &mut out).unwrap();
        assert_eq!(out, new);
        assert_eq!(f.io_stats().blocks_written, 2);
    }

    #[test]
    fn short_next_read_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 2, 64);
        let data = bytes(3, 64);
        f.write_block(1, &data).unwrap();
        f.inject(Fault::ShortNextRead);
        let mut out = vec![0u8; 64];
        match f.read_block(1, &mut out) {
            Err(ReadError::Io(msg)) => {
                assert!(msg.contains("short read"), "{msg}");
                assert!(msg.contains("got 63 of 64"), "{msg}");
                assert!(msg.contains("blocks.bin"), "{msg}");
            }
            other => panic!("expected short read, got {other:?}"),
        }
        assert_eq!(f.io_stats().blocks_read, 0);
        f.read_block(1, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn io_stats_count_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, 4, 100);
        assert_eq!(f.io_stats(), IoStats::default());
        let mut out = vec![0u8; 100];
        for i in 0..3 {
            f.write_block(i, &bytes(i as u64, 100)).unwrap();
        }
        f.inject(Fault::FailNextWrite);
        f.write_block(3, &bytes(9, 100)).unwrap_err();
        for i in 0..3 {
            f.read_block(i, &mut out).unwrap();
        }
        f.read_block(3, &mut out).unwrap_err(); // invalid: no I/O
        f.inject(Fault::FlipByte { slot: 0, offset: 0 });
        f.read_block(0, &mut out).unwrap_err(); // read, then checksum failure
        f.inject(Fault::ShortNextRead);
        f.read_block(1, &mut out).unwrap_err(); // short: not a block read
        let st = f.io_stats();
        assert_eq!(st.blocks_written, 3);
        assert_eq!(st.bytes_written, 300);
        assert_eq!(st.blocks_read, 4);
        assert_eq!(st.bytes_read, 400);
        assert_eq!(st.checksum_failures, 1);
        assert!(st.write_seconds > 0.0 && st.read_seconds > 0.0);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn workers_run_every_job_before_shutdown_returns() {
        let pool = DiskWorkers::new(3).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..200 {
            let done = Arc::clone(&done);
            let names = Arc::clone(&names);
            pool.submit(Box::new(move || {
                std::thread::sleep(std::time::Duration::from_micros(100));
                names
                    .lock()
                    .push(std::thread::current().name().unwrap_or("").to_string());
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // A panicking job does not lose the others.
        pool.submit(Box::new(|| panic!("job panic (expected in this test)")));
        pool.shutdown();
        assert_eq!(done.load(Ordering::SeqCst), 200);
        assert_eq!(pool.queued(), 0);
        assert!(names.lock().iter().all(|n| n.starts_with("ferrumkv-disk-")));
        // After shutdown, jobs run inline; shutdown again and Drop are no-ops.
        let d = Arc::clone(&done);
        pool.submit(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(done.load(Ordering::SeqCst), 201);
        pool.shutdown();
    }

    #[test]
    fn workers_drop_drains_queue() {
        let done = Arc::new(AtomicUsize::new(0));
        {
            let pool = DiskWorkers::new(0).unwrap(); // clamps to one thread
            for _ in 0..50 {
                let done = Arc::clone(&done);
                pool.submit(Box::new(move || {
                    done.fetch_add(1, Ordering::SeqCst);
                }));
            }
        }
        assert_eq!(done.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn workers_run_disk_io() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(file(&dir, 16, 256));
        let pool = DiskWorkers::new(4).unwrap();
        for slot in 0..16 {
            let f = Arc::clone(&f);
            pool.submit(Box::new(move || {
                f.write_block(slot, &bytes(slot as u64, 256)).unwrap();
            }));
        }
        pool.shutdown();
        let mut out = vec![0u8; 256];
        for slot in 0..16 {
            f.read_block(slot, &mut out).unwrap();
            assert_eq!(out, bytes(slot as u64, 256));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { slot: usize, seed: u64 },
        FailedWrite { slot: usize, seed: u64 },
        Read { slot: usize },
        ArmShortRead,
        Flip { slot: usize, offset: usize },
    }

    const P_SLOTS: usize = 5;
    const P_BYTES: usize = 48;

    fn op() -> impl Strategy<Value = Op> {
        let slot = 0..P_SLOTS;
        prop_oneof![
            3 => (slot.clone(), any::<u64>()).prop_map(|(slot, seed)| Op::Write { slot, seed }),
            1 => (slot.clone(), any::<u64>())
                .prop_map(|(slot, seed)| Op::FailedWrite { slot, seed }),
            4 => slot.clone().prop_map(|slot| Op::Read { slot }),
            1 => Just(Op::ArmShortRead),
            2 => (slot, 0..P_BYTES).prop_map(|(slot, offset)| Op::Flip { slot, offset }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Model: per slot, the bytes of the last successful write (`None` after a failed
        /// write or never written) and the bytes actually on disk. A read is `Ok` with exactly
        /// the last written bytes iff the disk still holds them, else `Corrupt`. (Flipping the
        /// same byte twice restores it, so the model compares bytes, not flip counts.)
        #[test]
        fn model_check(ops in prop::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let f = file(&dir, P_SLOTS, P_BYTES);
            let mut last: Vec<Option<Vec<u8>>> = vec![None; P_SLOTS];
            let mut disk: Vec<Vec<u8>> = vec![vec![0u8; P_BYTES]; P_SLOTS];
            let mut out = vec![0u8; P_BYTES];
            let (mut writes, mut reads, mut fails) = (0u64, 0u64, 0u64);
            let mut short_armed = false;
            for op in ops {
                match op {
                    Op::Write { slot, seed } => {
                        let data = bytes(seed, P_BYTES);
                        f.write_block(slot, &data).unwrap();
                        disk[slot] = data.clone();
                        last[slot] = Some(data);
                        writes += 1;
                    }
                    Op::FailedWrite { slot, seed } => {
                        f.inject(Fault::FailNextWrite);
                        prop_assert!(f.write_block(slot, &bytes(seed, P_BYTES)).is_err());
                        last[slot] = None;
                    }
                    Op::Read { slot } => {
                        let r = f.read_block(slot, &mut out);
                        match &last[slot] {
                            // Refused before any I/O; an armed short read stays armed.
                            None => prop_assert_eq!(r, Err(ReadError::Corrupt { slot })),
                            Some(_) if short_armed => {
                                prop_assert!(matches!(r, Err(ReadError::Io(_))), "{:?}", r);
                                short_armed = false;
                            }
                            Some(want) if *want == disk[slot] => {
                                prop_assert_eq!(r, Ok(()));
                                prop_assert_eq!(&out, want);
                                reads += 1;
                            }
                            Some(_) => {
                                prop_assert_eq!(r, Err(ReadError::Corrupt { slot }));
                                reads += 1;
                                fails += 1;
                            }
                        }
                    }
                    Op::ArmShortRead => {
                        f.inject(Fault::ShortNextRead);
                        short_armed = true;
                    }
                    Op::Flip { slot, offset } => {
                        f.inject(Fault::FlipByte { slot, offset });
                        disk[slot][offset] ^= 0xFF;
                    }
                }
            }
            let st = f.io_stats();
            prop_assert_eq!(st.blocks_written, writes);
            prop_assert_eq!(st.blocks_read, reads);
            prop_assert_eq!(st.checksum_failures, fails);
            prop_assert_eq!(f.in_flight(), 0);
        }
    }
}
