//! The device library (`deltasync-embedded`, no_std, no alloc) on the host:
//! its log store and sync client over std TCP (through
//! `embedded-io-adapters`) against the real server. Fast checks of the byte
//! budgets and of a connection dropped mid-sync; the same code runs in the
//! QEMU firmware.

use deltasync_core::Instant;
use deltasync_core::channel::ClientKey;
use deltasync_core::chunker::CDC_MAX;
use deltasync_core::driver::TimeoutAsTimedOut;
use deltasync_core::message::Outcome;
use deltasync_embedded::log::LogStore;
use deltasync_embedded::sync::{SyncReport, sync_log};
use deltasync_server::keys::{self, KeyEntry};
use deltasync_server::process::ServerProcess;
use embedded_io_adapters::std::FromStd;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Device 7's key: it may only upload (and stat) under `devices/7`.
const KEY: ClientKey = ClientKey { id: *b"device-7", secret: [0x17; 32] };
const NAME: &str = "devices/7/log";

fn start(root: &Path) -> ServerProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_deltasync-server"));
    let keys_file = root.join("keys.toml");
    keys::save(&keys_file, &[KeyEntry::device("device-7", &KEY, "devices/7")]).unwrap();
    let root = root.join("files");
    ServerProcess::start_with_keys(bin, &root, &keys_file, &["--dashboard", "off"]).expect("start server")
}

fn sync(port: u16, log: &[u8], n: u8) -> SyncReport {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut io = FromStd::new(TimeoutAsTimedOut(s));
    sync_log(&mut io, &KEY, NAME, log, [n; 32], || Instant(0)).unwrap()
}

/// Deterministic device records.
fn record(i: u32) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    format!(
        "t={:06} dev=7 temp={}.{} seq={:06} status={}",
        i * 10,
        15 + x % 20,
        x % 10,
        i,
        ["ok", "warn"][x.is_multiple_of(7) as usize]
    )
    .into_bytes()
}

fn fill(log: &mut LogStore<65536>, from: u32, to: u32) -> usize {
    let before = log.len();
    for i in from..to {
        log.append(&record(i)).unwrap();
    }
    log.len() - before
}

#[test]
fn device_syncs_cost_the_new_bytes_plus_little() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let mut log = Box::new(LogStore::<65536>::new());
    fill(&mut log, 0, 600);
    let first = sync(srv.port, log.as_bytes(), 1);
    assert_eq!(first.outcome, Outcome::Written);
    let wire = first.wire_sent + first.wire_received;
    println!("first sync: {} log bytes, {wire} on the wire", log.len());
    assert!(wire as f64 <= 1.05 * log.len() as f64);
    assert_eq!(std::fs::read(dir.path().join("files").join(NAME)).unwrap(), log.as_bytes());

    for (round, n) in [(2u8, 1u32), (3, 20), (4, 120)] {
        let start = 600 + 1000 * round as u32;
        let appended = fill(&mut log, start, start + n) as u64;
        let r = sync(srv.port, log.as_bytes(), round);
        let wire = r.wire_sent + r.wire_received;
        println!(
            "append {appended} bytes: {wire} on the wire, {} literal (last chunk re-sent: {}), overhead {}",
            r.literal_bytes,
            r.literal_bytes.saturating_sub(appended),
            wire - r.literal_bytes
        );
        assert_eq!(r.outcome, Outcome::Written);
        // "One chunk" read as the largest chunk the chunker makes; the
        // overhead beyond the literal bytes is printed above and reported.
        assert!(wire <= appended + CDC_MAX as u64 + 200, "{wire}");
        assert!(r.literal_bytes <= appended + CDC_MAX as u64);
        assert_eq!(std::fs::read(dir.path().join("files").join(NAME)).unwrap(), log.as_bytes());
    }

    let same = sync(srv.port, log.as_bytes(), 9);
    let wire = same.wire_sent + same.wire_received;
    println!("nothing new: {wire} on the wire");
    assert_eq!(same.outcome, Outcome::Unchanged);
    assert!(wire <= 300, "{wire}");
}

/// Relays one connection to `port`, cutting both directions once `limit`
/// bytes have gone from the device to the server.
fn cutting_proxy(port: u16, limit: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut dev, _) = l.accept().unwrap();
        let mut srv = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut dev2, mut srv2) = (dev.try_clone().unwrap(), srv.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut srv2, &mut dev2);
        });
        let mut buf = [0u8; 1024];
        let mut sent = 0;
        while sent < limit {
            let n = match dev.read(&mut buf[..(limit - sent).min(1024)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if srv.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = dev.shutdown(Shutdown::Both);
        let _ = srv.shutdown(Shutdown::Both);
    });
    p
}

#[test]
fn a_sync_cut_midway_leaves_the_old_log_and_the_retry_resends_at_most_a_chunk() {
    let mut log = Box::new(LogStore::<65536>::new());
    fill(&mut log, 0, 200);
    let old = log.as_bytes().to_vec();
    let appended = fill(&mut log, 200, 1300) as u64;
    assert!(appended > 45_000 && log.len() as u64 == old.len() as u64 + appended, "{appended}");

    // What an uninterrupted sync of the same append costs.
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = start(clean_dir.path());
    sync(clean.port, &old, 1);
    let uninterrupted = sync(clean.port, log.as_bytes(), 2).literal_bytes;

    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    sync(srv.port, &old, 1);
    // Far more than one chunk gets through before the cut, so that a
    // server that threw the partial upload away would be caught.
    let limit = 40_000;
    let proxy = cutting_proxy(srv.port, limit);
    let s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut io = FromStd::new(TimeoutAsTimedOut(s));
    let cut = sync_log(&mut io, &KEY, NAME, log.as_bytes(), [5; 32], || Instant(0));
    assert!(cut.is_err(), "the cut sync should fail");
    // Let the server notice the broken connection and keep the partial upload.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read(dir.path().join("files").join(NAME)).unwrap(),
        old,
        "the server holds a torn log"
    );

    let retry = sync(srv.port, log.as_bytes(), 6);
    assert_eq!(retry.outcome, Outcome::Written);
    assert_eq!(std::fs::read(dir.path().join("files").join(NAME)).unwrap(), log.as_bytes());
    // Of the `limit` bytes that reached the server before the cut, at most
    // 2,000 were protocol (handshake, offer, listings, frame headers and
    // tags), so at least `limit - 2,000` log bytes were kept: the retry
    // sends at most the rest and one chunk again.
    let kept_at_least = limit as u64 - 2_000;
    println!("uninterrupted {uninterrupted}, retry literal {}", retry.literal_bytes);
    assert!(
        retry.literal_bytes + kept_at_least <= uninterrupted + CDC_MAX as u64,
        "the retry sent {} of {uninterrupted}: the partial upload was not reused",
        retry.literal_bytes
    );
}
