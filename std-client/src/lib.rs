//! The deltasync client: connect, authenticate, then list, describe, upload,
//! download and delete files, always with delta sync. The `deltasync`
//! command and the GUI are thin faces over this library.

pub use deltasync_core::Hash;
use deltasync_core::channel::KeyError;
pub use deltasync_core::channel::{CipherKind, ClientKey};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::session::{DownloadSession, Need, UploadSession};
use deltasync_core::conn::{ClientHandshake, Listed, Query, QueryKind};
use deltasync_core::driver::{BATCH_ROOM, DriveError, Pump, TimeoutAsTimedOut, run_blocking_observed};
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::frame::{MAX_ENCODED, MAX_SEALED};
use deltasync_core::machine::Machine;
pub use deltasync_core::message::Expect;
use deltasync_core::message::{CAP_DELTA, CAP_FINE, CAP_SKETCH, CAP_ZSTD, CAPS, Meta, Outcome};
use deltasync_core::source::{FileSource, IoFailed, Output};
use deltasync_core::tree::Tree;
use deltasync_host::hints::{ChunkHints, Known, build_tree_hinted};
pub use deltasync_host::local::default_hints_dir;
use deltasync_host::local::now;
use deltasync_host::readback::{FileSha256, ReadBack};
use embedded_io_adapters::std::FromStd;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why a client operation failed.
#[non_exhaustive]
#[derive(Debug)]
pub enum ClientError {
    /// No key was given or found.
    NoKey,
    /// The key given is malformed or too weak.
    BadKey(KeyError),
    /// The server refused our key, or could not prove it holds it.
    Auth,
    /// The server speaks another protocol version (an older server speaks
    /// plaintext versions this client refuses).
    Version,
    /// A frame failed authentication: changed, dropped, repeated or
    /// reordered on the way. Nothing it carried was acted on.
    Tampered,
    /// The server could not be reached or the connection broke.
    Network(io::Error),
    /// Nothing listens at this address (the connection was refused).
    NoServer(String),
    /// The server turned the connection away (too many connections, from
    /// this address or overall, or too many failed handshakes from it).
    Busy,
    /// The server has no such file.
    NotFound(String),
    /// The transferred file did not verify; nothing was replaced.
    Integrity(String),
    /// The server's storage is full: nothing was replaced there.
    NoSpace(String),
    /// This machine's disk (or quota) is full: a download could not be
    /// written, and the local file was left as it was.
    LocalNoSpace(PathBuf),
    /// A conditional upload found another version on the server than the
    /// one it expected (or one where it expected none): nothing replaced.
    Conflict(String),
    /// The server refused the request.
    Refused(ErrorCode),
    /// The peer broke the protocol.
    Protocol(String),
    /// A local file could not be read or written.
    Local(PathBuf, io::Error),
    /// The operation was cancelled.
    Cancelled,
    /// The command line asked for something impossible.
    Usage(String),
    /// A tree sync finished, but this many of its operations failed (each
    /// was reported as it failed).
    Incomplete(u64),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoKey => f.write_str(
                "no key: pass --key, set DELTASYNC_KEY, write it to ~/.config/deltasync/key, \
                 or run the server on this machine",
            ),
            ClientError::BadKey(e) => write!(f, "bad key: {e}"),
            ClientError::Auth => {
                f.write_str("authentication failed: the server does not know this key (or revoked it)")
            }
            ClientError::Version => f.write_str(
                "the server speaks another protocol version (servers before version 5 send everything \
                 in clear, and this client refuses them): upgrade the server",
            ),
            ClientError::Tampered => f.write_str(
                "the connection was tampered with: a frame failed authentication, \
                 and nothing it carried was acted on",
            ),
            ClientError::Network(e) => write!(f, "network error: {e}"),
            ClientError::NoServer(a) => write!(
                f,
                "no deltasync server listens at {}: start one with `deltasync-server` (it listens on \
                 127.0.0.1:5001 by default), or point --server / DELTASYNC_SERVER at one",
                printable(a)
            ),
            ClientError::Busy => f.write_str(
                "the server turned the connection away: too many connections (from this address or \
                 overall) or too many failed handshakes from this address; try again later",
            ),
            ClientError::NotFound(n) => write!(f, "{}: no such file on the server", printable(n)),
            ClientError::NoSpace(n) => write!(
                f,
                "{}: the server's storage is full; nothing was replaced (free space there, then retry)",
                printable(n)
            ),
            ClientError::Integrity(n) => {
                write!(f, "{}: integrity check failed; nothing was replaced", printable(n))
            }
            ClientError::LocalNoSpace(p) => write!(
                f,
                "{}: no space left on this disk; the local file was left as it was (free space, then retry)",
                printable(&p.to_string_lossy())
            ),
            ClientError::Conflict(n) => write!(
                f,
                "{}: the server's version is not the one expected (someone else changed it); nothing was \
                 replaced (stat or download it, then upload again)",
                printable(n)
            ),
            ClientError::Refused(c) => write!(f, "server refused the request: {c}"),
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::Usage(e) => write!(f, "{e}"),
            ClientError::Incomplete(n) => {
                write!(f, "{n} operation(s) failed (reported above); the rest is done")
            }
            ClientError::Local(p, e) => write!(f, "{}: {e}", printable(&p.to_string_lossy())),
            ClientError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The process exit code the `deltasync` command uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NoKey | ClientError::BadKey(_) | ClientError::Auth => 3,
            ClientError::Network(_) | ClientError::NoServer(_) | ClientError::Busy => 4,
            ClientError::NotFound(_) => 5,
            ClientError::Integrity(_) | ClientError::Tampered => 6,
            ClientError::Refused(_) | ClientError::Protocol(_) | ClientError::Version => 7,
            ClientError::Local(..) => 8,
            ClientError::NoSpace(_) | ClientError::LocalNoSpace(_) => 9,
            ClientError::Conflict(_) => 10,
            ClientError::Cancelled => 130,
            ClientError::Usage(_) => 2,
            ClientError::Incomplete(_) => 11,
        }
    }

    fn from_drive(e: DriveError<io::Error>, name: &str) -> ClientError {
        match e {
            DriveError::Io(e) => ClientError::Network(e),
            DriveError::Closed => ClientError::Network(io::ErrorKind::ConnectionReset.into()),
            DriveError::Session(SessionError::Peer(ErrorCode::AuthFailed))
            | DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed)) => ClientError::Auth,
            DriveError::Session(SessionError::Peer(ErrorCode::Tampered))
            | DriveError::Session(SessionError::Protocol(ErrorCode::Tampered)) => ClientError::Tampered,
            DriveError::Session(SessionError::Peer(ErrorCode::VersionMismatch))
            | DriveError::Session(SessionError::Protocol(ErrorCode::VersionMismatch)) => ClientError::Version,
            DriveError::Session(SessionError::Peer(ErrorCode::NotFound)) => {
                ClientError::NotFound(name.into())
            }
            // Only a server refusing the connection says this to a client
            // that keeps to its request limit.
            DriveError::Session(SessionError::Peer(ErrorCode::TooManyRequests)) => ClientError::Busy,
            DriveError::Session(SessionError::Peer(ErrorCode::NoSpace)) => ClientError::NoSpace(name.into()),
            DriveError::Session(SessionError::Peer(ErrorCode::Conflict)) => {
                ClientError::Conflict(name.into())
            }
            DriveError::Session(SessionError::NoSpace) => ClientError::LocalNoSpace(name.into()),
            DriveError::Session(SessionError::Peer(ErrorCode::Integrity)) => {
                ClientError::Integrity(name.into())
            }
            DriveError::Session(SessionError::Peer(c)) => ClientError::Refused(c),
            DriveError::Session(SessionError::Timeout) => {
                ClientError::Network(io::ErrorKind::TimedOut.into())
            }
            DriveError::Session(SessionError::Read) => ClientError::Local(
                name.into(),
                io::Error::other("file changed or unreadable during transfer"),
            ),
            DriveError::Session(SessionError::Write) => {
                ClientError::Local(name.into(), io::Error::other("could not write the downloaded file"))
            }
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// The client's key: `given` (from `--key` or `DELTASYNC_KEY`), else the
/// key file `key_file`, else the default key file
/// ([`deltasync_host::local::default_key_path`], which a server on this
/// machine writes when it creates its first key).
pub fn find_key(given: Option<String>, key_file: Option<PathBuf>) -> Result<ClientKey, ClientError> {
    if let Some(k) = given.filter(|k| !k.trim().is_empty()) {
        return ClientKey::parse(&k).map_err(ClientError::BadKey);
    }
    let path = key_file.or_else(deltasync_host::local::default_key_path).ok_or(ClientError::NoKey)?;
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ClientError::NoKey),
        Err(e) => return Err(ClientError::Local(path, e)),
    };
    ClientKey::parse(&text).map_err(ClientError::BadKey)
}

/// How a transfer went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No earlier version was reused.
    Full,
    /// Part of an earlier version was reused.
    Delta,
    /// The other side already had this version.
    Unchanged,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Full => "full",
            Mode::Delta => "delta",
            Mode::Unchanged => "unchanged",
        })
    }
}

/// The result of an upload or download.
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    /// Remote name.
    pub name: String,
    /// Full, delta or unchanged.
    pub mode: Mode,
    /// Size of the file.
    pub file_bytes: u64,
    /// Bytes written to the socket, framing included.
    pub wire_bytes_sent: u64,
    /// Bytes read from the socket, framing included.
    pub wire_bytes_received: u64,
    /// File bytes that crossed the wire.
    pub literal_bytes: u64,
    /// File bytes reused from the earlier version.
    pub reused_bytes: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Uploads: the server's version changed while this upload ran (another
    /// client stored or deleted one): with `Written`, this version replaced
    /// that one; unchanged, the server no longer holds this version.
    pub replaced: bool,
}

impl TransferReport {
    /// The share of the file that did not cross the wire, 0 to 1.
    pub fn saving(&self) -> f64 {
        let wire = (self.wire_bytes_sent + self.wire_bytes_received) as f64;
        if self.file_bytes == 0 { 0.0 } else { (1.0 - wire / self.file_bytes as f64).max(0.0) }
    }
}

/// A name as a terminal may show it: control characters (C0, DEL, C1),
/// the characters that reorder text (bidirectional overrides and
/// isolates), and the backslash are escaped (`\n`, `\t`, `\e`,
/// `\x7f`, `\u{202e}`, `\\`), so that a name can neither drive the
/// terminal nor forge lines or hide its own letters. Names come from the
/// server, which may hold anything a writer chose.
pub fn printable(name: &str) -> std::borrow::Cow<'_, str> {
    let risky = |c: char| c == '\\' || unsafe_to_show(c);
    if !name.chars().any(risky) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            c if (c as u32) < 0x100 && risky(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if risky(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether `c` must not reach a terminal as it is: controls (C0, DEL, C1)
/// and the invisible format characters (zero widths, joiners, bidi marks,
/// overrides and isolates, line and paragraph separators, the soft hyphen,
/// tags): two names that print alike must not be two names.
fn unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{e0000}'..='\u{e007f}')
}

/// `v` as one line of JSON in which every character a terminal must not
/// see as it is (see [`printable`]) is a `\uXXXX` escape, DEL and C1 and
/// bidi controls too (serde_json escapes only C0): the text stays exact
/// for a JSON reader and inert on a terminal.
pub fn json_line<T: Serialize + ?Sized>(v: &T) -> serde_json::Result<String> {
    struct Inert;
    impl serde_json::ser::Formatter for Inert {
        fn write_string_fragment<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            fragment: &str,
        ) -> io::Result<()> {
            let mut rest = fragment;
            while let Some((i, c)) = rest.char_indices().find(|&(_, c)| unsafe_to_show(c)) {
                w.write_all(&rest.as_bytes()[..i])?;
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
                rest = &rest[i + c.len_utf8()..];
            }
            w.write_all(rest.as_bytes())
        }
    }
    let mut out = Vec::new();
    v.serialize(&mut serde_json::Serializer::with_formatter(&mut out, Inert))?;
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// A byte count for people: `812 B`, `4.8 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[u]) }
}

/// A file on the server: core's one type for a stored file (in JSON:
/// `name`, `size`, `modified`, `nanos`, `mode`, `kind`, `sha256` in hex).
pub type RemoteFile = deltasync_core::conn::server::StoredFile;

/// What an interrupted upload left on the server (the next upload of the
/// name resumes from it; `rm` drops it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemotePartial {
    /// The name it was an upload of.
    pub name: String,
    /// Bytes kept.
    pub size: u64,
    /// When it was last written to, seconds since the Unix epoch.
    pub modified: u64,
}

/// What the server holds under a name: a file, an interrupted upload, or
/// both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Described {
    /// The stored file.
    #[serde(flatten)]
    pub file: Option<RemoteFile>,
    /// The interrupted upload.
    pub partial: Option<RemotePartial>,
}

/// Progress of a transfer: bytes done of total, for bars.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// File bytes sent (upload) or assembled (download).
    pub done: u64,
    /// File size.
    pub total: u64,
}

/// A socket whose writes are paced to at most `limit` bytes per second.
/// Its reads wait for the socket or for a [`Waker`], whichever comes
/// first (a wake is a read that timed out: the driver steps its machine
/// again, and the shell feeds it what happened).
struct Paced {
    stream: TcpStream,
    /// The other end of the [`Waker`]'s socket pair.
    wake: UnixStream,
    limit: Arc<std::sync::atomic::AtomicU64>,
    start: Instant,
    written: u64,
}

impl io::Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let (data, woken) = {
            let mut fds = [PollFd::new(&self.stream, PollFlags::IN), PollFd::new(&self.wake, PollFlags::IN)];
            let timeout = Timespec { tv_sec: 0, tv_nsec: READ_TIMEOUT.as_nanos() as _ };
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => return Err(io::ErrorKind::TimedOut.into()),
                Err(e) => return Err(e.into()),
            }
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
        };
        if woken {
            let mut drain = [0u8; 64];
            while matches!(io::Read::read(&mut self.wake, &mut drain), Ok(n) if n > 0) {}
        }
        if !data {
            return Err(io::ErrorKind::TimedOut.into());
        }
        io::Read::read(&mut self.stream, buf)
    }
}

/// A tree built on a scoped thread for a session: handed over once, the
/// driver woken to go on with it; a failure (an error, a panic, no thread
/// to be had) hangs up the connection (a transfer cannot go on without its
/// tree) and is an error, never a wait without end.
struct Build<'scope, T> {
    rx: std::sync::mpsc::Receiver<io::Result<T>>,
    thread: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
    waker: Waker,
    /// The connection's socket, shut down on failure.
    hang_up: &'scope TcpStream,
    delivered: bool,
    failed: Option<io::Error>,
}

impl<'scope, T: Send + 'scope> Build<'scope, T> {
    /// Runs `job` on a thread of `scope`; `waker` wakes the driver when it
    /// ends, however it ends.
    fn spawn<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        waker: Waker,
        hang_up: &'scope TcpStream,
        job: impl FnOnce() -> io::Result<T> + Send + 'scope,
    ) -> Self {
        struct WakeOnDrop(Waker);
        impl Drop for WakeOnDrop {
            fn drop(&mut self) {
                self.0.wake();
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = waker.clone();
        let thread = std::thread::Builder::new().name("tree".into()).spawn_scoped(scope, move || {
            let _wake = WakeOnDrop(wake);
            let _ = tx.send(job());
        });
        let mut build = Build { rx, thread: None, waker, hang_up, delivered: false, failed: None };
        match thread {
            Ok(t) => build.thread = Some(t),
            // No thread: that is the failure.
            Err(e) => build.fail(e),
        }
        build
    }

    fn fail(&mut self, e: io::Error) {
        self.failed = Some(e);
        let _ = self.hang_up.shutdown(std::net::Shutdown::Both);
    }

    /// Once the thread is done: gives its tree to `give` and wakes the
    /// driver (the session has work at once), or fails.
    fn deliver(&mut self, give: impl FnOnce(T)) {
        if self.delivered || self.failed.is_some() {
            return;
        }
        match self.rx.try_recv() {
            Ok(Ok(tree)) => {
                self.delivered = true;
                give(tree);
                self.waker.wake();
            }
            Ok(Err(e)) => self.fail(e),
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.fail(io::Error::other("building the tree failed"))
            }
        }
    }

    /// Waits for the thread (a panic in it stays there); the failure, if
    /// the build failed.
    fn join(mut self) -> Option<io::Error> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.failed
    }
}

/// Wakes a connection's driver blocked in a read, so that it steps its
/// machine again at once: a tree built on another thread, a command.
#[derive(Clone)]
struct Waker(Arc<UnixStream>);

impl Waker {
    fn wake(&self) {
        // Non-blocking: a full socket means a wake is already pending.
        let _ = io::Write::write(&mut &*self.0, &[1]);
    }
}

impl io::Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return self.stream.write(buf);
        }
        // Small slices keep the pace smooth.
        let n = self.stream.write(&buf[..buf.len().min(16 * 1024)])?;
        self.written += n as u64;
        let due = Duration::from_secs_f64(self.written as f64 / limit as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

type Io = FromStd<TimeoutAsTimedOut<Paced>>;
type StdPump = Pump<Vec<u8>, Vec<u8>, Vec<u8>>;

/// An authenticated connection to a server.
pub struct Connection {
    io: Io,
    pump: StdPump,
    salt: [u8; 8],
    cancel: Arc<AtomicBool>,
    /// A second handle on the socket, to shut it down on cancel.
    ctl: TcpStream,
    rate: Arc<std::sync::atomic::AtomicU64>,
    /// The address this connection was made with, part of the hints' key.
    server: String,
    /// Where chunk hints are kept, if anywhere.
    hints_dir: Option<PathBuf>,
    /// Capabilities this client and the server share.
    caps: u32,
    /// The protocol version of the session.
    version: u16,
    /// Wakes the driver from its read (see [`Paced`]).
    waker: Waker,
}

impl Connection {
    /// Connects to `server` (HOST:PORT) and opens a secure channel with
    /// `key`; file bytes are compressed both ways when it pays.
    pub fn connect(server: &str, key: &ClientKey) -> Result<Connection, ClientError> {
        Self::connect_with(server, key, true)
    }

    /// Like [`Self::connect`]; with `compress` false, file bytes cross the
    /// wire as they are in both directions (zstd is neither used nor
    /// announced to the server).
    pub fn connect_with(server: &str, key: &ClientKey, compress: bool) -> Result<Connection, ClientError> {
        Self::connect_using(server, key, compress, CipherKind::preferred())
    }

    /// Like [`Self::connect_with`], with the session sealed by `cipher`.
    pub fn connect_using(
        server: &str,
        key: &ClientKey,
        compress: bool,
        cipher: CipherKind,
    ) -> Result<Connection, ClientError> {
        let addrs: Vec<_> = server.to_socket_addrs().map_err(ClientError::Network)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let stream =
            addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, Duration::from_secs(10)) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = e;
                    None
                }
            });
        let stream = match stream {
            Some(s) => s,
            None if last.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(ClientError::NoServer(server.to_string()));
            }
            None => return Err(ClientError::Network(last)),
        };
        let net = ClientError::Network;
        stream.set_nodelay(true).map_err(net)?;
        stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(ClientError::Network)?;
        stream.set_write_timeout(Some(Duration::from_secs(30))).map_err(ClientError::Network)?;
        let ctl = stream.try_clone().map_err(ClientError::Network)?;
        let rate = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (wake_tx, wake) = UnixStream::pair().map_err(ClientError::Network)?;
        wake_tx.set_nonblocking(true).map_err(ClientError::Network)?;
        wake.set_nonblocking(true).map_err(ClientError::Network)?;
        let paced = Paced { stream, wake, limit: rate.clone(), start: Instant::now(), written: 0 };
        let mut c = Connection {
            ctl,
            rate,
            io: FromStd::new(TimeoutAsTimedOut(paced)),
            pump: Pump::new(
                vec![0u8; 256 * 1024],
                vec![0u8; MAX_SEALED],
                vec![0u8; MAX_ENCODED + BATCH_ROOM],
            ),
            salt: [0; 8],
            cancel: Arc::new(AtomicBool::new(false)),
            server: server.to_string(),
            hints_dir: None,
            caps: 0,
            version: 0,
            waker: Waker(Arc::new(wake_tx)),
        };
        let announce = if compress { CAPS } else { !CAP_ZSTD };
        let mut hs = ClientHandshake::new(key.clone(), cipher, rand::random(), now()).announcing(announce);
        c.salt = c.run(&mut hs, "", |_, _| {})?;
        c.caps = hs.shared_caps();
        c.version = hs.version();
        Ok(c)
    }

    /// A flag that, once set, makes the current and later operations fail
    /// with [`ClientError::Cancelled`] (set it from another thread).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Keeps chunk hints in `dir` (see [`deltasync_host::hints`]): after an
    /// upload of a file, what its chunks were, so that chunking its next
    /// version (to upload, or as the base of a download) skips the unchanged
    /// parts. Keyed by server address and file name; `None` (the default)
    /// keeps none.
    pub fn set_hints_dir(&mut self, dir: Option<PathBuf>) {
        self.hints_dir = dir;
    }

    /// The hints file for `name` on this server.
    fn hints_file(&self, name: &str) -> Option<PathBuf> {
        let key = deltasync_core::hash::Hash::of(format!("{}\0{name}", self.server).as_bytes());
        Some(self.hints_dir.as_ref()?.join(key.to_string()))
    }

    /// Uses `flag` as this connection's cancel flag (see [`Self::cancel_flag`]).
    pub fn set_cancel_flag(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = flag;
    }

    /// Limits what this connection sends to `bytes_per_sec` (0: no limit),
    /// counted from now.
    pub fn limit_rate(&mut self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
        let paced = &mut self.io.inner_mut().0;
        paced.start = Instant::now();
        paced.written = 0;
    }

    /// Bytes written to and read from the socket so far.
    pub fn wire_bytes(&self) -> (u64, u64) {
        (self.pump.sent, self.pump.received)
    }

    pub(crate) fn run<M: Machine>(
        &mut self,
        m: &mut M,
        name: &str,
        mut observe: impl FnMut(&mut M, &StdPump),
    ) -> Result<M::Output, ClientError> {
        let cancel = self.cancel.clone();
        let ctl = &self.ctl;
        let mut cancelled = false;
        let r = run_blocking_observed(m, &mut self.io, &mut self.pump, now, |m, p| {
            observe(m, p);
            if cancel.load(Ordering::Relaxed) && !cancelled {
                cancelled = true;
                // Closing the socket makes the next read fail and the driver stop.
                let _ = ctl.shutdown(std::net::Shutdown::Both);
            }
        });
        if cancelled || self.cancel.load(Ordering::Relaxed) {
            return Err(ClientError::Cancelled);
        }
        r.map_err(|e| ClientError::from_drive(e, name))
    }

    /// The protocol version of this session.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Runs a query, collecting the files and interrupted uploads it lists.
    fn query(
        &mut self,
        kind: QueryKind<'_>,
        name: &str,
    ) -> Result<(Vec<RemoteFile>, Vec<RemotePartial>), ClientError> {
        let (mut files, mut partials) = (Vec::new(), Vec::new());
        let on_entry = |e: Listed<'_>| match e {
            Listed::File(i) => files.push(RemoteFile {
                name: i.name.to_string(),
                size: i.size,
                modified: i.modified,
                sha256: i.sha256,
                chunking: i.chunking,
                ..RemoteFile::default()
            }),
            Listed::Partial(p) => {
                partials.push(RemotePartial { name: p.name.to_string(), size: p.size, modified: p.modified })
            }
            Listed::Entry(_) => {}
        };
        let mut q = Query::new(kind, self.version, on_entry, now());
        self.run(&mut q, name, |_, _| {})?;
        Ok((files, partials))
    }

    /// Every file on the server.
    pub fn list(&mut self) -> Result<Vec<RemoteFile>, ClientError> {
        Ok(self.query(QueryKind::List, "")?.0)
    }

    /// Every file on the server, and every interrupted upload it keeps
    /// (servers of protocol 6 and later).
    pub fn list_all(&mut self) -> Result<(Vec<RemoteFile>, Vec<RemotePartial>), ClientError> {
        self.query(QueryKind::ListAll, "")
    }

    /// One file on the server.
    pub fn stat(&mut self, name: &str) -> Result<RemoteFile, ClientError> {
        self.describe(name)?.file.ok_or_else(|| ClientError::NotFound(name.into()))
    }

    /// What the server holds under `name`: the file, and what an
    /// interrupted upload of it left (`NotFound` if neither).
    pub fn describe(&mut self, name: &str) -> Result<Described, ClientError> {
        let (mut files, mut partials) = self.query(QueryKind::Stat(name), name)?;
        Ok(Described { file: files.pop(), partial: partials.pop() })
    }

    /// Deletes a file on the server.
    pub fn delete(&mut self, name: &str) -> Result<(), ClientError> {
        let mut q = Query::new(QueryKind::Delete(name), self.version, |_| {}, now());
        self.run(&mut q, name, |_, _| {})?;
        Ok(())
    }

    /// Uploads `path` as `name`; a delta whenever the server holds a version.
    pub fn upload(
        &mut self,
        path: &Path,
        name: &str,
        progress: impl FnMut(Progress),
    ) -> Result<TransferReport, ClientError> {
        self.upload_if(path, name, None, progress)
    }

    /// Like [`Self::upload`]; with `expect`, published only if the server's
    /// version is (still, when the upload ends) as expected, else
    /// [`ClientError::Conflict`] and the server's version stays.
    ///
    /// The policy (which offer, streaming, falling back) is core's
    /// [`UploadSession`]; this shell builds the tree it asks for on another
    /// thread, which wakes the driver when it is done.
    pub fn upload_if(
        &mut self,
        path: &Path,
        name: &str,
        expect: Option<Expect>,
        progress: impl FnMut(Progress),
    ) -> Result<TransferReport, ClientError> {
        self.upload_with(path, name, Sending { expect, ..Sending::default() }, progress)
    }

    /// Uploads as [`Self::upload_if`] does, with a tree sync's extras.
    pub(crate) fn upload_with(
        &mut self,
        path: &Path,
        name: &str,
        how: Sending,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferReport, ClientError> {
        let Sending { expect, meta: publish_as, listed } = how;
        let start = Instant::now();
        let local = |e| ClientError::Local(path.to_path_buf(), e);
        let file = File::open(path).map_err(local)?;
        let meta = file.metadata().map_err(local)?;
        if !meta.is_file() {
            return Err(local(io::Error::other("not a regular file")));
        }
        let size = meta.len();
        let hints_file = self.hints_file(name);
        let (s0, r0) = self.wire_bytes();
        let source = FileSource(file.try_clone().map_err(local)?);
        let mut session: UploadSession<'_, Arc<Tree>, FileSource> =
            UploadSession::new(name, size, source, self.salt, self.version, now())
                .streaming(true)
                .compress(self.caps & CAP_ZSTD != 0)
                .sketches(self.caps & CAP_SKETCH != 0)
                .expecting(expect)
                .with_meta(publish_as);
        if let Some(remote) = listed {
            session = session.listed(remote);
        }
        let waker = self.waker.clone();
        let ctl = self.ctl.try_clone().map_err(ClientError::Network)?;
        let file = &file;
        let old_hints = hints_file.as_deref().and_then(load_hints).map(Arc::new);
        let (outcome, failed, hints) = std::thread::scope(|s| {
            let (mut hints, mut build) = (None, None);
            let outcome = self.run(&mut session, name, |m, _| {
                progress(Progress { done: m.literal_bytes(), total: size });
                if let Some(Need::Tree { kind, streaming }) = m.need() {
                    // A file the server holds is most likely what was last
                    // sent: its hints spare re-chunking what did not change.
                    let old = if streaming { None } else { old_hints.clone() };
                    let grouped = hints_file.is_some();
                    build = Some(Build::spawn(s, waker.clone(), &ctl, move || {
                        chunk_tree(file, kind, old.as_deref(), grouped).map(|(t, k)| (Arc::new(t), k))
                    }));
                }
                if let Some(b) = build.as_mut() {
                    b.deliver(|(tree, known)| {
                        // The tree is built without the whole-file hash; the
                        // hints know it if they are of this very version (the
                        // session then sends nothing if the server holds it).
                        let mut summary = tree.summary();
                        if let Some(h) = old_hints.as_ref().and_then(|o| o.file_hash_of(summary.root)) {
                            summary.file_hash = h;
                        }
                        m.tree_ready(tree.clone(), summary);
                        // The next version's hints, while the upload runs.
                        if hints_file.is_some() {
                            hints = Some(s.spawn(move || ChunkHints::collect(file, &tree, &known)));
                        }
                    });
                }
            });
            let failed = build.and_then(Build::join);
            (outcome, failed, hints.and_then(|h: std::thread::ScopedJoinHandle<'_, _>| h.join().ok()))
        });
        if let Some(e) = failed {
            return Err(local(e));
        }
        // The offer's hash may have come from the hints: wrong ones would
        // fail every upload of this file. The next one re-chunks it.
        if matches!(outcome, Ok(Outcome::Integrity) | Err(ClientError::Integrity(_)))
            && let Some(path) = &hints_file
        {
            let _ = std::fs::remove_file(path);
        }
        let outcome = outcome?;
        let ended = Ended {
            outcome,
            literal: session.literal_bytes(),
            reported: session.reported_hash(),
            replaced: session.replaced(),
        };
        let report = self.report(name, file, path, ended, size, (s0, r0), start)?;
        if let (Some(path), Some(Ok(hints)), Some(sha256)) =
            (&hints_file, hints, Hash::from_hex(&report.sha256))
        {
            store_hints(path, &hints.with_file_hash(sha256));
        }
        Ok(report)
    }

    /// The report of an upload of `file` that ended as `ended` after the
    /// connection's byte counts were `before`.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        name: &str,
        file: &File,
        path: &Path,
        ended: Ended,
        total: u64,
        before: (u64, u64),
        start: Instant,
    ) -> Result<TransferReport, ClientError> {
        let Ended { outcome, literal, reported, replaced } = ended;
        if outcome == Outcome::Integrity {
            return Err(ClientError::Integrity(name.into()));
        }
        let (s1, r1) = self.wire_bytes();
        let sha256 = match reported {
            Some(h) => h,
            // A server that could not tell (it kept no hash of an unchanged
            // version): hash the local file after all.
            None => deltasync_host::build::file_hash(file).map_err(|e| ClientError::Local(path.into(), e))?,
        };
        Ok(TransferReport {
            name: name.into(),
            mode: mode_of(outcome, literal, total),
            file_bytes: total,
            wire_bytes_sent: s1 - before.0,
            wire_bytes_received: r1 - before.1,
            literal_bytes: literal,
            reused_bytes: if outcome == Outcome::Unchanged { total } else { total - literal },
            duration_ms: start.elapsed().as_millis() as u64,
            sha256: sha256.to_string(),
            replaced,
        })
    }

    /// Downloads `name` to `dest`, reusing `dest`'s current contents if it
    /// exists. The file is replaced only once the new version has verified.
    pub fn download(
        &mut self,
        name: &str,
        dest: &Path,
        progress: impl FnMut(Progress),
    ) -> Result<TransferReport, ClientError> {
        self.download_with(name, dest, None, None, progress)
    }

    /// Downloads as [`Self::download`] does; `listed` is the chunking a
    /// tree sync's listing gave (no `Stat` then), and the file gets
    /// `meta`'s time and mode before it replaces the local copy.
    pub(crate) fn download_with(
        &mut self,
        name: &str,
        dest: &Path,
        listed: Option<ChunkerKind>,
        meta: Option<Meta>,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferReport, ClientError> {
        let start = Instant::now();
        // Into a directory: under the name's last component, as `cp` does
        // (a name the server would refuse is refused here, before it
        // could point anywhere).
        if dest.is_dir() {
            deltasync_core::message::validate_name(name).map_err(ClientError::Refused)?;
        }
        let into = dest.is_dir().then(|| dest.join(name.rsplit('/').next().unwrap_or(name)));
        let dest = into.as_deref().unwrap_or(dest);
        let local = |e: io::Error| {
            if is_out_of_space(&e) {
                ClientError::LocalNoSpace(dest.to_path_buf())
            } else {
                ClientError::Local(dest.to_path_buf(), e)
            }
        };
        // The local copy, if any, is the base: its tree is built when the
        // session asks (chunked as the server's is).
        let current = match File::open(dest) {
            Ok(f) if f.metadata().map_err(local)?.is_file() => Some(f),
            Ok(_) => return Err(local(io::Error::other("not a regular file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(local(e)),
        };
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("download");
        let tmp = dir.join(format!(".deltasync-dl-{}-{base_name}", std::process::id()));
        // Read too: the new version's hints are read back from it. A new
        // file of our own: whatever is at that name (a stale one, a
        // planted link) goes first, and is never written through.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(local(e)),
            _ => {}
        }
        let created = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp);
        let file = BufWriter::with_capacity(1 << 20, created.map_err(local)?);
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let (s0, r0) = self.wire_bytes();
        let out = LocalOut::new(file, true);
        let base = current.as_ref().map(|f| f.try_clone().map(FileSource)).transpose().map_err(local)?;
        let mut op: DownloadSession<'_, Tree, FileSource, LocalOut> =
            DownloadSession::new(name, out, base, self.salt, self.version, now())
                .deltas(self.caps & CAP_DELTA != 0)
                .fine(self.caps & CAP_FINE != 0);
        if let Some(kind) = listed {
            op = op.listed(kind);
        }
        let old_hints = self.hints_file(name).as_deref().and_then(load_hints);
        let waker = self.waker.clone();
        let ctl = self.ctl.try_clone().map_err(ClientError::Network)?;
        let (outcome, failed) = std::thread::scope(|s| {
            let mut build = None;
            let outcome = self.run(&mut op, name, |op, _| {
                progress(Progress { done: op.progress(), total: op.offer().map_or(0, |o| o.size) });
                if let (Some(Need::Tree { kind, .. }), Some(f)) = (op.need(), current.as_ref()) {
                    // Chunk ids only; the hints of `name` help if this copy
                    // is what was last sent.
                    let old = old_hints.as_ref();
                    build = Some(Build::spawn(s, waker.clone(), &ctl, move || {
                        chunk_tree(f, kind, old, old.is_some()).map(|(t, _)| t)
                    }));
                }
                if let Some(b) = build.as_mut() {
                    b.deliver(|tree| op.tree_ready(tree));
                }
            });
            (outcome, build.and_then(Build::join))
        });
        if let Some(e) = failed {
            return Err(local(e));
        }
        let outcome = outcome.map_err(|e| match e {
            ClientError::LocalNoSpace(_) => ClientError::LocalNoSpace(dest.to_path_buf()),
            e => e,
        })?;
        let offer = *op.offer().ok_or_else(|| ClientError::Protocol("no offer".into()))?;
        let stats = op.stats();
        let (out, tree) = op.take_result().ok_or_else(|| ClientError::Protocol("no result".into()))?;
        match outcome {
            Outcome::Integrity => return Err(ClientError::Integrity(name.into())),
            Outcome::Unchanged => {
                drop(out);
                if let (Some(meta), Some(f)) = (meta, current.as_ref()) {
                    set_local_meta(f, meta).map_err(local)?;
                }
            }
            Outcome::Written => {
                let (f, hashed) = out.finish().map_err(local)?;
                // Hashed as far as we wrote: the file must end there.
                if f.metadata().map_err(local)?.len() != offer.size {
                    return Err(ClientError::Integrity(name.into()));
                }
                if let Some(meta) = meta {
                    set_local_meta(&f, meta).map_err(local)?;
                }
                // The receiver checked the root; the bytes written (reused
                // ones copied from a local copy that may have changed
                // since its tree was built) are checked against the
                // offer's SHA-256 here, hashed as they were written (read
                // back by another thread) while they go to disk.
                // A whole file fetched leaves its hints too, for the next
                // delta of this name either way (a delta keeps the old
                // version's: they still spare all but the changed groups).
                let hints_file = self.hints_file(name).filter(|_| current.is_none());
                let (synced, hash, hints) = std::thread::scope(|s| {
                    let sync = s.spawn(|| f.sync_all());
                    let hints = hints_file.is_some().then(|| {
                        s.spawn(|| tree.and_then(|t| ChunkHints::collect(&f, &t, &Known::default()).ok()))
                    });
                    let hash = match hashed {
                        Some((hasher, len)) => hasher.finish(len),
                        None => deltasync_host::build::file_hash(&f),
                    };
                    let synced = sync.join().unwrap_or_else(|_| Err(io::Error::other("sync failed")));
                    (synced, hash, hints.and_then(|h| h.join().ok().flatten()))
                });
                synced.map_err(local)?;
                if hash.map_err(local)? != offer.file_hash {
                    return Err(ClientError::Integrity(name.into()));
                }
                fs::rename(&tmp, dest).map_err(local)?;
                if let (Some(path), Some(hints)) = (hints_file, hints) {
                    store_hints(&path, &hints.with_file_hash(offer.file_hash));
                }
            }
        }
        drop(guard);
        let (s1, r1) = self.wire_bytes();
        Ok(TransferReport {
            name: name.into(),
            mode: mode_of(outcome, stats.literal_bytes, offer.size),
            file_bytes: offer.size,
            wire_bytes_sent: s1 - s0,
            wire_bytes_received: r1 - r0,
            literal_bytes: stats.literal_bytes,
            reused_bytes: if outcome == Outcome::Unchanged { offer.size } else { stats.reused_bytes },
            duration_ms: start.elapsed().as_millis() as u64,
            sha256: offer.file_hash.to_string(),
            replaced: false,
        })
    }
}

/// A tree sync's extras for an upload.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sending {
    /// Published only if the server's version is as expected.
    pub expect: Option<Expect>,
    /// Published with this time and mode.
    pub meta: Option<Meta>,
    /// How the server's version is chunked (`Some(None)`: it has none), as
    /// a listing said: no `Stat` then.
    pub listed: Option<Option<ChunkerKind>>,
}

/// Gives a local file a tree sync's time and mode (the permission bits
/// only).
pub(crate) fn set_local_meta(f: &File, meta: Meta) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(meta.mode & deltasync_core::message::MODE_BITS))?;
    // A time no clock can hold (a hostile server's) is refused, not added.
    let t = std::time::UNIX_EPOCH
        .checked_add(Duration::new(meta.modified, meta.nanos.min(999_999_999)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "modification time out of range"))?;
    f.set_modified(t)
}

/// How an upload ended, as the server told.
struct Ended {
    outcome: Outcome,
    /// File bytes sent.
    literal: u64,
    /// The SHA-256 the server reported (when the offer left it unknown).
    reported: Option<Hash>,
    /// The server's version changed while the upload ran.
    replaced: bool,
}

/// Whether a failed write was for want of space (a full disk or quota).
fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// A download's file being written: tells the receiver when a write failed
/// for want of space.
struct LocalOut {
    file: BufWriter<File>,
    out_of_space: bool,
    /// Bytes written, and how many of them the kernel was asked to start
    /// writing to disk.
    written: u64,
    kicked: u64,
    /// Its owner checks the file's SHA-256 once written (see
    /// [`Output::hashes_file`]): hashed by `hasher` as it is written.
    checked: bool,
    hasher: Option<ReadBack<FileSha256>>,
}

/// A file's SHA-256 as it is written, and the file's length.
type Hashing = (ReadBack<FileSha256>, u64);

/// Bytes written between two early writeback requests.
const WRITEBACK_STEP: u64 = 4 << 20;

impl LocalOut {
    pub(crate) fn new(file: BufWriter<File>, checked: bool) -> LocalOut {
        LocalOut { file, out_of_space: false, written: 0, kicked: 0, checked, hasher: None }
    }

    /// `n` more bytes are in the file (or its buffer): every few MiB, the
    /// disk is asked to start on them, and the hasher may read them.
    fn wrote(&mut self, n: u64) {
        if self.checked && self.hasher.is_none() && self.written == 0 {
            // If no thread can be had, the file is hashed once written.
            self.hasher = self
                .file
                .get_ref()
                .try_clone()
                .and_then(|f| ReadBack::start(f, FileSha256::default(), 0, "download-hash"))
                .ok();
        }
        self.written += n;
        if self.written - self.kicked >= WRITEBACK_STEP && io::Write::flush(&mut self.file).is_ok() {
            deltasync_host::start_writeback(self.file.get_ref(), self.kicked, self.written - self.kicked);
            self.kicked = self.written;
            if let Some(h) = &self.hasher {
                h.ready(self.kicked);
            }
        }
    }

    /// The written file (flushed), and its hasher with the file's length
    /// (see [`ReadBack::finish`]) if it was hashed as it was written.
    fn finish(self) -> io::Result<(File, Option<Hashing>)> {
        let LocalOut { file, written, hasher, .. } = self;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        Ok((file, hasher.map(|h| (h, written))))
    }
}

impl Output for LocalOut {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        io::Write::write_all(&mut self.file, data).map_err(|e| {
            self.out_of_space = is_out_of_space(&e);
            IoFailed
        })?;
        self.wrote(data.len() as u64);
        Ok(())
    }

    fn out_of_space(&self) -> bool {
        self.out_of_space
    }

    /// Reused ranges of the local copy are copied inside the kernel (a
    /// reference on a file system with reflinks).
    fn copy_from(&mut self, src: &dyn std::any::Any, offset: u64, len: u64) -> Result<bool, IoFailed> {
        let Some(src) = src.downcast_ref::<File>() else { return Ok(false) };
        if let Err(e) = io::Write::flush(&mut self.file) {
            self.out_of_space = is_out_of_space(&e);
            return Err(IoFailed);
        }
        let (mut from, end) = (offset, offset + len);
        while from < end {
            let step = (end - from).min(WRITEBACK_STEP) as usize;
            // The destination's own position: plain writes continue there.
            let first = from == offset;
            match deltasync_host::copy_step(src, &mut from, self.file.get_ref(), step, first) {
                deltasync_host::CopyStep::Copied(n) => self.wrote(n as u64),
                // The receiver copies through memory.
                deltasync_host::CopyStep::Unsupported => return Ok(false),
                deltasync_host::CopyStep::Failed { out_of_space, .. } => {
                    self.out_of_space = out_of_space;
                    return Err(IoFailed);
                }
            }
        }
        Ok(true)
    }

    /// The download checks the new file's SHA-256 once written (while it
    /// syncs), rather than the receiver hashing each byte as it goes.
    fn hashes_file(&self) -> bool {
        self.checked
    }
}

/// How long a read waits before the driver checks the machine's deadlines
/// (local events wake it at once: see [`Waker`]).
const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// The tree of `file` in chunk ids only, helped by `old` hints if any;
/// with `grouped`, the build also hashes the groups new hints are made of
/// (see [`ChunkHints::collect`]), else it spares that work.
fn chunk_tree(
    file: &File,
    kind: ChunkerKind,
    old: Option<&ChunkHints>,
    grouped: bool,
) -> io::Result<(Tree, Known)> {
    let threads = deltasync_host::build::default_threads();
    if grouped || old.is_some() {
        build_tree_hinted(file, kind, threads, old)
    } else {
        Ok((deltasync_host::build::build_tree_unhashed(file, kind, threads)?, Known::default()))
    }
}

/// Hints stored at `path`, if any and undamaged.
fn load_hints(path: &Path) -> Option<ChunkHints> {
    ChunkHints::from_bytes(&fs::read(path).ok()?)
}

/// Stores hints at `path` (best effort: they are a cache), replacing the
/// file at once so that a reader sees old or new hints whole. The directory
/// and the files are its owner's alone: hints written by someone else could
/// make an upload offer wrong chunk ids.
fn store_hints(path: &Path, hints: &ChunkHints) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&hints.to_bytes())?;
        fs::rename(&tmp, path)
    };
    if write().is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

fn mode_of(outcome: Outcome, literal: u64, total: u64) -> Mode {
    match outcome {
        Outcome::Unchanged => Mode::Unchanged,
        _ if literal < total => Mode::Delta,
        _ => Mode::Full,
    }
}

/// Removes a temporary file unless it was renamed into place.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

pub mod tree;

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn a_time_no_clock_holds_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let meta = deltasync_core::message::Meta { modified: u64::MAX, nanos: 0, mode: 0o644 };
        assert!(super::set_local_meta(&f, meta).is_err());
        let fine = deltasync_core::message::Meta { modified: 1_600_000_000, nanos: 5, mode: 0o600 };
        super::set_local_meta(&f, fine).unwrap();
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(5_000_000), "4.8 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn names_cannot_drive_the_terminal_or_forge_lines() {
        assert_eq!(printable("plain/name.txt"), "plain/name.txt");
        assert_eq!(printable("x\u{1b}]0;owned\u{7}y"), "x\\e]0;owned\\x07y");
        assert_eq!(printable("a\nfake line"), "a\\nfake line");
        assert_eq!(printable("tab\there\r"), "tab\\there\\r");
        assert_eq!(printable("del\u{7f} c1\u{9b}"), "del\\x7f c1\\x9b");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("a\u{200b}b\u{feff}"), "a\\u{200b}b\\u{feff}");
        assert_eq!(printable("back\\slash"), "back\\\\slash");
        assert_eq!(printable("ünïcödé 名前"), "ünïcödé 名前");
    }

    #[test]
    fn json_escapes_what_a_terminal_must_not_see_and_stays_exact() {
        let name = "a\u{1b}b\u{7f}c\u{9b}d\u{202e}e\u{e0041}f\\g\"h ünï";
        let line = super::json_line(&serde_json::json!({ "name": name })).unwrap();
        assert_eq!(line, r#"{"name":"a\u001bb\u007fc\u009bd\u202ee\udb40\udc41f\\g\"h ünï"}"#);
        assert!(!line.chars().any(super::unsafe_to_show));
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["name"], name);
    }
}
