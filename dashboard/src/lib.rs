//! deltasync's live dashboard: an axum app the server mounts (default
//! 127.0.0.1:8000). It shows what the server publishes into a [`Hub`]: it
//! never sees protocol frames.
//!
//! Routes: `/` (the page), `/events` (Server-Sent Events, at most 4 snapshots
//! a second however fast chunks move), `/api/stats`, `/api/transfers`,
//! `/api/files`, `/metrics` (Prometheus text format). The page's scripts,
//! including Chart.js from the npm registry, are embedded at build time.

mod metrics;
mod page;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Most recent transfers and errors kept.
const RECENT: usize = 50;
/// Chart points kept (one a second: five minutes).
const POINTS: usize = 300;
/// Least time between two live updates to a page.
const UPDATE_EVERY: Duration = Duration::from_millis(250);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A connected client.
#[derive(Clone, Debug, Serialize)]
pub struct ClientRow {
    /// Connection number.
    pub id: u64,
    /// Remote address.
    pub addr: String,
    /// The name of its key once it proved it, else "connecting".
    pub identity: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
}

/// A transfer in progress.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveRow {
    /// Connection number.
    pub client: u64,
    /// The client's key.
    pub key: String,
    /// File name.
    pub name: String,
    /// "upload" or "download".
    pub direction: String,
    /// "delta" when an earlier version is being reused, else "full".
    pub mode: String,
    /// File bytes done.
    pub done: u64,
    /// File size.
    pub total: u64,
    /// Bytes per second on the wire, lately.
    pub rate: f64,
    /// Seconds left at that rate, if known.
    pub eta: Option<f64>,
    #[serde(skip)]
    started: Instant,
    #[serde(skip)]
    wire_at_start: u64,
}

/// A finished transfer or an error.
#[derive(Clone, Debug, Serialize)]
pub struct RecentRow {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Connection number.
    pub client: u64,
    /// The client's key ("" before it proved one).
    pub key: String,
    /// File name (empty for a failed authentication).
    pub name: String,
    /// "upload", "download", or "error".
    pub direction: String,
    /// "written", "unchanged", "integrity", "auth_failed", "refused: ...".
    pub result: String,
    /// Bytes on the wire for this transfer, both ways.
    pub wire_bytes: u64,
    /// File size.
    pub file_bytes: u64,
    /// 1 - wire / file.
    pub saving: f64,
    /// Wall time.
    pub duration_ms: u64,
}

/// Totals since start.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Bytes received from clients.
    pub wire_in: u64,
    /// Bytes sent to clients.
    pub wire_out: u64,
    /// Wire bytes of finished transfers.
    pub transfer_wire: u64,
    /// What full transfers would have sent (file sizes of finished transfers).
    pub full_bytes: u64,
    /// File bytes reused instead of sent.
    pub reused_bytes: u64,
    /// File bytes sent.
    pub literal_bytes: u64,
    /// 1 - transfer_wire / full_bytes.
    pub saving: f64,
    /// Finished transfers by (direction, result).
    pub transfers: BTreeMap<String, u64>,
    /// Failed authentications.
    pub auth_failures: u64,
    /// Refused requests.
    pub refused: u64,
    /// Connections that ended with an error (other than authentication).
    pub connection_errors: u64,
    /// Connections that proved a key.
    pub connections: u64,
    /// Connections refused or dropped before authenticating, by reason
    /// (`full`, `per_address`, `banned`, `evicted`, `handshake_timeout`,
    /// `bad_handshake`).
    pub refused_connections: BTreeMap<String, u64>,
    /// Connections open now, authenticated or not.
    pub open_connections: u64,
    /// Open connections that have not proved a key yet.
    pub unauthenticated_connections: u64,
    /// Sum of transfer durations, seconds.
    pub duration_seconds: f64,
    /// Counters per key name.
    pub by_key: BTreeMap<String, KeyTotals>,
}

/// What one key's clients did since start.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyTotals {
    /// Sessions that proved the key.
    pub sessions: u64,
    /// Finished transfers.
    pub transfers: u64,
    /// Wire bytes of finished transfers.
    pub wire_bytes: u64,
    /// File bytes of finished transfers.
    pub file_bytes: u64,
    /// Refused requests (permission denied included).
    pub refused: u64,
}

/// What went wrong on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem<'a> {
    /// The client did not prove a key.
    AuthFailed,
    /// A request was refused (the reason, for people).
    Refused(&'a str),
    /// The connection broke or the peer broke the protocol.
    Connection(&'a str),
}

/// One chart point.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub t: u64,
    /// Wire bytes per second over the last interval.
    pub rate: f64,
    /// Cumulative saving, percent.
    pub saving: f64,
}

/// A stored file, as the store describes it (core's one type for it).
pub type FileRow = deltasync_core::conn::server::StoredFile;

/// A tree sync (a connection that lists directories), as one operation
/// with its files.
#[derive(Clone, Debug, Serialize)]
pub struct TreeRow {
    /// Connection number.
    pub client: u64,
    /// The client's key.
    pub key: String,
    /// The first directory it listed (its tree's root on the server).
    pub root: String,
    /// Seconds since the Unix epoch when it began.
    pub since: u64,
    /// Files sent, copied or deleted so far.
    pub files: u64,
    /// Their sizes.
    pub file_bytes: u64,
    /// Bytes on the wire since it began, both ways.
    pub wire_bytes: u64,
    /// The last files, newest first ("name (what)").
    pub last: VecDeque<String>,
    /// Whether the connection is still open.
    pub running: bool,
    #[serde(skip)]
    wire_at_start: u64,
}

/// Files a tree row names.
const TREE_LAST: usize = 5;
/// Finished tree syncs kept.
const TREES: usize = 20;

#[derive(Default)]
struct Live {
    trees: BTreeMap<u64, TreeRow>,
    done_trees: VecDeque<TreeRow>,
    clients: BTreeMap<u64, ClientRow>,
    active: BTreeMap<u64, ActiveRow>,
    recent: VecDeque<RecentRow>,
    totals: Totals,
    series: VecDeque<Point>,
    last_sample_wire: u64,
}

impl Live {
    /// The key name of connection `id`, or "" before it proved one.
    fn key_of(&self, id: u64) -> String {
        self.clients.get(&id).map(|c| c.identity.clone()).filter(|k| k != "connecting").unwrap_or_default()
    }
}

/// Lists the stored files (the server provides it; called off the async
/// workers).
pub type FileLister = Arc<dyn Fn() -> Vec<FileRow> + Send + Sync>;

/// The storage's counters: requests by kind, `bytes_in` and `bytes_out`
/// (the server provides it; an object store has some).
pub type StoreCounters = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Where the server publishes what happens; the dashboard reads it.
pub struct Hub {
    live: Mutex<Live>,
    changed: watch::Sender<u64>,
    files: Mutex<Option<FileLister>>,
    store: Mutex<Option<StoreCounters>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            live: Mutex::default(),
            changed: watch::Sender::new(0),
            files: Mutex::new(None),
            store: Mutex::new(None),
        }
    }
}

impl Hub {
    /// A hub with nothing in it.
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    fn update(&self, f: impl FnOnce(&mut Live)) {
        {
            let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut l);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Sets how to list stored files.
    pub fn set_file_lister(&self, f: FileLister) {
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Sets how to read the storage's counters.
    pub fn set_store_counters(&self, f: StoreCounters) {
        *self.store.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// The storage's counters now (none for a store without).
    fn store_counters(&self) -> Vec<(&'static str, u64)> {
        let f = self.store.lock().unwrap_or_else(|p| p.into_inner()).clone();
        f.map(|f| f()).unwrap_or_default()
    }

    /// A client connected and proved its key (rows are only for those).
    pub fn connected(&self, id: u64, addr: SocketAddr) {
        self.update(|l| {
            l.totals.connections += 1;
            l.clients.insert(
                id,
                ClientRow {
                    id,
                    addr: addr.to_string(),
                    identity: "connecting".into(),
                    since: unix_now(),
                    bytes_in: 0,
                    bytes_out: 0,
                },
            );
        });
    }

    /// A connection was refused or dropped before authenticating.
    pub fn refused(&self, reason: &str) {
        self.update(|l| *l.totals.refused_connections.entry(reason.into()).or_default() += 1);
    }

    /// Connections open now, and how many have not authenticated.
    pub fn connections(&self, open: usize, unauthenticated: usize) {
        self.update(|l| {
            l.totals.open_connections = open as u64;
            l.totals.unauthenticated_connections = unauthenticated as u64;
        });
    }

    /// A client proved the key named `key`.
    pub fn authenticated(&self, id: u64, key: &str) {
        self.update(|l| {
            if let Some(c) = l.clients.get_mut(&id) {
                c.identity = key.into();
            }
            l.totals.by_key.entry(key.into()).or_default().sessions += 1;
        });
    }

    /// Wire counters of a connection, and the progress of its transfer.
    pub fn progress(&self, id: u64, sent: u64, received: u64, done: Option<u64>) {
        self.update(|l| {
            if let Some(c) = l.clients.get_mut(&id) {
                l.totals.wire_out += sent.saturating_sub(c.bytes_out);
                l.totals.wire_in += received.saturating_sub(c.bytes_in);
                c.bytes_out = sent;
                c.bytes_in = received;
            }
            if let (Some(a), Some(done)) = (l.active.get_mut(&id), done) {
                a.done = done;
                let secs = a.started.elapsed().as_secs_f64();
                let wire = (sent + received).saturating_sub(a.wire_at_start);
                a.rate = if secs > 0.0 { wire as f64 / secs } else { 0.0 };
                let file_rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
                a.eta = (file_rate > 0.0).then(|| a.total.saturating_sub(done) as f64 / file_rate);
            }
        });
    }

    /// Connection `id` listed directory `dir`: it syncs a tree (shown as
    /// one operation from its first listing).
    pub fn tree_listed(&self, id: u64, dir: &str, wire_now: u64) {
        self.update(|l| {
            let key = l.key_of(id);
            l.trees.entry(id).or_insert_with(|| TreeRow {
                client: id,
                key,
                root: dir.into(),
                since: unix_now(),
                files: 0,
                file_bytes: 0,
                wire_bytes: 0,
                last: VecDeque::new(),
                running: true,
                wire_at_start: wire_now,
            });
        });
    }

    /// A file of connection `id`'s tree sync: `what` happened to it.
    pub fn tree_file(&self, id: u64, name: &str, what: &str, size: u64) {
        self.update(|l| note_tree_file(l, id, name, what, size));
    }

    /// A transfer began.
    pub fn started(&self, id: u64, name: &str, upload: bool, size: u64, delta: bool, wire_now: u64) {
        self.update(|l| {
            let key = l.key_of(id);
            l.active.insert(
                id,
                ActiveRow {
                    client: id,
                    key,
                    name: name.into(),
                    direction: if upload { "upload" } else { "download" }.into(),
                    mode: if delta { "delta" } else { "full" }.into(),
                    done: 0,
                    total: size,
                    rate: 0.0,
                    eta: None,
                    started: Instant::now(),
                    wire_at_start: wire_now,
                },
            );
        });
    }

    /// A transfer ended; `result` is "written", "unchanged" or "integrity";
    /// `(literal, reused)` its file bytes sent and reused; `wire_now` the
    /// connection's bytes so far, and `own_wire` what the transfer's own
    /// frames took if they came between others' (see
    /// `deltasync_core::conn::server::Event::Finished`).
    #[allow(clippy::too_many_arguments)]
    pub fn finished(
        &self,
        id: u64,
        name: &str,
        upload: bool,
        size: u64,
        result: &str,
        (literal, reused): (u64, u64),
        wire_now: u64,
        own_wire: Option<u64>,
    ) {
        self.update(|l| {
            let (wire, duration_ms) = l.active.remove(&id).map_or((0, 0), |a| {
                (wire_now.saturating_sub(a.wire_at_start), a.started.elapsed().as_millis() as u64)
            });
            let wire = own_wire.unwrap_or(wire);
            let direction = if upload { "upload" } else { "download" };
            let key = l.key_of(id);
            let k = l.totals.by_key.entry(key.clone()).or_default();
            k.transfers += 1;
            k.wire_bytes += wire;
            k.file_bytes += size;
            let t = &mut l.totals;
            t.transfer_wire += wire;
            t.full_bytes += size;
            t.reused_bytes += reused;
            t.literal_bytes += literal;
            t.duration_seconds += duration_ms as f64 / 1000.0;
            *t.transfers.entry(format!("{direction}/{result}")).or_default() += 1;
            t.saving =
                if t.full_bytes > 0 { 1.0 - t.transfer_wire as f64 / t.full_bytes as f64 } else { 0.0 };
            let saving = if size > 0 { 1.0 - wire as f64 / size as f64 } else { 0.0 };
            note_tree_file(l, id, name, result, size);
            if let Some(t) = l.trees.get_mut(&id) {
                t.wire_bytes = wire_now.saturating_sub(t.wire_at_start);
            }
            push_recent(
                &mut l.recent,
                RecentRow {
                    at: unix_now(),
                    client: id,
                    key,
                    name: name.into(),
                    direction: direction.into(),
                    result: result.into(),
                    wire_bytes: wire,
                    file_bytes: size,
                    saving,
                    duration_ms,
                },
            );
        });
    }

    /// Something went wrong on a connection.
    pub fn error(&self, id: u64, name: &str, problem: Problem<'_>) {
        self.update(|l| {
            l.active.remove(&id);
            let key = l.key_of(id);
            let result = match problem {
                Problem::AuthFailed => {
                    l.totals.auth_failures += 1;
                    "auth_failed".to_string()
                }
                Problem::Refused(why) => {
                    l.totals.refused += 1;
                    if !key.is_empty() {
                        l.totals.by_key.entry(key.clone()).or_default().refused += 1;
                    }
                    format!("refused: {why}")
                }
                Problem::Connection(why) => {
                    l.totals.connection_errors += 1;
                    format!("connection: {why}")
                }
            };
            let row = RecentRow {
                at: unix_now(),
                client: id,
                key,
                name: name.into(),
                direction: "error".into(),
                result,
                wire_bytes: 0,
                file_bytes: 0,
                saving: 0.0,
                duration_ms: 0,
            };
            push_recent(&mut l.recent, row);
        });
    }

    /// A client disconnected.
    pub fn closed(&self, id: u64) {
        self.update(|l| {
            l.clients.remove(&id);
            l.active.remove(&id);
            if let Some(mut t) = l.trees.remove(&id) {
                t.running = false;
                if l.done_trees.len() == TREES {
                    l.done_trees.pop_back();
                }
                l.done_trees.push_front(t);
            }
        });
    }

    /// Adds a chart point (the dashboard calls this every second).
    fn sample(&self, interval: Duration) {
        self.update(|l| {
            let wire = l.totals.wire_in + l.totals.wire_out;
            let rate = (wire - l.last_sample_wire) as f64 / interval.as_secs_f64();
            l.last_sample_wire = wire;
            if l.series.len() == POINTS {
                l.series.pop_front();
            }
            l.series.push_back(Point { t: unix_now(), rate, saving: l.totals.saving * 100.0 });
        });
    }

    fn snapshot(&self) -> serde_json::Value {
        let l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "clients": l.clients.values().collect::<Vec<_>>(),
            "active": l.active.values().collect::<Vec<_>>(),
            "recent": l.recent,
            "trees": l.trees.values().chain(l.done_trees.iter()).collect::<Vec<_>>(),
            "totals": l.totals,
            "series": l.series,
        })
    }

    fn totals(&self) -> (Totals, usize, usize) {
        let l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        (l.totals.clone(), l.clients.len(), l.active.len())
    }

    async fn files(&self) -> Vec<FileRow> {
        let lister = self.files.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match lister {
            Some(f) => tokio::task::spawn_blocking(move || f()).await.unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

/// Counts a file in connection `id`'s tree sync, if it has one.
fn note_tree_file(l: &mut Live, id: u64, name: &str, what: &str, size: u64) {
    if let Some(t) = l.trees.get_mut(&id) {
        t.files += 1;
        t.file_bytes += size;
        if t.last.len() == TREE_LAST {
            t.last.pop_back();
        }
        t.last.push_front(format!("{name} ({what})"));
    }
}

fn push_recent(q: &mut VecDeque<RecentRow>, r: RecentRow) {
    if q.len() == RECENT {
        q.pop_back();
    }
    q.push_front(r);
}

/// Checks a presented dashboard credential (a key string): the name of the
/// key if it is one with the dashboard permission.
pub type Login = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How the dashboard is reached, which decides how it protects itself.
#[derive(Clone, Debug)]
pub struct Access {
    /// Bound to a loopback address: no login, but the `Host` header must
    /// name a loopback host (no DNS rebinding).
    pub loopback: bool,
    /// Served over TLS: the login cookie is `Secure`.
    pub tls: bool,
    /// Live event streams served at once; more are answered 503.
    pub max_streams: usize,
}

impl Default for Access {
    fn default() -> Self {
        Access { loopback: false, tls: false, max_streams: MAX_STREAMS }
    }
}

#[derive(Clone)]
struct App {
    hub: Arc<Hub>,
    login: Login,
    access: Access,
    /// Event streams open now.
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// Event streams served at once unless told otherwise.
pub const MAX_STREAMS: usize = 64;

/// Cookie that carries the dashboard login.
const COOKIE: &str = "deltasync_dashboard";

/// Headers on every response: no framing, no sniffing, scripts and styles
/// from the dashboard itself only.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// Builds the dashboard's routes. Off loopback every request must carry a
/// key with the dashboard permission (`Authorization: Bearer KEY`, a `key`
/// query parameter, which also sets a cookie, or that cookie); on loopback
/// the `Host` header must be a loopback name.
pub fn router(hub: Arc<Hub>, login: Login, access: Access) -> Router {
    let app = App { hub, login, access, streams: Arc::default() };
    let timed = Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::app_js))
        .route("/style.css", get(page::style))
        .route("/chart.js", get(page::chart_js))
        .route("/api/stats", get(api_stats))
        .route("/api/transfers", get(api_transfers))
        .route("/api/files", get(api_files))
        .route("/metrics", get(metrics::metrics))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ));
    Router::new()
        .route("/events", get(events))
        .merge(timed)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Whether `host` (a `Host` header) names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host
            .rsplit_once(':')
            .map_or(host, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { host }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let mut resp = authorize(&app, req, next).await;
    let h = resp.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(name, header::HeaderValue::from_static(value));
    }
    resp
}

async fn authorize(app: &App, req: Request, next: Next) -> Response {
    if app.access.loopback {
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !is_loopback_host(host) {
            return (StatusCode::MISDIRECTED_REQUEST, "this dashboard answers to localhost only")
                .into_response();
        }
        return next.run(req).await;
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let cookie = cookie_key(headers);
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key=")))
        .map(str::to_string);
    let valid = |k: &Option<String>| k.as_deref().and_then(|k| (app.login)(k)).is_some();
    // A login in the query wins over an old cookie (which may be revoked),
    // and is the only one that sets the cookie.
    let from_query = valid(&query);
    if !(from_query || valid(&bearer) || valid(&cookie)) {
        return (
            StatusCode::UNAUTHORIZED,
            "this dashboard needs a key with the dashboard permission \
             (deltasync-server key add NAME --dashboard-only): open /?key=...",
        )
            .into_response();
    }
    let mut resp = next.run(req).await;
    if let (true, Some(k)) = (from_query, query) {
        let secure = if app.access.tls { "; Secure" } else { "" };
        let c = format!("{COOKIE}={k}; HttpOnly; SameSite=Strict; Path=/{secure}");
        if let Ok(v) = c.parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

fn cookie_key(h: &HeaderMap) -> Option<String> {
    let prefix = format!("{COOKIE}=");
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(prefix.as_str()).map(str::to_string))
}

async fn api_stats(State(app): State<App>) -> impl IntoResponse {
    let (totals, clients, active) = app.hub.totals();
    axum::Json(
        serde_json::json!({ "totals": totals, "connected_clients": clients, "active_transfers": active }),
    )
}

async fn api_transfers(State(app): State<App>) -> impl IntoResponse {
    let s = app.hub.snapshot();
    axum::Json(serde_json::json!({ "active": s["active"], "recent": s["recent"], "trees": s["trees"] }))
}

async fn api_files(State(app): State<App>) -> impl IntoResponse {
    axum::Json(app.hub.files().await)
}

/// Counts an open event stream; dropping it closes the count.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn events(State(app): State<App>) -> Response {
    use std::sync::atomic::Ordering;
    if app.streams.fetch_add(1, Ordering::SeqCst) >= app.access.max_streams {
        app.streams.fetch_sub(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many live dashboards open; try again later")
            .into_response();
    }
    let slot = StreamSlot(app.streams.clone());
    let rx = app.hub.changed.subscribe();
    let stream = futures_util::stream::unfold(
        (app.hub, rx, true, Instant::now(), slot),
        |(hub, mut rx, first, mut files_at, slot)| async move {
            if !first {
                // Throttle: however fast the hub changes, at most one update per tick.
                tokio::time::sleep(UPDATE_EVERY).await;
                if rx.changed().await.is_err() {
                    return None;
                }
            }
            rx.borrow_and_update();
            let mut snap = hub.snapshot();
            // Files change rarely and listing them touches the disk: every 2 s.
            if first || files_at.elapsed() > Duration::from_secs(2) {
                files_at = Instant::now();
                snap["files"] = serde_json::to_value(hub.files().await).unwrap_or_default();
            }
            let ev = Event::default().data(snap.to_string());
            Some((Ok::<_, Infallible>(ev), (hub, rx, false, files_at, slot)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// A certificate chain and its private key, both PEM files.
#[derive(Clone, Debug)]
pub struct Tls {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

/// Serves the dashboard on `listener` until `shutdown` (over TLS with
/// `tls`, at most `max_streams` live event streams at once), and samples
/// the charts every second. A login (see [`Login`]) is
/// required unless the address is loopback.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    login: Login,
    tls: Option<Tls>,
    max_streams: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let loopback = listener.local_addr()?.ip().is_loopback();
    let sampler = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                hub.sample(Duration::from_secs(1));
            }
        })
    };
    let app = router(hub, login, Access { loopback, tls: tls.is_some(), max_streams });
    let r = match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(tls) => serve_tls(listener, app, &tls, shutdown).await,
    };
    sampler.abort();
    r
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: &Tls,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(std::io::Error::other)?;
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let std_listener = listener.into_std()?;
    axum_server::from_tcp_rustls(std_listener, config).handle(handle).serve(app.into_make_service()).await
}

fn load_certs(path: &std::path::Path) -> std::io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

fn load_key(path: &std::path::Path) -> std::io::Result<rustls::pki_types::PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_savings_follow_transfers() {
        let hub = Hub::new();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        hub.connected(1, addr);
        hub.authenticated(1, "laptop");
        hub.started(1, "f", true, 1000, true, 0);
        hub.progress(1, 50, 100, Some(500));
        hub.finished(1, "f", true, 1000, "written", (90, 910), 150, None);
        hub.error(1, "../x", Problem::Refused("file name refused"));
        hub.error(2, "", Problem::AuthFailed);
        hub.error(3, "", Problem::Connection("reset"));
        let (t, clients, active) = hub.totals();
        assert_eq!((clients, active), (1, 0));
        assert_eq!(t.transfer_wire, 150);
        assert_eq!(t.full_bytes, 1000);
        assert!((t.saving - 0.85).abs() < 1e-9);
        assert_eq!(t.transfers.get("upload/written"), Some(&1));
        assert_eq!((t.auth_failures, t.refused, t.connection_errors), (1, 1, 1));
        let s = hub.snapshot();
        assert_eq!(s["recent"].as_array().unwrap().len(), 4);
        assert_eq!(s["recent"][0]["result"], "connection: reset");
        assert_eq!(s["recent"][1]["result"], "auth_failed");
        assert_eq!(s["recent"][3]["key"], "laptop");
        let k = &t.by_key["laptop"];
        assert_eq!((k.sessions, k.transfers, k.wire_bytes, k.file_bytes, k.refused), (1, 1, 150, 1000, 1));
        hub.closed(1);
        assert_eq!(hub.totals().1, 0);
    }

    async fn request(app: Router, uri: &str, auth: Option<&str>, host: &str) -> axum::response::Response {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().uri(uri).header(header::HOST, host);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        app.oneshot(req.body(axum::body::Body::empty()).unwrap()).await.unwrap()
    }

    async fn status(app: Router, uri: &str, auth: Option<&str>) -> (StatusCode, Option<String>) {
        let resp = request(app, uri, auth, "dash.example:8000").await;
        let cookie = resp.headers().get(header::SET_COOKIE).map(|v| v.to_str().unwrap().to_string());
        (resp.status(), cookie)
    }

    fn only(secret: &'static str) -> Login {
        Arc::new(move |k: &str| (k == secret).then(|| "dash".to_string()))
    }

    #[tokio::test]
    async fn live_streams_are_capped_and_a_closed_one_frees_its_place() {
        let access = Access { loopback: true, tls: false, max_streams: 2 };
        let app = router(Hub::new(), only("unused"), access);
        let first = request(app.clone(), "/events", None, "127.0.0.1").await;
        let second = request(app.clone(), "/events", None, "127.0.0.1").await;
        assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
        let third = request(app.clone(), "/events", None, "127.0.0.1").await;
        assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The API still answers.
        assert_eq!(request(app.clone(), "/api/stats", None, "127.0.0.1").await.status(), StatusCode::OK);
        drop(first);
        assert_eq!(request(app.clone(), "/events", None, "127.0.0.1").await.status(), StatusCode::OK);
        drop(second);
    }

    #[tokio::test]
    async fn a_dashboard_key_is_required_off_loopback() {
        let app = router(
            Hub::new(),
            only("dsk1-good"),
            Access { loopback: false, tls: false, ..Access::default() },
        );
        assert_eq!(status(app.clone(), "/api/stats", None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(status(app.clone(), "/metrics", Some("Bearer wrong")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(status(app.clone(), "/?key=wrong", None).await.0, StatusCode::UNAUTHORIZED);
        // The old token parameter is no login.
        assert_eq!(status(app.clone(), "/?token=dsk1-good", None).await.0, StatusCode::UNAUTHORIZED);
        // A bad query value beside a good bearer sets no cookie.
        let (code, cookie) = status(app.clone(), "/?key=forged", Some("Bearer dsk1-good")).await;
        assert_eq!((code, cookie), (StatusCode::OK, None));
        assert_eq!(status(app.clone(), "/metrics", Some("Bearer dsk1-good")).await.0, StatusCode::OK);
        let (code, cookie) = status(app.clone(), "/?key=dsk1-good", None).await;
        assert_eq!(code, StatusCode::OK);
        let cookie = cookie.unwrap();
        assert!(cookie.starts_with("deltasync_dashboard=dsk1-good; HttpOnly; SameSite=Strict"), "{cookie}");
        assert!(!cookie.contains("Secure"), "plain HTTP cannot keep a Secure cookie");
        // Only embedded assets exist: no path reaches the file system.
        assert_eq!(
            status(app.clone(), "/../Cargo.toml", Some("Bearer dsk1-good")).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(status(app, "/web/index.html", Some("Bearer dsk1-good")).await.0, StatusCode::NOT_FOUND);
        // Over TLS the cookie is Secure.
        let tls =
            router(Hub::new(), only("dsk1-good"), Access { loopback: false, tls: true, ..Access::default() });
        let (_, cookie) = status(tls, "/?key=dsk1-good", None).await;
        assert!(cookie.unwrap().ends_with("; Secure"));
    }

    #[tokio::test]
    async fn on_loopback_only_loopback_host_names_are_answered() {
        let app =
            router(Hub::new(), only("unused"), Access { loopback: true, tls: false, ..Access::default() });
        for host in ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"] {
            assert_eq!(
                request(app.clone(), "/api/stats", None, host).await.status(),
                StatusCode::OK,
                "{host}"
            );
        }
        // A DNS-rebinding page reaches 127.0.0.1 under its own name.
        for host in ["evil.example:8000", "evil.example", "127.0.0.1.evil.example", ""] {
            let code = request(app.clone(), "/api/stats", None, host).await.status();
            assert_eq!(code, StatusCode::MISDIRECTED_REQUEST, "{host}");
        }
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers() {
        let app = router(Hub::new(), only("k"), Access { loopback: true, tls: false, ..Access::default() });
        for (uri, host) in
            [("/", "localhost"), ("/app.js", "localhost"), ("/nope", "localhost"), ("/", "evil")]
        {
            let resp = request(app.clone(), uri, None, host).await;
            let h = resp.headers();
            assert_eq!(h["x-frame-options"], "DENY", "{uri}");
            assert_eq!(h["x-content-type-options"], "nosniff");
            let csp = h["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
        }
    }
}
