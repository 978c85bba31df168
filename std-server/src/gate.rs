//! Admission control: who may open a connection, and for how long an
//! address that keeps failing handshakes is slowed down, then shut out.
//!
//! - At most [`Limits::max_connections`] connections are open. When full, a
//!   new connection evicts the oldest one that has not authenticated yet (a
//!   flood of idle or half-open connections cannot lock clients out); if
//!   every open connection has authenticated, it is refused.
//! - At most [`Limits::max_per_address`] connections that have not proved a
//!   key yet from one IPv4 address or one IPv6 /64 network (one host's
//!   share of addresses). Authenticated connections count only against the
//!   overall cap: a fleet behind one address is not limited by it, and a
//!   client's closing connection cannot make its next one look greedy.
//! - Failed handshakes (a wrong key, garbage, no key proved in time) are
//!   counted per address over [`Limits::failure_window`]: from
//!   [`Limits::slow_after`] failures on, each new connection from it waits
//!   [`Limits::slow_delay`] before it is served; at [`Limits::ban_after`] the
//!   address is refused for [`Limits::ban_time`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The server's limits (see the module documentation; `deltasync-server
/// --help` lists each with its default).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once, all addresses together.
    pub max_connections: usize,
    /// Connections not yet authenticated, open at once from one IPv4
    /// address or IPv6 /64.
    pub max_per_address: usize,
    /// Time from the accept within which a client must prove its key.
    pub handshake_timeout: Duration,
    /// Silence allowed between requests once authenticated (also the
    /// longest a write to a client that does not read may wait).
    pub idle_timeout: Duration,
    /// Connection steps (storage work and hashing) running at once.
    pub workers: usize,
    /// Failed handshakes from an address, within the window, after which
    /// its new connections are delayed (0: never).
    pub slow_after: u32,
    /// How long such a connection waits before it is served.
    pub slow_delay: Duration,
    /// Failed handshakes within the window after which the address is
    /// refused (0: never).
    pub ban_after: u32,
    /// How long a banned address is refused.
    pub ban_time: Duration,
    /// The window over which failures are counted.
    pub failure_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            workers: 32,
            slow_after: 5,
            slow_delay: Duration::from_secs(2),
            ban_after: 20,
            ban_time: Duration::from_secs(300),
            failure_window: Duration::from_secs(60),
        }
    }
}

/// Why a connection was refused or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The server was full of authenticated connections.
    Full,
    /// Its address had too many connections open that had not proved a
    /// key.
    Address,
    /// Its address is banned for failed handshakes.
    Banned,
    /// Dropped unauthenticated to make room for a new connection.
    Evicted,
    /// Dropped for not proving a key within the handshake timeout.
    HandshakeTimeout,
    /// Dropped for sending something other than a valid hello.
    BadHandshake,
}

impl Reason {
    /// The `reason` label of `deltasync_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Full => "full",
            Reason::Address => "per_address",
            Reason::Banned => "banned",
            Reason::Evicted => "evicted",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::BadHandshake => "bad_handshake",
        }
    }

    /// What it means, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Full => "the server is full of authenticated connections (--max-connections)",
            Reason::Address => "too many unauthenticated connections from one address (--max-per-address)",
            Reason::Banned => "address banned after failed handshakes (--ban-after, --ban-time)",
            Reason::Evicted => "unauthenticated connections dropped to make room (--max-connections)",
            Reason::HandshakeTimeout => "no key proved within --handshake-timeout",
            Reason::BadHandshake => "not a valid hello (garbage, or an old protocol version)",
        }
    }
}

/// An address as limits count it: IPv4, or the /64 network of an IPv6
/// address (IPv4-mapped addresses count as IPv4).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[derive(Debug)]
struct Failures {
    count: u32,
    since: Instant,
    banned_until: Option<Instant>,
}

impl Failures {
    fn new() -> Failures {
        Failures { count: 0, since: Instant::now(), banned_until: None }
    }

    /// Whether a ban is running.
    fn banned(&self) -> bool {
        self.banned_until.is_some_and(|t| t > Instant::now())
    }

    /// Whether the record is over: its window has passed and no ban runs
    /// (a ban runs its full time).
    fn stale(&self, window: Duration) -> bool {
        self.since.elapsed() > window && !self.banned()
    }
}

/// Addresses with failures remembered at most (each costs a few dozen
/// bytes); past it, expired records are dropped, then the oldest.
const MAX_REMEMBERED: usize = 65_536;

/// Admission state shared by the accept loop and the connections.
pub struct Gate {
    /// The limits in force.
    pub limits: Limits,
    /// Connections open now (graceful shutdown waits for them).
    pub open: AtomicUsize,
    next_id: AtomicU64,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Connections that have not authenticated, oldest first, with their
    /// address (whose count they hold).
    pending: Mutex<BTreeMap<u64, (Arc<Notify>, IpAddr)>>,
    tally: Mutex<BTreeMap<Reason, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An admitted connection's place; dropping it frees the place.
pub struct Ticket {
    gate: Arc<Gate>,
    /// The connection's id.
    pub id: u64,
    address: IpAddr,
    /// Notified when the connection is evicted.
    pub evict: Arc<Notify>,
    /// How long to wait before serving it (its address failed often).
    pub delay: Option<Duration>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let g = &self.gate;
        // Still unauthenticated: its address's count goes too.
        if lock(&g.pending).remove(&self.id).is_some() {
            g.release_address(self.address);
        }
        g.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// A gate enforcing `limits`.
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            per_address: Mutex::default(),
            failures: Mutex::default(),
            pending: Mutex::default(),
            tally: Mutex::default(),
        })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Reason> {
        let address = address_key(ip);
        let l = &self.limits;
        let delay = {
            let mut f = lock(&self.failures);
            match f.get_mut(&address) {
                Some(r) if r.banned() => return Err(Reason::Banned),
                Some(r) if r.stale(l.failure_window) => {
                    f.remove(&address);
                    None
                }
                Some(r) if l.slow_after > 0 && r.count >= l.slow_after => Some(l.slow_delay),
                _ => None,
            }
        };
        {
            let mut per = lock(&self.per_address);
            let n = per.entry(address).or_default();
            if *n >= l.max_per_address {
                return Err(Reason::Address);
            }
            *n += 1;
        }
        if self.open.fetch_add(1, Ordering::SeqCst) >= l.max_connections {
            let oldest = lock(&self.pending).pop_first();
            match oldest {
                Some((_, (victim, victim_address))) => {
                    self.release_address(victim_address);
                    victim.notify_one();
                }
                None => {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                    self.release_address(address);
                    return Err(Reason::Full);
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        lock(&self.pending).insert(id, (evict.clone(), address));
        Ok(Ticket { gate: self.clone(), id, address, evict, delay })
    }

    /// One fewer unauthenticated connection from `address`.
    fn release_address(&self, address: IpAddr) {
        let mut per = lock(&self.per_address);
        if let Some(n) = per.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                per.remove(&address);
            }
        }
    }

    /// Connection `id` proved its key: it can no longer be evicted.
    /// Its address no longer counts it either.
    pub fn authenticated(&self, id: u64) {
        let removed = lock(&self.pending).remove(&id);
        if let Some((_, address)) = removed {
            self.release_address(address);
        }
    }

    /// Records a failed handshake from `ip`; returns the ban's length if
    /// this failure banned the address.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let l = &self.limits;
        let mut f = lock(&self.failures);
        if f.len() >= MAX_REMEMBERED {
            f.retain(|_, r| !r.stale(l.failure_window));
            if f.len() >= MAX_REMEMBERED {
                // Still full (a wide flood): keep the bans only.
                f.retain(|_, r| r.banned());
            }
        }
        let r = f.entry(address_key(ip)).or_insert_with(Failures::new);
        // A new window once the last one is over.
        if r.stale(l.failure_window) {
            *r = Failures::new();
        }
        r.count = r.count.saturating_add(1);
        if l.ban_after > 0 && r.count == l.ban_after {
            r.banned_until = Instant::now().checked_add(l.ban_time);
            return Some(l.ban_time);
        }
        None
    }

    /// Counts a refusal or drop for the periodic log summary.
    pub fn note(&self, reason: Reason) {
        *lock(&self.tally).entry(reason).or_default() += 1;
    }

    /// The refusals and drops counted since the last call.
    pub fn take_tally(&self) -> BTreeMap<Reason, u64> {
        std::mem::take(&mut *lock(&self.tally))
    }

    /// Connections open, and how many of them have not authenticated.
    pub fn counts(&self) -> (usize, usize) {
        (self.open.load(Ordering::SeqCst), lock(&self.pending).len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_connections: 3, max_per_address: 2, slow_after: 2, ban_after: 4, ..Limits::default() }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn caps_per_address_and_overall_evicting_the_oldest_unauthenticated() {
        let g = Gate::new(limits());
        let a1 = g.admit(A).unwrap();
        let _a2 = g.admit(A).unwrap();
        assert_eq!(g.admit(A).err(), Some(Reason::Address));
        let b1 = g.admit(B).unwrap();
        assert_eq!(g.counts(), (3, 3));
        // Full: the oldest unauthenticated (a1) is told to go.
        g.authenticated(b1.id);
        let evicted = a1.evict.clone();
        let b2 = g.admit(B).unwrap();
        assert!(futures_ready(&evicted), "the oldest was not evicted");
        drop(a1);
        assert_eq!(g.counts(), (3, 2));
        // Everyone left has authenticated: refused.
        g.authenticated(b2.id);
        g.authenticated(_a2.id);
        assert_eq!(g.admit(A).err(), Some(Reason::Full));
        // Places come back when connections close; an authenticated
        // connection does not count against its address.
        drop(b2);
        let a3 = g.admit(A).unwrap();
        drop(b1);
        let a4 = g.admit(A).unwrap();
        // a2 (authenticated), a3 and a4: A counts two.
        assert_eq!(g.admit(A).err(), Some(Reason::Address));
        g.authenticated(a3.id);
        // Now one: a new one from A is admitted (evicting a4, the oldest
        // unauthenticated, as the server is full).
        let evicted = a4.evict.clone();
        let _a5 = g.admit(A).unwrap();
        assert!(futures_ready(&evicted));
        drop(a4);
        assert_eq!(g.counts(), (3, 1));
    }

    fn futures_ready(n: &Arc<Notify>) -> bool {
        use std::future::Future;
        let f = n.notified();
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        f.as_mut().poll(&mut std::task::Context::from_waker(waker)).is_ready()
    }

    #[test]
    fn failing_addresses_are_slowed_then_banned() {
        let g = Gate::new(limits());
        assert_eq!(g.admit(A).unwrap().delay, None);
        assert_eq!(g.failed(A), None);
        assert_eq!(g.failed(A), None);
        assert_eq!(g.admit(A).unwrap().delay, Some(Duration::from_secs(2)));
        assert_eq!(g.admit(B).unwrap().delay, None, "another address is not slowed");
        assert_eq!(g.failed(A), None);
        assert_eq!(g.failed(A), Some(Duration::from_secs(300)));
        assert_eq!(g.admit(A).err(), Some(Reason::Banned));
        assert!(g.admit(B).is_ok());
    }

    #[test]
    fn a_ban_outlives_the_window_that_caused_it() {
        let g = Gate::new(Limits { failure_window: Duration::from_millis(50), ..limits() });
        for _ in 0..4 {
            g.failed(A);
        }
        assert_eq!(g.admit(A).err(), Some(Reason::Banned));
        std::thread::sleep(Duration::from_millis(80));
        // A connection of the banned address that was already open fails
        // after the window: the ban holds.
        assert_eq!(g.failed(A), None);
        assert_eq!(g.admit(A).err(), Some(Reason::Banned));
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let g = Gate::new(limits());
        let ip = |last: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, last));
        let _k = (g.admit(ip(1)).unwrap(), g.admit(ip(2)).unwrap());
        assert_eq!(g.admit(ip(3)).err(), Some(Reason::Address));
        let other = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(g.admit(other).is_ok());
    }
}
