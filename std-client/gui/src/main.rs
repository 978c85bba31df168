//! `deltasync-gui`: the desktop client.
//!
//! `deltasync-gui [--server HOST:PORT] [--key KEY] [FILE...]`: with a
//! server and key it connects at start, and uploads the FILEs once
//! connected. Settings are remembered between runs.

use deltasync_gui::{GuiApp, Settings, Window, load_settings};
use std::path::PathBuf;

fn main() -> eframe::Result {
    let mut args = std::env::args().skip(1);
    let (mut server, mut key, mut files) = (None, None, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--server" => server = args.next(),
            "--key" => key = args.next(),
            "-h" | "--help" => {
                println!("usage: deltasync-gui [--server HOST:PORT] [--key KEY] [FILE...]");
                return Ok(());
            }
            _ => files.push(PathBuf::from(a)),
        }
    }
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
