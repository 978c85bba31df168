//! `deltasync-server`: stores files under a root and syncs them with deltas.

use anyhow::Context;
use clap::{Parser, Subcommand};
use deltasync_dashboard::Hub;
use deltasync_server::keys::{self, KeyEntry, KeyRing};
use deltasync_server::live::LiveObserver;
use deltasync_server::objstore::{ObjConfig, ObjStore};
use deltasync_server::serve::{Limits, LogOnly, Observer, Server, serve};
use deltasync_server::store::{FsStore, PartialLimits, ServerStore};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// deltasync server: stores files and syncs them with delta transfers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "DELTASYNC_LISTEN", default_value = "127.0.0.1:5001")]
    listen: SocketAddr,
    /// Directory where files are stored (as `--store file://DIR`).
    #[arg(long, env = "DELTASYNC_ROOT", default_value = "files", conflicts_with = "store")]
    root: PathBuf,
    /// Where files are stored: `file://DIR`, or `s3://BUCKET/PREFIX` in an
    /// S3-compatible object store that several servers may share
    /// (credentials and region from the usual `AWS_*` variables)
    /// [default: file://files, or --root].
    #[arg(long, env = "DELTASYNC_STORE", value_name = "URL")]
    store: Option<String>,
    /// The S3 endpoint, for a server other than AWS (`http://` only on
    /// loopback, unless --s3-allow-http).
    #[arg(long, env = "DELTASYNC_S3_ENDPOINT", value_name = "URL", global = true)]
    s3_endpoint: Option<String>,
    /// Allows a plain `http://` S3 endpoint off loopback: anyone on the
    /// path could then read the stored files and change what the server
    /// reads back. Only on a network you trust.
    #[arg(long, env = "DELTASYNC_S3_ALLOW_HTTP", global = true)]
    s3_allow_http: bool,
    /// An object store's garbage (replaced versions, uploads never
    /// published) is kept this long before it is collected. Uploads must
    /// finish within half of it. Every instance on one store must use the
    /// same value.
    #[arg(long, env = "DELTASYNC_GC_GRACE", default_value_t = 86_400, value_name = "SECS", global = true,
          value_parser = clap::value_parser!(u64).range(2..))]
    gc_grace: u64,
    /// Seconds between upkeep runs: interrupted uploads expire, and with an
    /// object store, garbage is collected (one instance at a time).
    #[arg(long, env = "DELTASYNC_GC_INTERVAL", default_value_t = 3600, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    gc_interval: u64,
    /// Key file: one entry per client or device, with its secret and
    /// permissions; re-read when it changes. Created with one full-access
    /// key if missing [default: $XDG_CONFIG_HOME/deltasync/server-keys.toml
    /// or ~/.config/deltasync/server-keys.toml].
    #[arg(long, env = "DELTASYNC_KEYS", global = true)]
    keys: Option<PathBuf>,
    /// Address of the live web dashboard, or "off". Off loopback it asks
    /// for a key with the dashboard permission.
    #[arg(long, env = "DELTASYNC_DASHBOARD", default_value = "127.0.0.1:8000")]
    dashboard: String,
    /// Serve the dashboard over TLS with this certificate chain (PEM).
    #[arg(long, env = "DELTASYNC_DASHBOARD_TLS_CERT", requires = "dashboard_tls_key")]
    dashboard_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --dashboard-tls-cert.
    #[arg(long, env = "DELTASYNC_DASHBOARD_TLS_KEY", requires = "dashboard_tls_cert")]
    dashboard_tls_key: Option<PathBuf>,
    /// Live event streams the dashboard serves at once (more are answered
    /// 503).
    #[arg(long, env = "DELTASYNC_DASHBOARD_MAX_STREAMS", default_value_t = 64, value_name = "N")]
    dashboard_max_streams: usize,
    /// Connections open at once. When full, the oldest connection that has
    /// not proved a key yet is dropped to make room; if all have, new ones
    /// are refused. The server raises its open-file limit to fit.
    #[arg(long, env = "DELTASYNC_MAX_CONNECTIONS", default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Connections that have not proved a key yet, open at once from one
    /// IPv4 address or IPv6 /64 (authenticated ones count only against
    /// --max-connections).
    #[arg(long, env = "DELTASYNC_MAX_PER_ADDRESS", default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_per_address: u32,
    /// Seconds from the accept (after any --slow-delay) within which a
    /// client must prove its key (bytes trickling in do not extend it).
    #[arg(long, env = "DELTASYNC_HANDSHAKE_TIMEOUT", default_value_t = 10, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout: u64,
    /// Seconds an authenticated client may stay silent between requests
    /// (and the longest a write to a client may go without progress).
    #[arg(long, env = "DELTASYNC_IDLE_TIMEOUT", default_value_t = 300, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout: u64,
    /// Connection steps (storage work, hashing) running at once, on
    /// their own threads.
    #[arg(long, env = "DELTASYNC_WORKERS", default_value_t = 32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: u32,
    /// Failed handshakes (wrong key, garbage, no key in time, evicted
    /// before proving one) from one address, within a minute of the first,
    /// after which its new connections wait --slow-delay before being
    /// served (0: never).
    #[arg(long, env = "DELTASYNC_SLOW_AFTER", default_value_t = 5, value_name = "N")]
    slow_after: u32,
    /// Seconds such a connection waits.
    #[arg(long, env = "DELTASYNC_SLOW_DELAY", default_value_t = 2, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=60))]
    slow_delay: u64,
    /// Failed handshakes from one address, within a minute of the first,
    /// after which it is refused for --ban-time (0: never).
    #[arg(long, env = "DELTASYNC_BAN_AFTER", default_value_t = 20, value_name = "N")]
    ban_after: u32,
    /// Seconds an interrupted upload is kept for resuming (since its last
    /// byte arrived).
    #[arg(long, env = "DELTASYNC_PARTIAL_MAX_AGE", default_value_t = 86_400, value_name = "SECS")]
    partial_max_age: u64,
    /// Bytes of interrupted uploads kept at most, all together; the oldest
    /// go first.
    #[arg(long, env = "DELTASYNC_MAX_PARTIAL_BYTES", default_value_t = 8 << 30, value_name = "BYTES")]
    max_partial_bytes: u64,
    /// Seconds a banned address is refused.
    #[arg(long, env = "DELTASYNC_BAN_TIME", default_value_t = 300, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    ban_time: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the clients' keys (changes apply to new connections at once).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Collects an object store's garbage once (servers on it do so every
    /// --gc-interval) and prints what it found and removed, as JSON.
    Gc,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Adds a key and prints its secret, once, as one string to give the
    /// client (`deltasync --key`, `DELTASYNC_KEY`, or its key file).
    Add {
        /// A unique name (it appears in logs, the dashboard and metrics).
        name: String,
        /// Limits the key to names under this directory (repeatable).
        #[arg(long = "prefix", value_name = "P")]
        prefixes: Vec<String>,
        /// List, stat and download only.
        #[arg(long, conflicts_with_all = ["write_only", "dashboard_only"])]
        read_only: bool,
        /// Upload (and stat) only: for devices that push.
        #[arg(long, conflicts_with = "dashboard_only")]
        write_only: bool,
        /// A login for the web dashboard only (no file access).
        #[arg(long)]
        dashboard_only: bool,
    },
    /// Lists the keys: name, id, permissions, prefixes (never secrets).
    List,
    /// Removes a key; its clients are refused from their next connection.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// The key file to use, and whether it is the default one.
fn keys_path(given: Option<PathBuf>) -> anyhow::Result<(PathBuf, bool)> {
    match given {
        Some(p) => Ok((p, false)),
        None => deltasync_host::local::default_keys_path()
            .map(|p| (p, true))
            .context("no --keys given and no HOME for the default key file"),
    }
}

fn key_command(path: &Path, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Add { name, prefixes, read_only, write_only, dashboard_only } => {
            let mut e = KeyEntry::generate(&name);
            e.prefixes = prefixes;
            e.write = !read_only && !dashboard_only;
            e.delete = !read_only && !write_only && !dashboard_only;
            e.read = !write_only && !dashboard_only;
            e.dashboard = dashboard_only;
            keys::private_dir(path);
            keys::add(path, e.clone())?;
            eprintln!("added key {name:?} to {}; its secret (shown once):", path.display());
            println!("{}", e.client_key()?.encode());
        }
        KeyCommand::List => {
            for k in keys::load(path)? {
                println!("{}", k.describe());
            }
        }
        KeyCommand::Revoke { name } => {
            keys::revoke(path, &name)?;
            eprintln!("revoked key {name:?}: new connections with it are refused");
        }
    }
    Ok(())
}

/// A fresh server's key file (at the default path only): one new
/// full-access key, `owner`, written for clients on this machine to the
/// client key file, or beside the key file if a client key (perhaps from
/// another server) is there already.
fn first_keys(path: &Path) -> anyhow::Result<()> {
    let entry = KeyEntry::generate("owner");
    let key = entry.client_key()?;
    keys::private_dir(path);
    keys::add(path, entry)?;
    println!("created key file {} with one full-access key, \"owner\"", path.display());
    let client_file = deltasync_host::local::default_key_path().filter(|p| !p.exists());
    let (target, note) = match client_file {
        Some(p) => (p, "clients on this machine use it"),
        None => (
            path.with_file_name("owner.key"),
            "a client key file exists already: pass --key-file to use this one",
        ),
    };
    keys::private_dir(&target);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    writeln!(f, "{}", key.encode())?;
    println!("wrote its client key to {} ({note})", target.display());
    Ok(())
}

/// Keeps the peak memory flat over many transfers. Each upload hashes on
/// short-lived threads that build megabyte-sized trees; with glibc's default
/// (a heap per thread, and an mmap threshold that grows after every large
/// free) those blocks end up in heaps that never shrink, and the peak RSS
/// creeps up run after run. A fixed threshold returns large blocks to the
/// system on free, and two heaps are plenty for this workload.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// File descriptors the server needs besides its connections (storage,
/// key file, dashboard, logs).
const SPARE_FILES: u64 = 256;

/// Raises the open-file limit to fit `connections`, as far as the hard
/// limit allows, and says so when that is not enough.
fn raise_file_limit(connections: u64) {
    let want = connections + SPARE_FILES;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got >= want => tracing::debug!(limit = got, "open-file limit"),
        Ok(got) => tracing::warn!(
            limit = got,
            "the open-file limit (hard limit {got}) holds about {} connections, fewer than --max-connections              {connections}: raise it (systemd LimitNOFILE=, ulimit -Hn)",
            got.saturating_sub(SPARE_FILES)
        ),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    // Connection steps run on their own pool (--workers).
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

/// Runs the dashboard on its own thread and runtime: it never waits behind
/// the connections' work, however many there are.
fn spawn_dashboard(
    listener: std::net::TcpListener,
    hub: Arc<Hub>,
    login: deltasync_dashboard::Login,
    tls: Option<deltasync_dashboard::Tls>,
    max_streams: usize,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("dashboard".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("dashboard")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return tracing::error!(error = %e, "dashboard runtime failed to start"),
        };
        let served = rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            deltasync_dashboard::serve(listener, hub, login, tls, max_streams, stopped).await
        });
        if let Err(e) = served {
            tracing::error!(error = %e, "dashboard stopped");
        }
    })?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    let (keys_file, default) = keys_path(args.keys.clone())?;
    match args.command.take() {
        Some(Command::Key(cmd)) => return key_command(&keys_file, cmd),
        Some(Command::Gc) => {
            let url = args.store.as_deref().filter(|u| u.starts_with("s3://"));
            let url =
                url.context("gc collects an object store's garbage: give --store s3://BUCKET/PREFIX")?;
            let store = open_object_store(url, &args, PartialLimits::default()).await?;
            let report = store.gc().await.map_err(|e| anyhow::anyhow!("collecting garbage: {e}"))?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        None => {}
    }
    if !keys_file.exists() {
        // A key file named explicitly and missing is a mistake (a typo, a
        // volume not mounted), not a fresh server.
        anyhow::ensure!(
            default,
            "key file {} does not exist: create it with `deltasync-server --keys {} key add NAME`",
            keys_file.display(),
            keys_file.display()
        );
        first_keys(&keys_file)?;
    }
    // Before anything is announced: a SIGTERM from then on (systemd's
    // stop) is a graceful shutdown, never the default kill.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    raise_file_limit(u64::from(args.max_connections));
    let limits = Limits {
        max_connections: args.max_connections as usize,
        max_per_address: args.max_per_address as usize,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        workers: args.workers as usize,
        slow_after: args.slow_after,
        slow_delay: Duration::from_secs(args.slow_delay),
        ban_after: args.ban_after,
        ban_time: Duration::from_secs(args.ban_time),
        ..Limits::default()
    };
    let keyring = Arc::new(KeyRing::open(&keys_file)?);
    println!("key file: {}", keys_file.display());
    let partials = PartialLimits {
        max_age: Duration::from_secs(args.partial_max_age),
        max_bytes: args.max_partial_bytes,
    };
    match args.store.as_deref().map(|u| u.strip_prefix("file://").ok_or(u)) {
        None | Some(Ok(_)) => {
            let root = match args.store.as_deref().and_then(|u| u.strip_prefix("file://")) {
                Some(dir) => PathBuf::from(dir),
                None => args.root.clone(),
            };
            let store =
                FsStore::open_with(&root, partials).with_context(|| format!("opening {}", root.display()))?;
            run_with(store, args, keyring, limits, term).await?;
        }
        Some(Err(url)) => {
            let store = open_object_store(url, &args, partials).await?;
            run_with(store, args, keyring, limits, term).await?;
        }
    }
    println!("deltasync-server stopped");
    Ok(())
}

/// The object store at `url` (`s3://BUCKET/PREFIX`), checked reachable.
async fn open_object_store(url: &str, args: &Args, partials: PartialLimits) -> anyhow::Result<ObjStore> {
    // HTTPS to the store through rustls with ring, the provider the
    // dashboard's TLS uses (no second crypto library to build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let endpoint = args.s3_endpoint.as_deref();
    // Whether an endpoint's host is this machine.
    fn on_loopback(url: &str) -> bool {
        let Some(host) = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)) else {
            return false;
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().map_or(host == "localhost", |ip| ip.is_loopback())
    }
    let rest = url.strip_prefix("s3://").context("--store takes file://DIR or s3://BUCKET/PREFIX")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "--store s3://BUCKET/PREFIX: no bucket in {url}");
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = endpoint {
        let plain = e.starts_with("http://");
        anyhow::ensure!(
            !plain || args.s3_allow_http || on_loopback(e),
            "--s3-endpoint {e}: plain HTTP off loopback would let anyone on the path read the stored \
             files and change what the server reads back; use https://, or add --s3-allow-http on a \
             network you trust"
        );
        builder = builder.with_endpoint(e).with_allow_http(plain);
    }
    let os = builder.build().with_context(|| format!("configuring {url}"))?;
    let config = ObjConfig {
        prefix: prefix.to_string(),
        label: url.to_string(),
        partials,
        grace: Duration::from_secs(args.gc_grace),
    };
    let store = ObjStore::new(Arc::new(os), config, tokio::runtime::Handle::current());
    store.probe().await.with_context(|| format!("reaching {url}"))?;
    Ok(store)
}

/// Serves clients from `store` until a signal stops the server.
async fn run_with<S: ServerStore>(
    store: S,
    args: Args,
    keyring: Arc<KeyRing>,
    limits: Limits,
    mut term: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    {
        // Partials also expire while nothing else happens; an object
        // store's garbage is collected.
        let store = store.clone();
        let every = Duration::from_secs(args.gc_interval);
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.warm());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || s.upkeep()).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("deltasync-server listening on {}, storing in {}", listener.local_addr()?, store.location());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let observer: Arc<dyn Observer> = if args.dashboard == "off" {
        Arc::new(LogOnly)
    } else {
        let addr: SocketAddr = args.dashboard.parse().context("--dashboard takes ADDR:PORT or off")?;
        let dl = std::net::TcpListener::bind(addr).with_context(|| format!("dashboard on {addr}"))?;
        let scheme = if args.dashboard_tls_cert.is_some() { "https" } else { "http" };
        if !addr.ip().is_loopback() && args.dashboard_tls_cert.is_none() {
            tracing::warn!(
                %addr,
                "the dashboard is served off loopback without TLS: its logins cross the network in clear \
                 (--dashboard-tls-cert, --dashboard-tls-key)"
            );
        }
        println!("dashboard on {scheme}://{}/", dl.local_addr()?);
        let hub = Hub::new();
        let ring = keyring.clone();
        let login: deltasync_dashboard::Login =
            Arc::new(move |presented: &str| ring.dashboard_login(presented));
        let tls = match (args.dashboard_tls_cert, args.dashboard_tls_key) {
            (Some(cert), Some(key)) => Some(deltasync_dashboard::Tls { cert, key }),
            _ => None,
        };
        spawn_dashboard(dl, hub.clone(), login, tls, args.dashboard_max_streams, stopped())?;
        Arc::new(LiveObserver::new(hub, store.clone()))
    };
    let indexes = store.clone();
    let server = Arc::new(Server::new(store, keyring, observer, limits)?);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let served = serve(listener, server, stopped(), Duration::from_secs(10)).await;
    // Indexes of the last uploads may still be being written.
    tokio::task::spawn_blocking(move || indexes.settle()).await?;
    served?;
    Ok(())
}
