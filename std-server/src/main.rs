//! `deltasync-server`: stores files under a root and syncs them with deltas.

use anyhow::Context;
use clap::Parser;
use deltasync_dashboard::Hub;
use deltasync_server::live::LiveObserver;
use deltasync_server::serve::{LogOnly, Observer, Server, serve};
use deltasync_server::store::FsStore;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    /// Directory where files are stored.
    #[arg(long, env = "DELTASYNC_ROOT", default_value = "files")]
    root: PathBuf,
    /// Pre-shared token clients must prove. Without it, the token is read
    /// from the token file, which is created with a random token if missing.
    #[arg(long, env = "DELTASYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Token file [default: $XDG_CONFIG_HOME/deltasync/token or ~/.config/deltasync/token].
    #[arg(long, env = "DELTASYNC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Address of the live web dashboard, or "off". Off loopback it asks
    /// for the token.
    #[arg(long, env = "DELTASYNC_DASHBOARD", default_value = "127.0.0.1:8000")]
    dashboard: String,
}

/// Reads the token file, or creates it (owner-only) with a random token.
fn token_from_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        anyhow::ensure!(!t.is_empty(), "token file {} is empty", path.display());
        return Ok(t);
    }
    let dir = path.parent().context("token file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let token: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating token file {}", path.display()))?;
    writeln!(f, "{token}")?;
    println!("created a new token in {}", path.display());
    Ok(token)
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

fn main() -> anyhow::Result<()> {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let token = match args.token {
        Some(t) if !t.is_empty() => t,
        _ => {
            let path = args
                .token_file
                .or_else(deltasync_core::local::default_token_path)
                .context("no token given and no HOME for a token file")?;
            let t = token_from_file(&path)?;
            println!("token file: {}", path.display());
            t
        }
    };
    let store = FsStore::open(&args.root).with_context(|| format!("opening {}", args.root.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "deltasync-server listening on {}, storing in {}",
        listener.local_addr()?,
        store.root().display()
    );
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
        let dl = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("dashboard on {addr}"))?;
        println!("dashboard on http://{}/", dl.local_addr()?);
        let hub = Hub::new();
        tokio::spawn(deltasync_dashboard::serve(dl, hub.clone(), token.clone(), stopped()));
        Arc::new(LiveObserver::new(hub, store.clone()))
    };
    let indexes = store.clone();
    let server = Arc::new(Server::new(store, token.into_bytes(), observer));
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let served = serve(listener, server, stopped(), Duration::from_secs(10)).await;
    // Indexes of the last uploads may still be being written.
    tokio::task::spawn_blocking(move || indexes.wait_indexing()).await?;
    served?;
    println!("deltasync-server stopped");
    Ok(())
}
