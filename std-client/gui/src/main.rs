//! `deltasync-gui`: the desktop client.
//!
//! `deltasync-gui [--server HOST:PORT] [--key KEY] [FILE...]`: with a
//! server or a key given it connects at start, and uploads the FILEs once
//! connected. Settings are remembered between runs.

use clap::Parser;
use deltasync_gui::{GuiApp, Settings, Window, load_settings};
use std::path::PathBuf;

/// deltasync desktop client: upload, download, list and delete files on a
/// deltasync server, sending only what changed.
#[derive(Parser, Debug)]
#[command(name = "deltasync-gui", version)]
struct Args {
    /// Server address (connects at start when given).
    #[arg(long)]
    server: Option<String>,
    /// This client's key (dsk1-...); prefer DELTASYNC_KEY (a command line
    /// is visible to other users). Connects at start when given.
    #[arg(long)]
    key: Option<String>,
    /// Files to upload once connected.
    files: Vec<PathBuf>,
}

fn main() -> eframe::Result {
    let Args { server, key, files } = Args::parse();
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_inner_size([900.0, 640.0]).with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "deltasync",
        options,
        Box::new(move |cc| {
            let mut settings = load_settings(cc.storage).unwrap_or_else(|| Settings {
                server: "127.0.0.1:5001".into(),
                key: String::new(),
                download_dir: ".".into(),
            });
            settings.key = deltasync_client::find_key(std::env::var("DELTASYNC_KEY").ok(), None)
                .map(|k| k.encode().to_string())
                .unwrap_or_default();
            let auto = server.is_some() || key.is_some();
            if let Some(s) = server {
                settings.server = s;
            }
            if let Some(k) = key {
                settings.key = k;
            }
            let mut app = GuiApp::new(settings);
            app.queued_uploads = files;
            if auto {
                app.connect(&cc.egui_ctx);
            }
            Ok(Box::new(Window(app)))
        }),
    )
}
