//! Helpers shared by the bench binaries: the CLI against a bench server,
//! its `--json` byte counts, an rsync daemon and rsync's counts, and a
//! process's peak memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// A child process, stopped (TERM) and waited for when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An rsync daemon on loopback serving the module `bench` from
/// `work/rsync-root` (its configuration in `work/cfg`): the process and its
/// port.
pub fn rsync_daemon(work: &Path) -> (Proc, u16) {
    let port = free_port();
    let conf = work.join("cfg/rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\npid file = {0}/cfg/rsyncd.pid\n[bench]\n  path = {0}/rsync-root\n  read only = false\n  uid = root\n  gid = root\n",
            work.display()
        ),
    )
    .unwrap();
    let daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rsync daemon (is rsync installed?)");
    (Proc(daemon), port)
}

/// Runs an rsync client given `--stats`; returns its wall time in seconds
/// and its "Total bytes sent" + "Total bytes received". Panics if it fails.
pub fn timed_rsync(cmd: &mut Command) -> (f64, u64) {
    let t = Instant::now();
    let out = cmd.output().expect("run rsync");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {text}"));
        line[key.len()..].split_whitespace().next().unwrap().replace(',', "").parse().unwrap()
    };
    (secs, field("Total bytes sent:") + field("Total bytes received:"))
}

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

/// A pseudo-random file and its edits, as the benchmarks compare them.
pub struct Edits {
    /// `big` pseudo-random bytes.
    pub base: PathBuf,
    /// 4 KiB in the middle inverted.
    pub overwrite: PathBuf,
    /// One byte inserted at 0.
    pub insert: PathBuf,
    /// 1 MiB deleted from the middle.
    pub deletion: PathBuf,
    /// 64 single bytes changed, spread over the file.
    pub scattered: PathBuf,
    /// 100 bytes put before the start.
    pub prepend: PathBuf,
}

/// Writes the files of [`Edits`] into `dir`.
pub fn edits(dir: &Path, big: usize) -> Edits {
    let base_data = deltasync_core::sim::random_bytes(1, big);
    let file = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = base_data.clone();
        f(&mut d);
        file(name, &d)
    };
    let mid = big / 2;
    Edits {
        base: file("base", &base_data),
        overwrite: edit("overwrite", &|d| d[mid..mid + 4096].iter_mut().for_each(|b| *b = !*b)),
        insert: edit("insert", &|d| d.insert(0, b'!')),
        deletion: edit("deletion", &|d| drop(d.drain(mid..mid + (1 << 20)))),
        scattered: edit("scattered", &|d| {
            let n = d.len();
            (0..64).for_each(|i| d[(i * 7919 + 1) * (n / 64) % n] ^= 0x55)
        }),
        prepend: edit("prepend", &|d| drop(d.splice(0..0, deltasync_core::sim::random_bytes(9, 100)))),
    }
}

/// Flushes every dirty page to disk (before a timed transfer, so that no
/// run pays for another's writes).
pub fn settle() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "sync failed");
}
