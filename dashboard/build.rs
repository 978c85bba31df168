//! Fetches the chart library from the npm registry, as pinned by
//! `web/package-lock.json`, into `OUT_DIR`, so that the binary embeds it and
//! the page needs no CDN. Nothing third-party is committed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let web = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("web");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("npm");
    for f in ["package.json", "package-lock.json"] {
        println!("cargo:rerun-if-changed=web/{f}");
    }
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("node_modules/chart.js/dist/chart.umd.min.js");
    let lock = std::fs::read(web.join("package-lock.json")).unwrap();
    let stamp = out.join("lock.stamp");
    if !target.exists() || std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(web.join(f), out.join(f)).unwrap();
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(&out)
            .status()
            .expect("npm is needed to fetch the dashboard's chart library (Debian: apt-get install npm)");
        assert!(status.success(), "npm ci failed");
        std::fs::write(&stamp, &lock).unwrap();
    }
    println!("cargo:rustc-env=CHART_JS={}", target.display());
}
