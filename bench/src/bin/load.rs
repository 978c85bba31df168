//! The server under load, on loopback, with the release server and the
//! client library in threads.
//!
//! (1) `flood`: 50 clients at once each upload their own 8 MiB file, then a
//! 4 KiB-overwrite delta of it; first on a fresh server with nothing else
//! going on, then on another fresh server holding 10,000 idle connections
//! (50 from each of 200 loopback addresses) while garbage and wrong-key
//! handshakes arrive at 500 a second from 400 other addresses. Reports p50
//! and p99 of each kind of transfer in both, their ratios, the server's
//! peak RSS and threads, its RSS per idle connection and what it refused.
//! The flood server runs with `--handshake-timeout 120` (so that the idle
//! connections stay for the whole measurement instead of being cut and
//! banned after 10 s) and `--max-connections 12000` (so that they all fit
//! beside the clients; at the default 10,000 the clients would evict some).
//!
//! (2) `many`: 1,000 clients at once, each with its own 1 MiB file: a full
//! upload, then a 4 KiB-overwrite delta. Reports the aggregate throughput
//! and the server's peak RSS and threads.
//!
//! Every stored file is compared byte for byte with what its client sent.
//!
//! `target/release/load [flood|many|both] [ROUNDS]` (ROUNDS of (1), each a
//! quiet and a flooded run; default 2).

use deltasync_bench::peak_rss_kib;
use deltasync_client::Connection;
use deltasync_core::channel::ClientKey;
use deltasync_core::sim::{hello_frame, random_bytes};
use deltasync_server::process::{ServerProcess, connect_from, http_get, proc_status};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn server_bin() -> PathBuf {
    std::env::current_exe().unwrap().with_file_name("deltasync-server")
}

/// Samples the server's RSS and thread count every 50 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak_threads: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_threads = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_threads.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(proc_status(pid, "Threads:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler { stop, peak_threads, handle: Some(handle) }
    }

    fn peak_threads(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak_threads.load(Ordering::Relaxed)
    }
}

/// Garbage and wrong-key handshakes at `rate` a second from 200 addresses
/// 127.0.`net`.x until `stop` (at most 10 minutes); returns how many
/// connections it made.
fn garbage(port: u16, rate: u64, net: u8, stop: Arc<AtomicBool>) -> u64 {
    let started = Instant::now();
    let every = Duration::from_secs(1) / rate as u32;
    let mut made = 0u64;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
        i += 1;
        let from = Ipv4Addr::new(127, 0, net, (i % 200 + 1) as u8);
        if let Ok(mut c) = connect_from(from, port) {
            made += 1;
            let bytes = if i.is_multiple_of(2) {
                // A well-formed hello with a key the server does not know.
                hello_frame(ClientKey { id: [i as u8; 8], secret: [i as u8 ^ 0x5a; 32] })
            } else {
                random_bytes(i, 64 + (i as usize % 300))
            };
            let _ = c.write_all(&bytes);
        }
        let next = started + every * i as u32;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    made
}

/// Upload times of one client: full, then delta.
type Times = (f64, f64);

/// `n` clients at once, each uploading its own `size`-byte file and then a
/// 4 KiB-overwrite delta of it; checks every stored file. Returns each
/// client's two upload times.
fn clients(
    port: u16,
    key: &ClientKey,
    dir: &Path,
    root: &Path,
    n: usize,
    size: usize,
    seed: u64,
) -> Vec<Times> {
    let server = format!("127.0.0.1:{port}");
    let start = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|c| {
            let (server, key, start) = (server.clone(), key.clone(), start.clone());
            let path = dir.join(format!("c{c}.bin"));
            let mut data = random_bytes(seed * 10_000 + c as u64, size);
            std::fs::write(&path, &data).unwrap();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let name = format!("c{c}.bin");
                    start.wait();
                    let t = Instant::now();
                    let mut conn = Connection::connect(&server, &key).expect("connect");
                    conn.set_hints_dir(None);
                    let full = conn.upload(&path, &name, |_| {}).expect("full upload");
                    let t_full = t.elapsed().as_secs_f64();
                    assert_eq!(full.literal_bytes, size as u64, "{name}: not a full upload");
                    let at = (c * 7919) % (size - 4096);
                    data[at..at + 4096].fill(0xd5);
                    std::fs::write(&path, &data).unwrap();
                    let t = Instant::now();
                    let delta = conn.upload(&path, &name, |_| {}).expect("delta upload");
                    let t_delta = t.elapsed().as_secs_f64();
                    assert!(delta.literal_bytes < size as u64 / 4, "{name}: not a delta");
                    (t_full, t_delta, data)
                })
                .unwrap()
        })
        .collect();
    let mut times = Vec::new();
    for (c, t) in threads.into_iter().enumerate() {
        let (full, delta, data) = t.join().expect("a client failed");
        let stored = std::fs::read(root.join(format!("c{c}.bin"))).unwrap();
        assert!(stored == data, "c{c}.bin: the stored file differs from the client's");
        times.push((full, delta));
    }
    times
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn start_server(root: &Path, key: &str, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--dashboard", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    ServerProcess::start(&server_bin(), root, key, &args).expect("start the server")
}

fn refusals(base: &str) -> String {
    http_get(&format!("{base}metrics"))
        .1
        .lines()
        .filter(|l| {
            l.starts_with("deltasync_connections_refused_total{")
                || l.starts_with("deltasync_auth_failures_total ")
        })
        .map(|l| l.trim_start_matches("deltasync_connections_refused_total"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn flood(work: &Path, rounds: u64) {
    const CLIENTS: usize = 50;
    const SIZE: usize = 8 << 20;
    const IDLE: usize = 10_000;
    let key_text = deltasync_bench::key();
    let key = ClientKey::parse(&key_text).unwrap();
    let mut quiet: Vec<Times> = Vec::new();
    let mut loud: Vec<Times> = Vec::new();
    for round in 0..rounds {
        for flooded in [false, true] {
            let dir = work.join(format!("r{round}-{flooded}"));
            let root = dir.join("root");
            std::fs::create_dir_all(&dir).unwrap();
            let extra: &[&str] =
                if flooded { &["--handshake-timeout", "120", "--max-connections", "12000"] } else { &[] };
            let srv = start_server(&root, &key_text, extra);
            let base = srv.dashboard.clone().unwrap();
            let pid = srv.pid();
            let sampler = Sampler::start(pid);
            let (mut idle, mut stop, mut flooder) = (Vec::new(), None, None);
            if flooded {
                let before = proc_status(pid, "VmRSS:");
                for i in 0..IDLE {
                    let from = Ipv4Addr::new(127, 0, 1 + (i / 12_000) as u8, (i / 50 % 200 + 1) as u8);
                    idle.push(connect_from(from, srv.port).expect("an idle connection"));
                }
                // Wait until the server holds them all.
                let t = Instant::now();
                while !http_get(&format!("{base}metrics"))
                    .1
                    .contains(&format!("deltasync_unauthenticated_connections {IDLE}"))
                    && t.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                let after = proc_status(pid, "VmRSS:");
                println!(
                    "round {round}: {IDLE} idle connections held; server RSS {} -> {} MiB, {} bytes per connection; threads {}",
                    before / 1024,
                    after / 1024,
                    (after.saturating_sub(before)) * 1024 / IDLE as u64,
                    proc_status(pid, "Threads:")
                );
                // Two senders of 250 a second each (one thread cannot keep
                // up with 500 connects a second here).
                let s = Arc::new(AtomicBool::new(false));
                let port = srv.port;
                let senders: Vec<_> = [2u8, 3]
                    .into_iter()
                    .map(|net| {
                        let s = s.clone();
                        std::thread::spawn(move || garbage(port, 250, net, s))
                    })
                    .collect();
                flooder = Some(senders);
                stop = Some(s);
                std::thread::sleep(Duration::from_secs(2));
            }
            let t = Instant::now();
            let times = clients(srv.port, &key, &dir, &root, CLIENTS, SIZE, round);
            let wall = t.elapsed().as_secs_f64();
            let mut garbage_made = 0;
            if let (Some(s), Some(f)) = (stop, flooder) {
                s.store(true, Ordering::Relaxed);
                garbage_made = f.into_iter().map(|t| t.join().unwrap()).sum();
            }
            let threads = sampler.peak_threads();
            let hwm = peak_rss_kib(pid);
            let still_idle = http_get(&format!("{base}metrics"))
                .1
                .lines()
                .find_map(|l| l.strip_prefix("deltasync_unauthenticated_connections ").map(str::to_string))
                .unwrap_or_default();
            println!(
                "round {round} {}: {CLIENTS} clients x (8 MiB full + 4 KiB delta) in {wall:.2} s; full p50 {:.3} s p99 {:.3} s; delta p50 {:.3} s p99 {:.3} s; server peak RSS {} MiB, peak threads {threads}{}",
                if flooded { "flood" } else { "quiet" },
                percentile(times.iter().map(|t| t.0).collect(), 0.5),
                percentile(times.iter().map(|t| t.0).collect(), 0.99),
                percentile(times.iter().map(|t| t.1).collect(), 0.5),
                percentile(times.iter().map(|t| t.1).collect(), 0.99),
                hwm / 1024,
                if flooded {
                    format!(
                        "; garbage handshakes sent {garbage_made} ({:.0}/s); idle still held {still_idle}; refused: {}",
                        garbage_made as f64 / (wall + 2.0),
                        refusals(&base)
                    )
                } else {
                    String::new()
                }
            );
            drop(idle);
            if flooded {
                loud.extend(times)
            } else {
                quiet.extend(times)
            }
            drop(srv);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let p = |v: &[Times], f: fn(&Times) -> f64, q: f64| percentile(v.iter().map(f).collect(), q);
    println!("all rounds ({} transfers of each kind per condition):", quiet.len());
    for (what, f) in
        [("full 8 MiB", (|t: &Times| t.0) as fn(&Times) -> f64), ("4 KiB delta", |t: &Times| t.1)]
    {
        println!(
            "  {what}: quiet p50 {:.3} s p99 {:.3} s; flood p50 {:.3} s p99 {:.3} s; flood/quiet p50 {:.2}, p99 {:.2}",
            p(&quiet, f, 0.5),
            p(&quiet, f, 0.99),
            p(&loud, f, 0.5),
            p(&loud, f, 0.99),
            p(&loud, f, 0.5) / p(&quiet, f, 0.5),
            p(&loud, f, 0.99) / p(&quiet, f, 0.99),
        );
    }
}

fn many(work: &Path) {
    const CLIENTS: usize = 1_000;
    const SIZE: usize = 1 << 20;
    let key_text = deltasync_bench::key();
    let key = ClientKey::parse(&key_text).unwrap();
    let dir = work.join("many");
    let root = dir.join("root");
    std::fs::create_dir_all(&dir).unwrap();
    // 1,000 connections from one address: above the default per-address
    // cap of 64, so raised here.
    let srv = start_server(&root, &key_text, &["--max-per-address", "2000"]);
    let pid = srv.pid();
    let sampler = Sampler::start(pid);
    let t = Instant::now();
    let times = clients(srv.port, &key, &dir, &root, CLIENTS, SIZE, 99);
    let wall = t.elapsed().as_secs_f64();
    let threads = sampler.peak_threads();
    let bytes = (CLIENTS * SIZE) as f64;
    println!(
        "many: {CLIENTS} clients x (1 MiB full + 4 KiB delta), all byte-exact, in {wall:.2} s: {:.1} MiB/s of files uploaded in full; \
         full p50 {:.2} s p99 {:.2} s, delta p50 {:.2} s p99 {:.2} s; server peak RSS {} MiB, peak threads {threads}",
        bytes / wall / (1 << 20) as f64,
        percentile(times.iter().map(|t| t.0).collect(), 0.5),
        percentile(times.iter().map(|t| t.0).collect(), 0.99),
        percentile(times.iter().map(|t| t.1).collect(), 0.5),
        percentile(times.iter().map(|t| t.1).collect(), 0.99),
        peak_rss_kib(pid) / 1024,
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("both");
    let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(2);
    // Thousands of sockets and a thousand threads' files.
    let limit = rlimit::increase_nofile_limit(20_000).expect("raise the open-file limit");
    assert!(limit >= 12_000, "open-file limit {limit}: run as root or raise the hard limit (ulimit -Hn)");
    let work = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("deltasync-load");
    std::fs::create_dir_all(&work).unwrap();
    if which == "flood" || which == "both" {
        flood(&work, rounds);
    }
    if which == "many" || which == "both" {
        many(&work);
    }
}
