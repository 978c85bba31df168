//! Work over a file while it is written: a thread that reads back what the
//! writer has flushed (from the page cache) and feeds it to a [`Follow`]
//! (a SHA-256, a tree), so that a transfer's thread only moves bytes and the
//! hashing runs on another core at the same time. The server follows its
//! uploads so; a client its downloads.

use deltasync_core::Hash;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Progress {
    /// Bytes of the file that are written and may be read back.
    ready: u64,
    /// No more bytes will come.
    closed: bool,
    /// Stop without a result.
    abandoned: bool,
}

/// What a [`ReadBack`] thread computes over a file being written.
pub trait Follow: Send + 'static {
    /// The result.
    type Out: Send + 'static;
    /// Takes the file's next bytes.
    fn feed(&mut self, data: &[u8]);
    /// The result, once every byte was fed.
    fn done(self) -> Self::Out;
}

/// Read-back threads running at once in this process (all of a server's
/// uploads together); past this, the work waits for the end of its
/// transfer (see [`ReadBack`]).
fn readback_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()).max(2) * 2)
}

/// Read-back threads running now.
static READBACK_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Holds every read-back thread's place while it lives, as if as many
/// transfers ran: new work is deferred to its `finish` (for tests of that
/// path).
pub struct AllBusy(usize);

impl AllBusy {
    /// Takes every place.
    #[allow(clippy::new_without_default)]
    pub fn new() -> AllBusy {
        let n = readback_limit();
        READBACK_THREADS.fetch_add(n, Ordering::SeqCst);
        AllBusy(n)
    }

    /// Whether the places taken now are exactly the ones this holds: no
    /// read-back work left a place taken.
    pub fn only_these(&self) -> bool {
        READBACK_THREADS.load(Ordering::SeqCst) == self.0
    }
}

impl Drop for AllBusy {
    fn drop(&mut self) {
        READBACK_THREADS.fetch_sub(self.0, Ordering::SeqCst);
    }
}

/// Frees a read-back thread's place when the thread ends.
struct ReadBackSlot;

impl Drop for ReadBackSlot {
    fn drop(&mut self) {
        READBACK_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Work over a file being written, on its own thread: it reads back (from
/// the page cache) what the writer has flushed, so that the thread that
/// receives only receives and writes, and every core works. At most
/// [`readback_limit`] such threads run; beyond that the work is deferred,
/// and done by whoever calls [`ReadBack::finish`] (a connection's worker),
/// so that a thousand uploads at once do not mean a thousand threads.
pub struct ReadBack<F: Follow> {
    shared: Arc<(Mutex<Progress>, Condvar)>,
    thread: Option<std::thread::JoinHandle<io::Result<F::Out>>>,
    deferred: Option<(File, F, u64)>,
}

/// Feeds `work` with `file` from `pos` up to `end`.
fn read_into<F: Follow>(
    file: &File,
    work: &mut F,
    buf: &mut [u8],
    mut pos: u64,
    end: u64,
) -> io::Result<u64> {
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..n], pos)?;
        work.feed(&buf[..n]);
        pos += n as u64;
    }
    Ok(pos)
}

impl<F: Follow> ReadBack<F> {
    /// Starts the work at byte `from` of `file`; `name` names its thread.
    pub fn start(file: File, mut work: F, from: u64, name: &str) -> io::Result<ReadBack<F>> {
        let shared = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        if READBACK_THREADS.fetch_add(1, Ordering::SeqCst) >= readback_limit() {
            READBACK_THREADS.fetch_sub(1, Ordering::SeqCst);
            return Ok(ReadBack { shared, thread: None, deferred: Some((file, work, from)) });
        }
        let slot = ReadBackSlot;
        let progress = shared.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _slot = slot;
            let (lock, wake) = &*progress;
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = from;
            loop {
                let (ready, closed) = {
                    let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while p.ready <= pos && !p.closed && !p.abandoned {
                        p = wake.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    if p.abandoned {
                        return Err(io::Error::other("abandoned"));
                    }
                    (p.ready, p.closed)
                };
                pos = read_into(&file, &mut work, &mut buf, pos, ready)?;
                if closed {
                    return Ok(work.done());
                }
            }
        })?;
        Ok(ReadBack { shared, thread: Some(thread), deferred: None })
    }

    /// The file's first `len` bytes are written (flushed) and may be read.
    pub fn ready(&self, len: u64) {
        self.update(|p| p.ready = len);
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let (lock, wake) = &*self.shared;
        f(&mut lock.lock().unwrap_or_else(|e| e.into_inner()));
        wake.notify_one();
    }

    /// The result over the first `len` bytes, once the thread has read them
    /// (or, deferred, once this call has).
    pub fn finish(mut self, len: u64) -> io::Result<F::Out> {
        if let Some((file, mut work, from)) = self.deferred.take() {
            read_into(&file, &mut work, &mut vec![0u8; 1 << 20], from, len)?;
            return Ok(work.done());
        }
        self.update(|p| {
            p.ready = len;
            p.closed = true;
        });
        let t = self.thread.take().ok_or_else(|| io::Error::other("reader gone"))?;
        t.join().map_err(|_| io::Error::other("read-back thread panicked"))?
    }
}

impl<F: Follow> Drop for ReadBack<F> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.update(|p| p.abandoned = true);
            let _ = t.join();
        }
    }
}

/// The SHA-256 of a file, from its first byte.
#[derive(Default)]
pub struct FileSha256(Sha256);

impl Follow for FileSha256 {
    type Out = Hash;
    fn feed(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    fn done(self) -> Hash {
        Hash(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::{FileSha256, ReadBack};
    use std::io::Write;

    #[test]
    fn a_file_hashed_as_it_is_written_has_the_hash_of_its_bytes() {
        let dir = std::env::temp_dir().join(format!("deltasync-readback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let bytes = deltasync_core::sim::random_bytes(1, 5_000_000);
        let mut f = std::fs::File::create(&path).unwrap();
        let r =
            ReadBack::start(std::fs::File::open(&path).unwrap(), FileSha256::default(), 0, "test").unwrap();
        let mut done = 0;
        for part in bytes.chunks(1_234_567) {
            f.write_all(part).unwrap();
            done += part.len() as u64;
            r.ready(done);
        }
        let got = r.finish(done).unwrap();
        let whole = crate::build::file_hash(&std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(got, whole);
        assert_ne!(got, crate::build::file_hash(&bytes[1..]).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
