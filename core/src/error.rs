//! Error values: [`ErrorCode`] travels on the wire, [`SessionError`] is what a
//! state machine reports to its shell.

use serde::{Deserialize, Serialize};

/// A protocol error, as sent to the peer in an `Error` message.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame or message could not be decoded.
    BadMessage,
    /// A valid message arrived at the wrong time.
    UnexpectedMessage,
    /// A frame was longer than the agreed maximum.
    FrameTooLong,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer did not prove it holds the key.
    AuthFailed,
    /// A file name is not acceptable (absolute, `..`, NUL, too long...).
    BadName,
    /// No such file.
    NotFound,
    /// A request pointed outside the version being synced.
    OutOfRange,
    /// More requests in flight than allowed.
    TooManyRequests,
    /// The server could not read or write its storage.
    Storage,
    /// The rebuilt file did not match the sender's root or file hash.
    Integrity,
    /// The peer waited too long for the other side.
    Timeout,
    /// Another upload of the same name is in progress.
    Busy,
    /// A requested mode (such as a chunker) is not supported.
    Unsupported,
    /// An upload offered without its root, to a server that holds data it
    /// could reuse for that name: offer the version's tree instead.
    NeedTree,
    /// The key of the session does not allow this request (operation or
    /// name outside its prefixes).
    PermissionDenied,
    /// A frame failed authentication: it was changed, dropped, repeated or
    /// reordered on the way. Nothing it carried was acted on.
    Tampered,
    /// The server's storage is full (or the quota of its user reached):
    /// nothing was replaced.
    NoSpace,
    /// A conditional upload found another version stored than the one it
    /// expected (or one where it expected none): nothing was replaced.
    Conflict,
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            ErrorCode::BadMessage => "malformed message",
            ErrorCode::UnexpectedMessage => "unexpected message",
            ErrorCode::FrameTooLong => "frame too long",
            ErrorCode::VersionMismatch => "protocol version mismatch",
            ErrorCode::AuthFailed => "authentication failed",
            ErrorCode::BadName => "file name refused",
            ErrorCode::NotFound => "no such file",
            ErrorCode::OutOfRange => "request out of range",
            ErrorCode::TooManyRequests => "too many requests in flight",
            ErrorCode::Storage => "server storage error",
            ErrorCode::Integrity => "integrity check failed",
            ErrorCode::Timeout => "timed out",
            ErrorCode::Busy => "file busy",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NeedTree => "the server holds a version to reuse: offer the tree",
            ErrorCode::PermissionDenied => "permission denied for this key",
            ErrorCode::Tampered => "a frame failed authentication (changed on the way)",
            ErrorCode::NoSpace => "the server's storage is full",
            ErrorCode::Conflict => "the stored version is not the one expected (changed by someone else)",
        };
        f.write_str(s)
    }
}

/// Why a state machine stopped.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionError {
    /// The peer reported this error.
    Peer(ErrorCode),
    /// The peer broke the protocol; we told it so with this code.
    Protocol(ErrorCode),
    /// Nothing arrived before the deadline.
    Timeout,
    /// Reading the local version failed.
    Read,
    /// Writing the new version failed.
    Write,
    /// Writing the new version failed: no space left on its disk.
    NoSpace,
    /// A fixed-size buffer or tree store was too small.
    Capacity,
}

impl core::fmt::Display for SessionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SessionError::Peer(c) => write!(f, "peer reported: {c}"),
            SessionError::Protocol(c) => write!(f, "peer broke the protocol: {c}"),
            SessionError::Timeout => f.write_str("timed out waiting for the peer"),
            SessionError::Read => f.write_str("reading the local file failed"),
            SessionError::Write => f.write_str("writing the new file failed"),
            SessionError::NoSpace => f.write_str("writing the new file failed: no space left"),
            SessionError::Capacity => f.write_str("a fixed buffer was too small"),
        }
    }
}

impl core::error::Error for SessionError {}
impl core::error::Error for ErrorCode {}
