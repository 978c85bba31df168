//! Accepting clients. Each connection is a tokio task driven by
//! `deltasync-core`'s async driver; an idle connection holds no thread.
//! The machine's steps (which read and write storage and hash) run on a
//! bounded pool of blocking workers, never on the async workers. Admission
//! ([`Gate`]) caps connections overall and per address, drops the oldest
//! unauthenticated connection when full, and slows then bans addresses
//! whose handshakes keep failing.

use crate::store::{FsStore, ServerStore};
use crate::{gate::Gate, gate::Reason, keys::KeyRing};
use deltasync_core::conn::server::{Event, Progress, ServerConn};
use deltasync_core::driver::{BATCH_ROOM, DriveError, Pump, Session, Step, run_async};
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::frame::{MAX_ENCODED, MAX_SEALED};
use deltasync_core::message::{MAX_NAME, Message};
use deltasync_host::local::now;
use embedded_io_adapters::tokio_1::FromTokio;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::gate::Limits;

/// Buffers (input, largest frame in, largest frame out) of a connection
/// until its client's hello passed: enough for a hello and the accept.
const HELLO: (usize, usize, usize) = (512, 256, 256);
/// Buffers between requests: enough for any request or reply that is not
/// a transfer (a whole request fits in the input, so it takes one read),
/// and for replies sealed several to a frame (`BATCH_ROOM`).
const SMALL: (usize, usize, usize) = (MAX_NAME + 1024, MAX_NAME + 512, MAX_NAME + 512 + BATCH_ROOM);
/// Buffers while a request is served: full `Data` frames both ways.
const LARGE: (usize, usize, usize) = (256 * 1024, MAX_SEALED, MAX_ENCODED + BATCH_ROOM);

/// Threads for handshake steps (an X25519 exchange and a key lookup each).
const HANDSHAKE_THREADS: usize = 2;

/// Which buffers a connection holds now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Buffers {
    Hello,
    Small,
    Large,
}

impl Buffers {
    fn sizes(self) -> (usize, usize, usize) {
        match self {
            Buffers::Hello => HELLO,
            Buffers::Small => SMALL,
            Buffers::Large => LARGE,
        }
    }
}

/// What the server reports about its connections (the dashboard listens).
pub trait Observer: Send + Sync {
    /// A client proved its key (connections that never do are only
    /// counted: a flood of them must not fill the dashboard).
    fn connected(&self, _id: u64, _peer: SocketAddr) {}
    /// Something happened on a connection; `wire` is the bytes it has moved
    /// so far, both ways.
    fn event(&self, _id: u64, _event: &Event, _wire: u64) {}
    /// Periodic progress: the transfer in flight and the wire counters.
    fn progress(&self, _id: u64, _transfer: Option<Progress>, _sent: u64, _received: u64) {}
    /// The connection ended; `error` says why if it was not a clean close.
    fn closed(&self, _id: u64, _error: Option<&DriveError<io::Error>>) {}
    /// A connection was refused, or dropped before it authenticated.
    fn refused(&self, _reason: Reason) {}
    /// Connections open now, and how many of them have not authenticated.
    fn connections(&self, _open: usize, _unauthenticated: usize) {}
}

/// An observer that only logs.
pub struct LogOnly;
impl Observer for LogOnly {}

/// Everything a connection needs.
pub struct Server<S: ServerStore = FsStore> {
    /// The storage.
    pub store: S,
    /// The clients' keys.
    pub keys: Arc<KeyRing>,
    /// Who hears about connections.
    pub observer: Arc<dyn Observer>,
    /// Admission: caps, eviction, throttling.
    pub gate: Arc<Gate>,
    /// The threads that run authenticated connections' steps.
    workers: Workers,
    /// The threads that run handshake steps.
    handshakes: Workers,
}

/// A fixed-size pool of threads for connection steps (a runtime of its own
/// used only for its blocking pool: at most `n` threads, steps beyond that
/// wait in its queue).
struct Workers(Option<tokio::runtime::Runtime>);

impl Workers {
    fn new(n: usize, name: &str) -> io::Result<Workers> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(n.max(1))
            .thread_name(name)
            .build()?;
        Ok(Workers(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropped from async code: do not wait for the threads here.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A connection's state machine and buffers.
type ConnSession<S> = Session<ServerConn<S, Arc<KeyRing>>, Vec<u8>, Vec<u8>, Vec<u8>>;

/// One connection's state, moved between its task and the workers.
struct Conn<S: ServerStore> {
    session: ConnSession<S>,
    id: u64,
    peer: SocketAddr,
    authenticated: bool,
    /// Shared with the task, which may evict the connection.
    flags: Arc<Mutex<Flags>>,
    buffers: Buffers,
    last_report: deltasync_core::Instant,
}

/// What a connection's task and its steps agree on under a lock: a step
/// marks it authenticated only if it has not been evicted, and the task
/// evicts it only if it has not authenticated.
#[derive(Default)]
struct Flags {
    authenticated: bool,
    evicted: bool,
}

/// The boxed state, as the driver sees it: the session.
struct Boxed<S: ServerStore>(Box<Conn<S>>);

impl<S: ServerStore> Deref for Boxed<S> {
    type Target = ConnSession<S>;
    fn deref(&self) -> &Self::Target {
        &self.0.session
    }
}

impl<S: ServerStore> DerefMut for Boxed<S> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0.session
    }
}

type Socket = FromTokio<Pin<Box<tokio_io_timeout::TimeoutStream<tokio::net::TcpStream>>>>;

impl<S: ServerStore> Server<S> {
    /// A server over `store` checking clients against `keys`, within
    /// `limits`.
    pub fn new(
        store: S,
        keys: Arc<KeyRing>,
        observer: Arc<dyn Observer>,
        limits: Limits,
    ) -> io::Result<Server<S>> {
        let workers = Workers::new(limits.workers, "deltasync-worker")?;
        let handshakes = Workers::new(HANDSHAKE_THREADS, "deltasync-handshake")?;
        Ok(Server { store, keys, observer, gate: Gate::new(limits), workers, handshakes })
    }

    /// Serves one admitted client until it disconnects, times out or is
    /// evicted.
    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        ticket: crate::gate::Ticket,
    ) {
        let id = ticket.id;
        tracing::debug!(id, %peer, "connected");
        let flags = Arc::new(Mutex::new(Flags::default()));
        let work = self.clone().serve_one(stream, peer, id, ticket.delay, flags.clone());
        tokio::pin!(work);
        let evicted = loop {
            tokio::select! {
                () = &mut work => break false,
                () = ticket.evict.notified() => {
                    // Its step may have proved the key meanwhile: then it
                    // stays (the server is one over its cap for a moment).
                    let mut f = flags.lock().unwrap_or_else(|p| p.into_inner());
                    if !f.authenticated {
                        f.evicted = true;
                        break true;
                    }
                }
            }
        };
        if evicted {
            // Dropping `work` drops the connection (a step in flight ends
            // on its own and reports nothing). Counted against the address:
            // a flood that keeps the server full is slowed and banned too.
            tracing::debug!(id, %peer, "evicted: the server was full and this connection had not authenticated");
            self.refused(Reason::Evicted);
            self.handshake_failed(peer);
        }
    }

    /// The connection after admission: the slow-down delay, the session,
    /// then its accounting.
    async fn serve_one(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        id: u64,
        delay: Option<Duration>,
        flags: Arc<Mutex<Flags>>,
    ) {
        if let Some(delay) = delay {
            // Its address failed many handshakes lately: it waits, holding
            // no thread and counting against its address's cap.
            tracing::debug!(id, %peer, ?delay, "delayed: repeated failed handshakes from this address");
            tokio::time::sleep(delay).await;
        }
        // The handshake's time counts from here (a delay does not eat it).
        let accepted = now();
        let limits = &self.gate.limits;
        let _ = stream.set_nodelay(true);
        let mut timed = tokio_io_timeout::TimeoutStream::new(stream);
        // A peer that stops reading cannot hold a write forever.
        timed.set_write_timeout(Some(limits.idle_timeout));
        let mut io: Socket = FromTokio::new(Box::pin(timed));
        let machine = ServerConn::new(self.store.clone(), self.keys.clone(), rand::random(), accepted)
            .timeouts(
                accepted,
                limits.handshake_timeout.as_millis() as u64,
                limits.idle_timeout.as_millis() as u64,
            );
        let (i, f, o) = HELLO;
        let pump = Pump::new(vec![0u8; i], vec![0u8; f], vec![0u8; o]);
        let conn = Boxed(Box::new(Conn {
            session: Session { machine, pump },
            id,
            peer,
            authenticated: false,
            flags,
            buffers: Buffers::Hello,
            last_report: accepted,
        }));
        let server = self.clone();
        let run = move |mut c: Boxed<S>| {
            let server = server.clone();
            async move {
                // Hellos have threads of their own: storage work cannot
                // hold a client's handshake past its deadline. From the
                // first sealed frame on (a request), the workers.
                let pool = if c.pump.is_secure() { &server.workers } else { &server.handshakes };
                let worker = server.clone();
                let joined = pool
                    .handle()
                    .spawn_blocking(move || {
                        let r = worker.advance(&mut c.0);
                        (c, r)
                    })
                    .await;
                match joined {
                    Ok(v) => v,
                    // A panic in a step ends this connection's task only.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
        };
        let (mut conn, result) = run_async(conn, &mut io, run, sleep_until).await;
        if conn.0.authenticated && matches!(result, Err(DriveError::Session(_) | DriveError::Frame(_))) {
            // The client was told why (a farewell `Error`); it may still be
            // sending. Closing with its bytes unread would reset the
            // connection, and the reset can destroy the answer before the
            // client reads it: read (and drop) what it sends, a little while.
            linger(io.inner_mut()).await;
        }
        let c = &mut *conn.0;
        let conn_state = &mut c.session.machine;
        self.report_events(id, conn_state, c.session.pump.sent + c.session.pump.received);
        self.observer.progress(id, None, c.session.pump.sent, c.session.pump.received);
        let key = c.session.machine.key_name().unwrap_or("-").to_string();
        let result = match result {
            // The client hung up between requests, or before sending
            // anything (a port check): a clean close.
            Err(DriveError::Closed)
                if (c.session.machine.is_idle() && !c.session.pump.is_mid_frame())
                    || c.session.pump.received == 0 =>
            {
                Ok(())
            }
            Err(e) => Err(e),
            Ok(()) => Ok(()),
        };
        match &result {
            Ok(()) if c.authenticated => tracing::info!(id, %peer, key, "closed"),
            Ok(()) if c.session.pump.received == 0 => tracing::debug!(id, %peer, "closed without a word"),
            Ok(()) => {
                // Hung up after a hello that passed but before proving the
                // key: a replayed hello, as far as anyone can tell.
                tracing::debug!(id, %peer, "closed after its hello, before proving its key");
                self.handshake_failed(peer);
            }
            Err(DriveError::Session(SessionError::Protocol(ErrorCode::Tampered))) if c.authenticated => {
                tracing::warn!(id, %peer, key, "a frame failed authentication: changed on the way");
            }
            Err(e) if !c.authenticated => {
                // Counted against the address: enough of these and it is
                // slowed, then banned for a while.
                let why = match e {
                    DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed)) => {
                        "unknown key or wrong secret"
                    }
                    DriveError::Session(SessionError::Protocol(ErrorCode::Tampered)) => {
                        "its first sealed frame failed authentication (changed on the way, or a replayed hello)"
                    }
                    DriveError::Session(SessionError::Timeout) => "no key proved in time",
                    _ => "not a valid handshake",
                };
                tracing::debug!(id, %peer, error = %e, "handshake failed: {why}");
                self.handshake_failed(peer);
                match e {
                    // Counted as authentication failures, and shown.
                    DriveError::Session(SessionError::Protocol(
                        ErrorCode::AuthFailed | ErrorCode::Tampered,
                    )) => {}
                    DriveError::Session(SessionError::Timeout) => self.refused(Reason::HandshakeTimeout),
                    _ => self.refused(Reason::BadHandshake),
                }
            }
            Err(e) => tracing::warn!(id, %peer, key, error = %e, "connection ended with an error"),
        }
        // Only authentication failures and authenticated connections'
        // errors reach the dashboard's list: a flood must not fill it.
        let shown = result.as_ref().err().filter(|e| {
            c.authenticated
                || matches!(
                    e,
                    DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed | ErrorCode::Tampered))
                )
        });
        self.observer.closed(id, shown);
        // Dropping the session may touch storage (an interrupted upload is
        // kept as a partial): not on this thread.
        let _ = self.workers.handle().spawn_blocking(move || drop(conn)).await;
    }

    /// Counts a failed handshake against `peer`'s address.
    fn handshake_failed(&self, peer: SocketAddr) {
        if let Some(until) = self.gate.failed(peer.ip()) {
            tracing::warn!(%peer, secs = until.as_secs(), "banning address: too many failed handshakes (see --ban-after)");
        }
    }

    /// Logs and reports the connection's events; `wire` is its bytes so far.
    fn report_events(&self, id: u64, conn: &mut ServerConn<S, Arc<KeyRing>>, wire: u64) {
        while let Some(ev) = conn.next_event() {
            log_event(id, conn.key_name().unwrap_or("-"), &ev);
            self.observer.event(id, &ev, wire);
        }
    }

    /// Counts a refused or dropped connection (metrics, log summary).
    fn refused(&self, reason: Reason) {
        self.gate.note(reason);
        self.observer.refused(reason);
    }

    /// One burst of machine work, on a worker thread: steps until the
    /// socket is needed, reporting events and sizing the buffers.
    fn advance(&self, c: &mut Conn<S>) -> Result<Step<()>, DriveError<Infallible>> {
        let Conn { session, id, peer, authenticated, flags, buffers, last_report } = c;
        let (id, peer) = (*id, *peer);
        let observer = &self.observer;
        let r = session.advance(now(), |conn, pump| {
            if !*authenticated && conn.is_authenticated() {
                let mut f = flags.lock().unwrap_or_else(|p| p.into_inner());
                if !f.evicted {
                    f.authenticated = true;
                    *authenticated = true;
                    self.gate.authenticated(id);
                    observer.connected(id, peer);
                }
            }
            self.report_events(id, conn, pump.sent + pump.received);
            // Room for a request once the hello passed (the channel is
            // up), and full-size buffers only while a request is served,
            // grown before the reply is produced. Growing keeps what the
            // buffers hold.
            let wanted = if conn.is_busy() {
                Buffers::Large
            } else if pump.is_secure() && *buffers == Buffers::Hello {
                Buffers::Small
            } else {
                *buffers
            };
            if wanted != *buffers {
                let (i, f, o) = wanted.sizes();
                if pump.resize(i, f, o) {
                    *buffers = wanted;
                }
            }
            let t = now();
            if t.0 >= last_report.0 + 100 {
                *last_report = t;
                observer.progress(id, conn.progress(), pump.sent, pump.received);
            }
        });
        // Waiting for the next request: back to small buffers, unless the
        // client already sent part of a large frame.
        if matches!(r, Ok(Step::Read(_))) && *buffers == Buffers::Large && !session.machine.is_busy() {
            let (i, f, o) = SMALL;
            if session.pump.resize(i, f, o) {
                *buffers = Buffers::Small;
            }
        }
        r
    }
}

/// Half-closes `stream` and reads (dropping) what the peer still sends,
/// for at most 2 s and 64 MiB, so that the last frame it was sent arrives
/// instead of a reset.
async fn linger(stream: &mut Pin<Box<tokio_io_timeout::TimeoutStream<tokio::net::TcpStream>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    let mut left = 64usize << 20;
    let drain = async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Sleeps until `deadline` on the machines' clock ([`now`]).
fn sleep_until(deadline: deltasync_core::Instant) -> tokio::time::Sleep {
    let wait = Duration::from_millis(deadline.0.saturating_sub(now().0)).min(Duration::from_secs(86_400));
    tokio::time::sleep(wait)
}

fn log_event(id: u64, key: &str, ev: &Event) {
    match ev {
        Event::Authenticated { key } => tracing::info!(id, key, "authenticated"),
        // A client asks whether a file exists before its first upload.
        Event::Refused { name, code: code @ ErrorCode::NotFound } => {
            tracing::debug!(id, key, name, %code, "request refused")
        }
        Event::Refused { name, code } => tracing::warn!(id, key, name, %code, "request refused"),
        Event::Deleted { name } => tracing::info!(id, key, name, "deleted"),
        Event::Copied { from, to } => tracing::info!(id, key, from, name = to, "copied"),
        Event::Listed { dir } => tracing::debug!(id, key, dir, "listed"),
        Event::Finished { name, direction, size, outcome, literal_bytes, reused_bytes, .. } => {
            tracing::info!(
                id,
                key,
                name,
                ?direction,
                size,
                ?outcome,
                literal_bytes,
                reused_bytes,
                "transfer finished"
            )
        }
        other => tracing::debug!(id, key, event = ?other),
    }
}

/// Tells a refused peer why, if its socket takes the bytes at once (a
/// client reports it; nothing waits on a peer that does not read).
fn refuse(stream: &tokio::net::TcpStream) {
    let mut buf = [0u8; 8];
    if let Ok(n) = deltasync_core::frame::encode(&Message::Error(ErrorCode::TooManyRequests), &mut buf) {
        let _ = stream.try_write(&buf[..n]);
    }
}

/// Accepts clients until `shutdown` completes, then waits (at most
/// `grace`) for open connections to finish.
pub async fn serve<S: ServerStore>(
    listener: tokio::net::TcpListener,
    server: Arc<Server<S>>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut summary = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: the open
                        // connections go on; accept again shortly.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match server.gate.admit(peer.ip()) {
                    Ok(ticket) => {
                        tokio::spawn(server.clone().connection(stream, peer, ticket));
                    }
                    Err(reason) => {
                        tracing::debug!(%peer, reason = reason.label(), "connection refused");
                        refuse(&stream);
                        server.refused(reason);
                    }
                }
            }
            _ = report.tick() => {
                let (open, pending) = server.gate.counts();
                server.observer.connections(open, pending);
            }
            _ = summary.tick() => {
                for (reason, n) in server.gate.take_tally() {
                    tracing::warn!(reason = reason.label(), count = n, "connections refused or dropped in the last 10 s: {}", reason.describe());
                }
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections");
    let deadline = tokio::time::Instant::now() + grace;
    while server.gate.open.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
