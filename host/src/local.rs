//! Conventions the std shells share on one machine.

use std::path::PathBuf;

/// `$VAR/deltasync` if `VAR` (an XDG base directory variable) is set, else
/// `$HOME/HOME_DIR/deltasync`.
fn xdg_dir(var: &str, home_dir: &str) -> Option<PathBuf> {
    let base = std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(home_dir))
    })?;
    Some(base.join("deltasync"))
}

/// Where a client looks for its key when none is given, and where a fresh
/// server on the same machine writes the key it created:
/// `$XDG_CONFIG_HOME/deltasync/key`, else `$HOME/.config/deltasync/key`.
pub fn default_key_path() -> Option<PathBuf> {
    Some(xdg_dir("XDG_CONFIG_HOME", ".config")?.join("key"))
}

/// Where a server keeps its key file (every client's key and permissions):
/// `$XDG_CONFIG_HOME/deltasync/server-keys.toml`, else
/// `$HOME/.config/deltasync/server-keys.toml`.
pub fn default_keys_path() -> Option<PathBuf> {
    Some(xdg_dir("XDG_CONFIG_HOME", ".config")?.join("server-keys.toml"))
}

/// Where a client keeps chunk hints ([`crate::hints`]):
/// `$XDG_CACHE_HOME/deltasync/hints`, else `$HOME/.cache/deltasync/hints`.
pub fn default_hints_dir() -> Option<PathBuf> {
    Some(xdg_dir("XDG_CACHE_HOME", ".cache")?.join("hints"))
}

/// Milliseconds on a monotonic clock, as the state machines take time.
pub fn now() -> deltasync_core::Instant {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    deltasync_core::Instant(start.elapsed().as_millis() as u64)
}
