//! Time as the shells give it: milliseconds from an arbitrary epoch.

/// A point in time, in milliseconds since the shell's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Instant(pub u64);

impl Instant {
    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }
}

/// How long a peer may stay silent while we wait for it.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;

/// How long a server gives a new connection to prove its key, from the
/// moment it was accepted; bytes arriving meanwhile do not extend it.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
