//! Helpers shared by the bench binaries: the CLI against a bench server,
//! its `--json` byte counts, and a process's peak memory.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The key every bench server grants everything to.
pub fn key() -> String {
    deltasync_server::process::test_key(0xbe)
}

/// The deltasync CLI `cli`, pointed at a bench server on loopback `port`.
pub fn client(cli: &Path, port: u16) -> Command {
    let mut c = Command::new(cli);
    c.env("DELTASYNC_SERVER", format!("127.0.0.1:{port}")).env("DELTASYNC_KEY", key());
    c
}

/// Runs a `--json` transfer; returns its wall time in seconds and its
/// `wire_bytes_sent + wire_bytes_received`. Panics if it fails.
pub fn timed_transfer(cmd: &mut Command) -> (f64, u64) {
    let t = Instant::now();
    let out = cmd.output().expect("run deltasync");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "deltasync failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let num = |k: &str| -> u64 {
        let i = text.find(&format!("\"{k}\":")).expect("a --json report") + k.len() + 3;
        text[i..].split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).expect("a count")
    };
    (secs, num("wire_bytes_sent") + num("wire_bytes_received"))
}

/// Peak resident memory (VmHWM) of process `pid`, in KiB (0 if unknown).
pub fn peak_rss_kib(pid: u32) -> u64 {
    deltasync_server::process::proc_status(pid, "VmHWM:")
}

/// The median (the upper one of an even count) of `v`, which is not empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Flushes every dirty page to disk (before a timed transfer, so that no
/// run pays for another's writes).
pub fn settle() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "sync failed");
}
