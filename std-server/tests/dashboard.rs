//! The dashboard end to end: the real server with its dashboard, the real
//! CLI, headless Chromium driven through chromedriver (fantoccini), and
//! `promtool` for the metrics format. `bash scripts/test.sh` installs
//! Debian's `chromium`, `chromium-driver` and `prometheus` when missing.
//! Every process a test starts is stopped by the test, by its process id.

use deltasync_core::sim::random_bytes as random;
use deltasync_server::process::{ServerProcess, http_get, test_key};
use fantoccini::{ClientBuilder, Locator};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The key the test servers grant everything to (its name is "test").
fn key() -> String {
    test_key(3)
}

/// chromedriver, stopped by its pid together with the browsers it started
/// (its children, by parent pid), even when a failed assertion skipped
/// closing the session.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("pkill").arg("-TERM").arg("-P").arg(self.0.id().to_string()).status();
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(root: &Path) -> ServerProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_deltasync-server"));
    ServerProcess::start(bin, root, &key(), &["--dashboard", "127.0.0.1:0"]).expect("start server")
}

fn cli_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_deltasync-server")).with_file_name("deltasync");
    assert!(p.exists(), "{} is missing: build the workspace binaries first", p.display());
    p
}

fn upload(port: u16, path: &Path, name: &str) {
    let out = Command::new(cli_bin())
        .env("DELTASYNC_SERVER", format!("127.0.0.1:{port}"))
        .env("DELTASYNC_KEY", key())
        .args(["--no-hints", "upload"])
        .arg(path)
        .args(["--as", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Pushes the tree `dir` to `prefix` with the CLI.
fn push(port: u16, dir: &Path, prefix: &str) {
    let out = Command::new(cli_bin())
        .env("DELTASYNC_SERVER", format!("127.0.0.1:{port}"))
        .env("DELTASYNC_KEY", key())
        .args(["--no-hints", "push"])
        .arg(dir)
        .arg(prefix)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_a_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(&dir.path().join("root"));
    let url = format!("{}metrics", srv.dashboard.as_deref().unwrap());
    let check = |text: &str| {
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool is needed (Debian package prometheus; scripts/test.sh installs it)");
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool rejected /metrics:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (status, before) = http_get(&url);
    assert_eq!(status, 200);
    check(&before);
    let f = dir.path().join("data");
    std::fs::write(&f, random(1, 300_000)).unwrap();
    upload(srv.port, &f, "data");
    // The transfer is counted when it ends and the wire bytes when the
    // connection's last report arrives, a moment apart: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (_, t) = http_get(&url);
        let settled = metric(&t, "deltasync_transfers_total") >= 1.0
            && metric(&t, "deltasync_wire_bytes_total") >= 300_000.0;
        if settled || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    check(&after);
    assert_eq!(
        metric(&after, "deltasync_transfers_total") - metric(&before, "deltasync_transfers_total"),
        1.0
    );
    assert!(metric(&after, "deltasync_wire_bytes_total") >= 300_000.0);
    assert_eq!(metric(&after, "deltasync_file_bytes_total"), 300_000.0);
    assert!(metric(&after, "deltasync_connections_total") >= 1.0);
    // Per key: the upload is counted against the key that made it.
    assert!(after.contains("deltasync_key_transfers_total{key=\"test\"} 1"), "{after}");
    assert!(after.contains("deltasync_key_file_bytes_total{key=\"test\"} 300000"), "{after}");
    let (status, body) = http_get(&format!("{}api/files", srv.dashboard.as_deref().unwrap()));
    assert_eq!(status, 200);
    assert!(body.contains("\"name\":\"data\""), "{body}");
    let (status, _) = http_get(&format!("{}../../etc/passwd", srv.dashboard.as_deref().unwrap()));
    assert_eq!(status, 404);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_updates_live_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(&dir.path().join("root"));
    let port = free_port();
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is needed (Debian package chromium-driver; scripts/test.sh installs it)"),
    );
    let profile = dir.path().join("chrome-profile");
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-quic", format!("--user-data-dir={}", profile.display()), "--window-size=1280,800"]
        }
    }))
    .unwrap();
    let webdriver = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match ClientBuilder::native().capabilities(caps.clone()).connect(&webdriver).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("could not reach chromedriver: {e}"),
        }
    };
    client.goto(srv.dashboard.as_deref().unwrap()).await.unwrap();
    let js = |c: &fantoccini::Client, s: &'static str| {
        let c = c.clone();
        async move { c.execute(s, vec![]).await.unwrap() }
    };
    let wait_for = |c: &fantoccini::Client, s: &'static str| {
        let c = c.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.execute(s, vec![]).await.unwrap() == serde_json::Value::Bool(true) {
                    return;
                }
                assert!(Instant::now() < deadline, "timed out waiting for: {s}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(&client, "return document.getElementById('status').textContent === 'live'").await;
    js(&client, "window.__marker = 42; return null").await;
    let count_before = client.find(Locator::Id("count")).await.unwrap().text().await.unwrap();
    let chart_before =
        js(&client, "return Chart.getChart('rate-chart').data.datasets[0].data.reduce((a,b)=>a+b,0)").await;
    assert_eq!(chart_before.as_f64(), Some(0.0));

    // A real upload with the CLI: a full one, then a delta.
    let f = dir.path().join("report.bin");
    let mut data = random(3, 3 << 20);
    std::fs::write(&f, &data).unwrap();
    let port = srv.port;
    let f2 = f.clone();
    tokio::task::spawn_blocking(move || upload(port, &f2, "reports/report.bin")).await.unwrap();
    data[1 << 20] ^= 0xff;
    std::fs::write(&f, &data).unwrap();
    let f2 = f.clone();
    tokio::task::spawn_blocking(move || upload(port, &f2, "reports/report.bin")).await.unwrap();

    wait_for(
        &client,
        "return document.querySelector('#recent tbody').textContent.includes('reports/report.bin')",
    )
    .await;
    wait_for(&client, "return document.getElementById('count').textContent === '2'").await;
    // Each transfer names the key that made it.
    wait_for(
        &client,
        "return [...document.querySelectorAll('#recent tbody tr')].every(r => r.cells[2].textContent === 'test')",
    )
    .await;
    wait_for(&client, "return Chart.getChart('rate-chart').data.datasets[0].data.some(v => v > 0)").await;
    wait_for(
        &client,
        "return document.querySelector('#files tbody').textContent.includes('reports/report.bin')",
    )
    .await;
    // A tree push is one row, with its files.
    let tree = dir.path().join("album");
    for (i, name) in ["one.jpg", "two.jpg", "sub/three.jpg"].iter().enumerate() {
        let p = tree.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, random(10 + i as u64, 20_000)).unwrap();
    }
    tokio::task::spawn_blocking(move || push(port, &tree, "albums/summer")).await.unwrap();
    wait_for(
        &client,
        "return [...document.querySelectorAll('#trees tbody tr')].some(r => r.cells[1].textContent === 'albums/summer' \
         && r.cells[3].textContent === 'done' && r.cells[4].textContent === '3' \
         && r.cells[7].textContent.includes('albums/summer/sub/three.jpg (written)'))",
    )
    .await;
    // Its files were sent without waiting between them; each still shows
    // what its own frames took on the wire (about its 20 KB), not nothing.
    wait_for(
        &client,
        "return [...document.querySelectorAll('#recent tbody tr')].filter(r => r.cells[1].textContent.startsWith('albums/')) \
         .every(r => r.cells[5].textContent.startsWith('19.') || r.cells[5].textContent.startsWith('20.'))",
    )
    .await;
    let count_after = client.find(Locator::Id("count")).await.unwrap().text().await.unwrap();
    assert_ne!(count_before, count_after);
    let saving = client.find(Locator::Id("saving")).await.unwrap().text().await.unwrap();
    assert!(saving.ends_with('%') && saving != "0.0 %", "saving shows {saving:?}");
    assert_eq!(js(&client, "return window.__marker").await.as_i64(), Some(42), "the page reloaded");

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("dashboard.png"), client.screenshot().await.unwrap()).unwrap();
    client.set_window_size(390, 844).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let overflow = js(&client, "return document.documentElement.scrollWidth <= window.innerWidth + 1").await;
    assert_eq!(overflow, serde_json::Value::Bool(true), "the page is wider than a phone screen");
    std::fs::write(target.join("dashboard-phone.png"), client.screenshot().await.unwrap()).unwrap();
    client.close().await.unwrap();
}

/// The dashboard over TLS: a client that trusts the certificate gets the
/// API with the security headers; a plain-HTTP request gets nothing useful.
#[test]
fn the_dashboard_speaks_tls_when_given_a_certificate() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_deltasync-server"));
    let extra = [
        "--dashboard",
        "127.0.0.1:0",
        "--dashboard-tls-cert",
        cert_pem.to_str().unwrap(),
        "--dashboard-tls-key",
        key_pem.to_str().unwrap(),
    ];
    let srv = ServerProcess::start(bin, &dir.path().join("root"), &key(), &extra).expect("start server");
    let base = srv.dashboard.clone().unwrap();
    let host = base.strip_prefix("https://").expect("an https dashboard").trim_end_matches('/').to_string();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(&host).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(tls, "GET /api/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = tls.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(lower.contains("x-frame-options: deny") && lower.contains("content-security-policy"), "{resp}");
    assert!(resp.contains("connected_clients"), "{resp}");

    // Plain HTTP on the TLS port is no way in (the server may hang up
    // before the request is even written: that is a refusal too).
    let mut plain = TcpStream::connect(&host).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(plain, "GET /api/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("connected_clients"));
}
