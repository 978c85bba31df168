//! Conventions the std shells share on one machine.

use std::path::PathBuf;

/// Where a server keeps the token it generated, and where a client on the
/// same machine looks for it: `$XDG_CONFIG_HOME/deltasync/token`, else
/// `$HOME/.config/deltasync/token`.
pub fn default_token_path() -> Option<PathBuf> {
    let base =
        std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("deltasync").join("token"))
}

/// Milliseconds on a monotonic clock, as the state machines take time.
pub fn now() -> crate::Instant {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    crate::Instant(start.elapsed().as_millis() as u64)
}
