//! deltasync-core: the delta-sync protocol, once, for every shell.
//!
//! Everything here is sans-IO: state machines take messages and a time and
//! produce frames; file contents come through the small traits in [`source`].
//! The crate is `#![no_std]`; the `alloc` feature adds the receiver side and an
//! owned hash tree, and `std` adds conveniences for the desktop shells.
//!
//! ```
//! use deltasync_core::{chunker::ChunkerKind, tree::Tree};
//! let old = vec![7u8; 100_000];
//! let mut new = old.clone();
//! new[50_000] = 8;
//! let a = Tree::build(&old[..], ChunkerKind::default());
//! let b = Tree::build(&new[..], ChunkerKind::default());
//! assert_ne!(a.root(), b.root());
//! assert_eq!(a.summary().size, 100_000);
//! ```
#![cfg_attr(not(test), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(all(feature = "std", not(test)))]
extern crate std;

#[cfg(feature = "alloc")]
pub mod access;
pub mod channel;
pub mod chunker;
pub mod conn;
pub mod driver;
pub mod error;
pub mod frame;
pub mod hash;
pub mod machine;
pub mod message;
#[cfg(feature = "alloc")]
pub mod plan;
#[cfg(feature = "ring")]
mod ringaead;
pub mod sender;
pub mod source;
pub mod time;
pub mod tree;
mod varint;

#[cfg(feature = "alloc")]
pub mod receiver;

#[cfg(feature = "std")]
pub mod sim;
#[cfg(all(test, feature = "std"))]
mod testutil;

pub use error::{ErrorCode, SessionError};
pub use hash::Hash;
pub use time::Instant;

/// Version of the wire protocol spoken by this crate. Version 2: upload
/// offers may leave the whole-file hash to the server, and `Done` carries it.
/// Version 3: chunk sizes scale with the file (`ChunkerKind::CdcScaled`),
/// and `Info` tells how the server's tree of a file is chunked. Version 4:
/// a first upload may be offered without its root, which follows in `Root`
/// (the sender hashes while its bytes go out). Version 5: every session is a
/// Noise channel keyed by a per-client key ([`channel`]); requests are
/// checked against the key's permissions. Version 6: conditional uploads
/// (`UploadIf`, `Error(Conflict)`), an upload is told when it replaced a
/// version stored after it began (`Replaced`), and listings and `Stat`
/// describe interrupted uploads (`ListAll`, `Partial`). Version 7: trees
/// (`ListDir` and `Entry`, times and modes kept with `UploadMeta`,
/// `SetMeta` and `MakeDir`, `Copy` of a stored file without its data,
/// `Delete` of an empty directory).
pub const PROTOCOL_VERSION: u16 = 7;

/// The oldest protocol version this crate still speaks. Each side of a
/// handshake announces the newest version it speaks and both then use the
/// older of the two, if both still speak it. The plaintext versions (up to
/// 4) are not spoken at all: their peers get `Error(VersionMismatch)`.
pub const MIN_PROTOCOL_VERSION: u16 = 5;
