//! Pushing the log: one upload over an encrypted, authenticated channel
//! (Noise, ChaCha20-Poly1305, the device's own key) through
//! `deltasync-core`'s client handshake and upload session (the same policy
//! as the desktop client's), with every buffer of fixed size.

use deltasync_core::Instant;
use deltasync_core::channel::{CipherKind, ClientKey};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::ClientHandshake;
use deltasync_core::conn::session::{Need, UploadSession};
use deltasync_core::driver::{DriveError, Pump, run_blocking};
use deltasync_core::message::{CAP_BATCH, CAP_FINE, CAPS, Outcome};
use deltasync_core::tree::FixedTree;

/// Tree entries (chunks and nodes) kept for one log: a 64 KiB log has at
/// most 32 chunks of 2 KiB and fewer nodes.
pub const TREE_ENTRIES: usize = 96;
/// Largest frame the server sends to a device (handshake, requests), sealed.
const FRAME: usize = 256;
/// Received bytes buffered per read.
const INPUT: usize = 512;
/// Largest frame the device sends (a `Data` frame carries this minus ~16).
const OUTPUT: usize = 1536;

/// What one sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncReport {
    /// How the server ended it.
    pub outcome: Outcome,
    /// Bytes written to the stream, framing and handshake included.
    pub wire_sent: u64,
    /// Bytes read from the stream.
    pub wire_received: u64,
    /// Log bytes sent as data.
    pub literal_bytes: u64,
    /// Size of the log synced.
    pub log_bytes: u64,
}

/// Why a sync failed.
#[derive(Debug)]
pub enum SyncError<E> {
    /// The log has more chunks than [`TREE_ENTRIES`] allows.
    TreeTooBig,
    /// The connection or the protocol failed.
    Drive(DriveError<E>),
    /// The server could not verify the log.
    Integrity,
}

/// Uploads `log` as `name` over the connected stream `io`: a handshake
/// with the device's `key` and `ephemeral` (32 fresh random bytes: the
/// session's X25519 ephemeral key), then a delta upload, every frame
/// sealed. The caller opens and closes the stream.
pub fn sync_log<T: embedded_io::Read + embedded_io::Write>(
    io: &mut T,
    key: &ClientKey,
    name: &str,
    log: &[u8],
    ephemeral: [u8; 32],
    mut now: impl FnMut() -> Instant,
) -> Result<SyncReport, SyncError<T::Error>> {
    // The device alone writes its log, always chunked so: no `Stat` first,
    // and the tree is built before anything goes on the wire (a log too
    // large for it costs no connection).
    const KIND: ChunkerKind = ChunkerKind::Cdc;
    let mut tree = FixedTree::<TREE_ENTRIES>::default();
    let summary = tree.index(log, KIND).map_err(|_| SyncError::TreeTooBig)?;
    let mut pump = Pump::new([0u8; INPUT], [0u8; FRAME], [0u8; OUTPUT]);
    let mut hs = ClientHandshake::new(key.clone(), CipherKind::ChaChaPoly, ephemeral, now());
    // Its buffers take neither batched frames nor 64 requests in flight,
    // even where core is built with `alloc` (a host's tests); a device's
    // core announces neither anyway.
    if CAPS & (CAP_BATCH | CAP_FINE) != 0 {
        hs = hs.announcing(CAPS & !(CAP_BATCH | CAP_FINE));
    }
    let salt = run_blocking(&mut hs, io, &mut pump, &mut now).map_err(SyncError::Drive)?;
    let mut up = UploadSession::new(name, log.len() as u64, log, salt, hs.version(), now()).chunked_as(KIND);
    // It asks for the tree chunked as told: the one built above.
    let asked = up.need();
    debug_assert_eq!(asked, Some(Need::Tree { kind: KIND, streaming: false }));
    up.tree_ready(&tree, summary);
    let outcome = run_blocking(&mut up, io, &mut pump, &mut now).map_err(SyncError::Drive)?;
    if outcome == Outcome::Integrity {
        return Err(SyncError::Integrity);
    }
    Ok(SyncReport {
        outcome,
        wire_sent: pump.sent,
        wire_received: pump.received,
        literal_bytes: up.literal_bytes(),
        log_bytes: log.len() as u64,
    })
}
