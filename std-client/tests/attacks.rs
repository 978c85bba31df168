//! Attacks on the path and by clients with the wrong key, end to end: the
//! real server and CLI, a relay in the middle (`deltasync_server::relay`)
//! that rewrites, drops, repeats, reorders or records the bytes, and keys
//! managed with `deltasync-server key add|revoke` while the server runs.
//! Every server and relay a test starts is stopped by the test.

use deltasync_core::sim::{log_lines, random_bytes};
use deltasync_server::process::{ServerProcess, http_get, test_key};
use deltasync_server::relay::{Meddler, Relay, frame, payload};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn server_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deltasync")).with_file_name("deltasync-server");
    assert!(bin.exists(), "{} is missing: build the workspace binaries first", bin.display());
    bin
}

/// The CLI with `key` against 127.0.0.1:`port`, no hints, no compression
/// (so that plaintext would show on the wire if it were sent).
fn cli(port: u16, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deltasync"))
        .env("DELTASYNC_SERVER", format!("127.0.0.1:{port}"))
        .env("DELTASYNC_KEY", key)
        .args(["--no-hints", "--no-compress"])
        .args(args)
        .output()
        .expect("run deltasync")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The recent rows of the dashboard at `base`, as text.
fn recent(base: &str) -> String {
    http_get(&format!("{base}api/transfers")).1
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// XORs `payload` so that where it carried `was` it carries `wanted`,
/// keeping whatever followed `was` (the tag of a sealed frame): the classic
/// rewrite of a stream cipher's ciphertext by someone who knows the
/// plaintext.
fn rewrite(sealed: &[u8], was: &[u8], wanted: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> =
        sealed[..wanted.len()].iter().zip(was.iter().zip(wanted)).map(|(c, (p, q))| c ^ p ^ q).collect();
    out.extend_from_slice(&sealed[was.len()..]);
    out
}

#[test]
fn a_relay_rewriting_rm_harmless_into_rm_victim_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let key = test_key(1);
    let srv = ServerProcess::start(&server_bin(), &root, &key, &["--dashboard", "127.0.0.1:0"]).unwrap();
    for name in ["harmless.txt", "victim.txt"] {
        let f = dir.path().join(name);
        std::fs::write(&f, name.as_bytes()).unwrap();
        assert!(cli(srv.port, &key, &["upload", s(&f)]).status.success());
    }
    // postcard: Delete is variant 8, then the name's length and bytes.
    let delete = |name: &str| [&[8u8, name.len() as u8][..], name.as_bytes()].concat();
    let (was, wanted) = (delete("harmless.txt"), delete("victim.txt"));
    let meddle: Meddler =
        Box::new(
            move |i, f| {
                if i == 1 { vec![frame(&rewrite(payload(f), &was, &wanted))] } else { vec![f.to_vec()] }
            },
        );
    let relay = Relay::start(srv.port, Some(meddle)).unwrap();
    let out = cli(relay.port, &key, &["rm", "harmless.txt"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("tampered"), "{}", stderr(&out));
    assert!(root.join("victim.txt").exists(), "the relay made the server delete victim.txt");
    assert!(root.join("harmless.txt").exists());
    let base = srv.dashboard.clone().unwrap();
    wait_for("the server's report", || recent(&base).contains("a frame failed authentication"));
}

/// Uploads a new file through a relay that applies `meddle` to the
/// client's frames; the upload must fail, the file must not appear, and the
/// server must report a frame that failed authentication.
fn upload_through(meddle: Meddler, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let key = test_key(1);
    let srv = ServerProcess::start(&server_bin(), &root, &key, &["--dashboard", "127.0.0.1:0"]).unwrap();
    let old = dir.path().join("kept.bin");
    std::fs::write(&old, random_bytes(1, 300_000)).unwrap();
    assert!(cli(srv.port, &key, &["upload", s(&old)]).status.success());
    let f = dir.path().join("new.bin");
    std::fs::write(&f, random_bytes(2, 1 << 20)).unwrap();
    let relay = Relay::start(srv.port, Some(meddle)).unwrap();
    let out = cli(relay.port, &key, &["upload", s(&f)]);
    // The server notices and says so; the client may hear it (6) or see the
    // connection reset first, while it was still sending (4).
    assert!(matches!(out.status.code(), Some(6 | 4)), "{what}: {:?} {}", out.status, stderr(&out));
    assert!(!root.join("new.bin").exists(), "{what}: a tampered upload was published");
    assert_eq!(std::fs::read(root.join("kept.bin")).unwrap(), std::fs::read(&old).unwrap());
    let base = srv.dashboard.clone().unwrap();
    wait_for(what, || recent(&base).contains("a frame failed authentication"));
}

/// Frame 3 of an upload is a data frame in the middle of the stream.
const K: usize = 3;

#[test]
fn a_changed_frame_is_refused() {
    upload_through(
        Box::new(|i, f| {
            let mut f = f.to_vec();
            if i == K {
                let last = f.len() - 20;
                f[last] ^= 0x01;
            }
            vec![f]
        }),
        "one bit flipped",
    );
}

#[test]
fn a_dropped_frame_is_refused() {
    upload_through(Box::new(|i, f| if i == K { vec![] } else { vec![f.to_vec()] }), "a frame dropped");
}

#[test]
fn a_repeated_frame_is_refused() {
    upload_through(
        Box::new(|i, f| if i == K { vec![f.to_vec(), f.to_vec()] } else { vec![f.to_vec()] }),
        "a frame repeated",
    );
}

#[test]
fn reordered_frames_are_refused() {
    let mut held: Option<Vec<u8>> = None;
    upload_through(
        Box::new(move |i, f| match i {
            i if i == K => {
                held = Some(f.to_vec());
                vec![]
            }
            i if i == K + 1 => vec![f.to_vec(), held.take().unwrap()],
            _ => vec![f.to_vec()],
        }),
        "two frames swapped",
    );
}

#[test]
fn a_passive_capture_holds_no_file_contents_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let key = test_key(7);
    let srv = ServerProcess::start(&server_bin(), &root, &key, &["--dashboard", "off"]).unwrap();
    let relay = Relay::start(srv.port, None).unwrap();
    let text = log_lines(3, 300_000);
    let f = dir.path().join("service.log");
    std::fs::write(&f, &text).unwrap();
    assert!(cli(relay.port, &key, &["upload", s(&f)]).status.success());
    let back = dir.path().join("back.log");
    let out = cli(relay.port, &key, &["download", "service.log", "-o", s(&back)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&back).unwrap(), text);
    let capture = relay.captured();
    assert!(capture.len() > 2 * text.len(), "the capture holds both transfers: {} bytes", capture.len());
    let windows: HashSet<&[u8]> = capture.windows(16).collect();
    let leaked = text.windows(16).filter(|w| windows.contains(w)).count();
    assert_eq!(leaked, 0, "{leaked} 16-byte runs of the file crossed the wire in clear");
    let secret = deltasync_core::channel::ClientKey::parse(&key).unwrap().secret;
    assert!(!capture.windows(16).any(|w| secret.windows(16).any(|s| s == w)), "the secret crossed the wire");
    assert!(!capture.windows(16).any(|w| key.as_bytes()[22..].windows(16).any(|s| s == w)));
}

/// `deltasync-server --keys FILE key ARGS...`; the key string it printed.
fn key_cmd(keys: &Path, args: &[&str]) -> String {
    let out = Command::new(server_bin()).arg("--keys").arg(keys).arg("key").args(args).output().unwrap();
    assert!(out.status.success(), "key {args:?}: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn keys_grant_only_their_permissions_and_revocation_takes_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let keys = dir.path().join("keys.toml");
    let admin = key_cmd(&keys, &["add", "admin"]);
    assert!(admin.starts_with("dsk1-"), "{admin}");
    let srv = ServerProcess::start_with_keys(&server_bin(), &root, &keys, &["--dashboard", "off"]).unwrap();
    let put = |key: &str, name: &str, data: &[u8]| {
        let f = dir.path().join("upload");
        std::fs::write(&f, data).unwrap();
        cli(srv.port, key, &["upload", s(&f), "--as", name])
    };
    assert!(put(&admin, "devices/8/log", b"eight").status.success());
    assert!(put(&admin, "shared.txt", b"shared").status.success());

    // Keys added while the server runs work at once.
    let reader = key_cmd(&keys, &["add", "reader", "--read-only"]);
    let dev7 = key_cmd(&keys, &["add", "device-7", "--prefix", "devices/7", "--write-only"]);
    let listed = key_cmd(&keys, &["list"]);
    assert!(listed.contains("reader") && listed.contains("devices/7") && !listed.contains(&reader[22..]));

    let denied = |o: Output, what: &str| {
        assert_eq!(o.status.code(), Some(7), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains("permission denied"), "{what}: {}", stderr(&o));
    };
    denied(put(&reader, "shared.txt", b"overwritten"), "a read-only key uploading");
    denied(cli(srv.port, &reader, &["rm", "shared.txt"]), "a read-only key deleting");
    let got = dir.path().join("got");
    assert!(cli(srv.port, &reader, &["download", "shared.txt", "-o", s(&got)]).status.success());
    denied(put(&dev7, "devices/8/log", b"forged"), "device 7 writing device 8's log");
    denied(put(&dev7, "devices/70/log", b"forged"), "device 7 writing device 70's log");
    denied(cli(srv.port, &dev7, &["ls"]), "a write-only key listing");
    assert!(put(&dev7, "devices/7/log", b"seven").status.success());
    // A symlink inside the root does not carry a key past its prefix.
    std::fs::create_dir_all(root.join("finance")).unwrap();
    std::fs::write(root.join("finance/report"), b"q3").unwrap();
    std::os::unix::fs::symlink("../../finance", root.join("devices/7/shared")).unwrap();
    let o = put(&dev7, "devices/7/shared/planted", b"forged");
    assert_eq!(o.status.code(), Some(7), "through an in-root symlink: {}", stderr(&o));
    assert!(!root.join("finance/planted").exists());

    // A wrong key, and a revoked one, from the next connection on.
    let o = cli(srv.port, &test_key(9), &["ls"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    key_cmd(&keys, &["revoke", "reader"]);
    let o = cli(srv.port, &reader, &["download", "shared.txt", "-o", s(&got)]);
    assert_eq!(o.status.code(), Some(3), "a revoked key: {}", stderr(&o));

    assert_eq!(std::fs::read(root.join("shared.txt")).unwrap(), b"shared");
    assert_eq!(std::fs::read(root.join("devices/8/log")).unwrap(), b"eight");
    assert_eq!(std::fs::read(root.join("devices/7/log")).unwrap(), b"seven");
    assert!(!root.join("devices/70").exists());
}

#[test]
fn a_weak_secret_is_refused_with_the_way_to_make_one() {
    let o = cli(1, "dsk1-0011223344556677-00112233445566778899aabbccddeeff", &["ls"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("128 bits") && stderr(&o).contains("key add"), "{}", stderr(&o));
}

#[test]
fn either_cipher_reaches_the_same_server() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let key = test_key(8);
    let srv = ServerProcess::start(&server_bin(), &root, &key, &["--dashboard", "off"]).unwrap();
    let data = random_bytes(5, 500_000);
    let f = dir.path().join("f");
    std::fs::write(&f, &data).unwrap();
    let out = cli(srv.port, &key, &["--cipher", "aes-256-gcm", "upload", s(&f)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = dir.path().join("back");
    let out = cli(srv.port, &key, &["--cipher", "chacha20-poly1305", "download", "f", "-o", s(&back)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert_eq!(cli(srv.port, &key, &["--cipher", "rot13", "ls"]).status.code(), Some(2));
}
