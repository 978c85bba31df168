//! The file store against the S3 store (SeaweedFS on loopback), in one run:
//! the same uploads and downloads through two deltasync servers, one on
//! each store: wall time, bytes between client and server, and for the S3
//! store the requests and bytes between server and S3 per transfer (from
//! the server's `/metrics`). Then a copy of a large file under a new name,
//! and the S3 server's peak RSS over an upload and a download of a very
//! large file.
//!
//! `bash bench/vs-store.sh [RUNS] [BIG_MIB] [COPY_MIB] [RSS_GIB]` (starts
//! SeaweedFS, sets `DELTASYNC_BENCH_S3=http://HOST:PORT/BUCKET`, runs this).
//! `RUNS` 0: only the peak RSS; `RSS_GIB` 0: no peak RSS.

use deltasync_bench::{Edits, client, edits, key, median, peak_rss_kib, settle, timed_transfer};
use deltasync_core::sim::random_bytes;
use deltasync_server::process::ServerProcess;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

const S3_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_REGION", "us-east-1")];

/// The server's store counters from `/metrics` (`op` or `in`/`out`).
fn counters(dashboard: &str) -> HashMap<String, u64> {
    let rest = dashboard.strip_prefix("http://").unwrap();
    let host = rest.split('/').next().unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        key()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("deltasync_store_")) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let label = name.split('"').nth(1).unwrap_or("").to_string();
        out.insert(label, value.parse::<f64>().unwrap() as u64);
    }
    out
}

fn start(bin: &Path, root: &Path, store: Option<(&str, &str)>) -> ServerProcess {
    let mut args = vec!["--dashboard", "127.0.0.1:0"];
    let url;
    if let Some((endpoint, store_url)) = store {
        url = store_url.to_string();
        args.extend(["--store", &url, "--s3-endpoint", endpoint]);
    }
    ServerProcess::start_with_env(bin, root, &key(), &args, &S3_ENV).expect("start deltasync-server")
}

struct Cell {
    secs: Vec<f64>,
    wire: u64,
    /// S3 requests and bytes of the last run (the S3 store only).
    requests: u64,
    s3_bytes: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let big: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256) << 20;
    let copy_mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let rss_gib: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let s3 = std::env::var("DELTASYNC_BENCH_S3").expect("DELTASYNC_BENCH_S3=http://HOST:PORT/BUCKET");
    let (endpoint, bucket) = s3.rsplit_once('/').unwrap();
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (server_bin, cli) = (bin_dir.join("deltasync-server"), bin_dir.join("deltasync"));
    let work = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-store".into()));
    let _ = std::fs::remove_dir_all(&work);
    for d in ["src", "fs/root", "s3/root", "rss/root", "down"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let work = work.canonicalize().unwrap();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let store_url = format!("s3://{bucket}/bench-{stamp}");
    let fs_srv = start(&server_bin, &work.join("fs/root"), None);
    let s3_srv = start(&server_bin, &work.join("s3/root"), Some((endpoint, &store_url)));
    let s3_dash = s3_srv.dashboard.clone().unwrap();

    if runs == 0 {
        // Only the peak RSS (below), on a store with nothing else in it.
        drop(fs_srv);
        drop(s3_srv);
        return peak_rss(&server_bin, &cli, &work, endpoint, bucket, stamp, rss_gib);
    }
    eprintln!("preparing files");
    let Edits { base, overwrite, insert, deletion, scattered, prepend } = edits(&work.join("src"), big);
    let file = |name: &str, data: &[u8]| {
        let p = work.join("src").join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    // Each scenario: the version stored first (if any), and the new one.
    let ups: [(&str, Option<&Path>, &Path); 6] = [
        ("first full upload", None, &base),
        ("4 KiB overwrite", Some(&base), &overwrite),
        ("1 byte inserted at 0", Some(&base), &insert),
        ("1 MiB deleted", Some(&base), &deletion),
        ("64 scattered 1-byte edits", Some(&base), &scattered),
        ("100 bytes prepended", Some(&base), &prepend),
    ];
    let servers = [("file", &fs_srv), ("S3", &s3_srv)];
    println!(
        "## File store against S3 store (SeaweedFS), loopback, {runs} runs, medians, {} MiB\n",
        big >> 20
    );
    println!("| transfer | store | wall time | bytes client-server | S3 requests | S3 bytes |");
    println!("|---|---|---|---|---|---|");
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    for (label, old, new) in ups {
        for dir in ["up", "down"] {
            let mut cells: Vec<Cell> = Vec::new();
            for (_, srv) in servers {
                let mut cell = Cell { secs: Vec::new(), wire: 0, requests: 0, s3_bytes: 0 };
                for i in 0..runs {
                    // A directory of its own: no file beside it to start from.
                    let name = format!("{}-{dir}-{i}/f", label.replace(' ', "-"));
                    // A first upload of bytes the store has never seen (a
                    // version it holds, read lately, would be reused).
                    let fresh;
                    let new = if old.is_none() && dir == "up" {
                        fresh = file(&format!("fresh-{i}"), &random_bytes(1000 + i as u64, big));
                        fresh.as_path()
                    } else {
                        new
                    };
                    let local = work.join("down").join(format!("{i}"));
                    if dir == "up" {
                        if let Some(old) = old {
                            timed_transfer(
                                client(&cli, srv.port)
                                    .args(["--no-hints", "--json", "upload"])
                                    .arg(old)
                                    .args(["--as", &name]),
                            );
                        }
                    } else {
                        // Stored: the new version; here: the old one (or nothing).
                        timed_transfer(
                            client(&cli, srv.port)
                                .args(["--no-hints", "--json", "upload"])
                                .arg(new)
                                .args(["--as", &name]),
                        );
                        let _ = std::fs::remove_file(&local);
                        if let Some(old) = old {
                            std::fs::copy(old, &local).unwrap();
                        }
                    }
                    settle();
                    let before = counters(&s3_dash);
                    let (secs, wire) = if dir == "up" {
                        timed_transfer(
                            client(&cli, srv.port)
                                .args(["--no-hints", "--json", "upload"])
                                .arg(new)
                                .args(["--as", &name]),
                        )
                    } else {
                        timed_transfer(
                            client(&cli, srv.port)
                                .args(["--no-hints", "--json", "download", &name, "-o"])
                                .arg(&local),
                        )
                    };
                    let after = counters(&s3_dash);
                    if dir == "down" {
                        assert!(
                            std::fs::read(&local).unwrap() == std::fs::read(new).unwrap(),
                            "{name} differs"
                        );
                    }
                    cell.secs.push(secs);
                    cell.wire = wire;
                    let diff = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
                    cell.requests = ["get", "head", "put", "list", "delete"].iter().map(|k| diff(k)).sum();
                    cell.s3_bytes = diff("in") + diff("out");
                    let ok = client(&cli, srv.port).args(["rm", &name]).stdout(Stdio::null()).status();
                    assert!(ok.is_ok_and(|s| s.success()));
                }
                cells.push(cell);
            }
            rows.push((format!("{dir}: {label}"), cells));
        }
    }
    for (label, cells) in &rows {
        for ((store, _), c) in servers.iter().zip(cells) {
            let (req, bytes) = if *store == "S3" {
                (c.requests.to_string(), c.s3_bytes.to_string())
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {label} | {store} | {:.3} s | {} | {req} | {bytes} |",
                median(c.secs.clone()),
                c.wire
            );
        }
    }
    println!("\n| transfer | S3 / file, wall time (median) | bytes client-server S3 / file |");
    println!("|---|---|---|");
    for (label, cells) in &rows {
        let (f, s) = (&cells[0], &cells[1]);
        println!(
            "| {label} | {:.2} | {:.3} |",
            median(s.secs.clone()) / median(f.secs.clone()),
            s.wire as f64 / f.wire as f64
        );
    }

    // A copy of a large file under a new name (beside it), on S3.
    eprintln!("copy of {copy_mib} MiB");
    let copy_src = file("copy", &random_bytes(5, copy_mib << 20));
    timed_transfer(
        client(&cli, s3_srv.port)
            .args(["--no-hints", "--json", "upload"])
            .arg(&copy_src)
            .args(["--as", "copy/original"]),
    );
    let before = counters(&s3_dash);
    let (secs, wire) = timed_transfer(
        client(&cli, s3_srv.port)
            .args(["--no-hints", "--json", "upload"])
            .arg(&copy_src)
            .args(["--as", "copy/again"]),
    );
    let after = counters(&s3_dash);
    let diff = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
    println!(
        "\nCopy of a {copy_mib} MiB file under a new name beside it (S3 store): {wire} bytes client-server, {:.2} s, S3: {} bytes written, {} read",
        secs,
        diff("out"),
        diff("in")
    );
    drop(std::fs::remove_file(&copy_src));
    drop(fs_srv);
    drop(s3_srv);
    if rss_gib > 0 {
        peak_rss(&server_bin, &cli, &work, endpoint, bucket, stamp, rss_gib);
    }
}

/// The peak RSS of a fresh S3 server over an upload and a download of a
/// file of `rss_gib` GiB.
fn peak_rss(
    server_bin: &Path,
    cli: &Path,
    work: &Path,
    endpoint: &str,
    bucket: &str,
    stamp: u64,
    rss_gib: usize,
) {
    eprintln!("peak RSS with {rss_gib} GiB");
    let huge = work.join("src/huge");
    {
        let mut f = std::fs::File::create(&huge).unwrap();
        for i in 0..(rss_gib * 16) {
            f.write_all(&random_bytes(100 + i as u64, 64 << 20)).unwrap();
        }
    }
    let rss_url = format!("s3://{bucket}/bench-rss-{stamp}");
    let srv = start(server_bin, &work.join("rss/root"), Some((endpoint, &rss_url)));
    let (up, _) = timed_transfer(
        client(cli, srv.port).args(["--no-hints", "--json", "upload"]).arg(&huge).args(["--as", "huge"]),
    );
    let back = work.join("down/huge");
    let (down, _) = timed_transfer(
        client(cli, srv.port).args(["--no-hints", "--json", "download", "huge", "-o"]).arg(&back),
    );
    let rss = peak_rss_kib(srv.pid());
    drop(srv);
    println!(
        "\nS3 store, a {rss_gib} GiB file: upload {up:.1} s, download {down:.1} s; server peak RSS (VmHWM) {:.1} MiB",
        rss as f64 / 1024.0
    );
    let _ = std::fs::remove_file(&huge);
    let _ = std::fs::remove_file(&back);
}
