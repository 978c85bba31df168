//! The deltasync server: a file-system [`store::FsStore`] behind
//! `deltasync-core`'s server connection, one async task per client with its
//! storage work on a bounded pool, behind admission limits ([`gate`]).

pub mod beneath;
pub mod gate;
pub mod keys;
pub mod live;
pub mod objstore;
pub mod process;
pub mod relay;
pub mod serve;
pub mod sketches;
pub mod store;
