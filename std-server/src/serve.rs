//! Accepting clients: one blocking task per connection (disk and hashing
//! never run on the async workers), each driving `deltasync-core`'s
//! [`ServerConn`] over the socket.

use crate::keys::KeyRing;
use crate::store::FsStore;
use deltasync_core::conn::server::{Event, Progress, ServerConn};
use deltasync_core::driver::{DriveError, Pump, TimeoutAsTimedOut, run_blocking_observed};
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::frame::{MAX_ENCODED, MAX_SEALED};
use deltasync_core::local::now;
use embedded_io_adapters::std::FromStd;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How often a blocked read wakes up to let the connection check deadlines.
const READ_TICK: Duration = Duration::from_millis(500);

/// What the server reports about its connections (the dashboard listens).
pub trait Observer: Send + Sync {
    /// A client connected.
    fn connected(&self, _id: u64, _peer: SocketAddr) {}
    /// Something happened on a connection; `wire` is the bytes it has moved
    /// so far, both ways.
    fn event(&self, _id: u64, _event: &Event, _wire: u64) {}
    /// Periodic progress: the transfer in flight and the wire counters.
    fn progress(&self, _id: u64, _transfer: Option<Progress>, _sent: u64, _received: u64) {}
    /// The connection ended; `error` says why if it was not a clean close.
    fn closed(&self, _id: u64, _error: Option<&DriveError<io::Error>>) {}
}

/// An observer that only logs.
pub struct LogOnly;
impl Observer for LogOnly {}

/// Counters kept whatever the observer (totals are the observer's job: the
/// dashboard counts connections and failed authentications).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now (graceful shutdown waits for them).
    pub open: AtomicUsize,
}

/// Everything a connection needs.
pub struct Server {
    /// The storage.
    pub store: FsStore,
    /// The clients' keys.
    pub keys: Arc<KeyRing>,
    /// Who hears about connections.
    pub observer: Arc<dyn Observer>,
    /// Live counters.
    pub counters: Counters,
    next_id: AtomicU64,
}

impl Server {
    /// A server over `store` checking clients against `keys`.
    pub fn new(store: FsStore, keys: Arc<KeyRing>, observer: Arc<dyn Observer>) -> Server {
        Server { store, keys, observer, counters: Counters::default(), next_id: AtomicU64::new(1) }
    }

    /// Serves one client until it disconnects. Blocking: call it from a
    /// blocking task.
    pub fn handle(&self, stream: TcpStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.counters.open.fetch_add(1, Ordering::SeqCst);
        self.observer.connected(id, peer);
        tracing::info!(id, %peer, "connected");
        let (result, key) = self.drive(id, stream);
        let key = key.as_deref().unwrap_or("-");
        match &result {
            Ok(()) => tracing::info!(id, %peer, key, "closed"),
            Err(DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed))) => {
                tracing::warn!(id, %peer, "authentication failed: unknown key or wrong secret");
            }
            Err(DriveError::Session(SessionError::Protocol(ErrorCode::Tampered))) => {
                tracing::warn!(id, %peer, key, "a frame failed authentication: changed on the way");
            }
            Err(e) => tracing::warn!(id, %peer, key, error = %e, "connection ended with an error"),
        }
        self.observer.closed(id, result.as_ref().err());
        self.counters.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// Drives one connection; its result and the name of its key, if its
    /// hello passed.
    fn drive(&self, id: u64, stream: TcpStream) -> (Result<(), DriveError<io::Error>>, Option<String>) {
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(READ_TICK)))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(30))));
        if let Err(e) = setup {
            return (Err(DriveError::Io(e)), None);
        }
        let mut io = FromStd::new(TimeoutAsTimedOut(stream));
        let ephemeral: [u8; 32] = rand::random();
        let mut conn = ServerConn::new(self.store.clone(), self.keys.clone(), ephemeral, now());
        let mut pump = Pump::new(vec![0u8; 256 * 1024], vec![0u8; MAX_SEALED], vec![0u8; MAX_ENCODED]);
        let mut last_report = now();
        let observer = &self.observer;
        let result = run_blocking_observed(&mut conn, &mut io, &mut pump, now, |conn, pump| {
            while let Some(ev) = conn.next_event() {
                log_event(id, conn.key_name().unwrap_or("-"), &ev);
                observer.event(id, &ev, pump.sent + pump.received);
            }
            let t = now();
            if t.0 >= last_report.0 + 100 {
                last_report = t;
                observer.progress(id, conn.progress(), pump.sent, pump.received);
            }
        });
        while let Some(ev) = conn.next_event() {
            log_event(id, conn.key_name().unwrap_or("-"), &ev);
            observer.event(id, &ev, pump.sent + pump.received);
        }
        observer.progress(id, None, pump.sent, pump.received);
        let key = conn.key_name().map(str::to_string);
        let result = match result {
            // The client hung up between requests: a clean close.
            Err(DriveError::Closed) if conn.is_idle() && !pump.is_mid_frame() => Ok(()),
            Err(e) => Err(e),
            Ok(()) => Ok(()),
        };
        (result, key)
    }
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
        Event::Finished { name, direction, size, outcome, literal_bytes, reused_bytes } => tracing::info!(
            id,
            key,
            name,
            ?direction,
            size,
            ?outcome,
            literal_bytes,
            reused_bytes,
            "transfer finished"
        ),
        other => tracing::debug!(id, key, event = ?other),
    }
}

/// Accepts clients until `shutdown` completes, then waits (at most
/// `grace`) for open connections to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                let server = server.clone();
                tokio::task::spawn_blocking(move || server.handle(stream));
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections");
    let deadline = tokio::time::Instant::now() + grace;
    while server.counters.open.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
