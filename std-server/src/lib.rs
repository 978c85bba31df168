//! The deltasync server: a file-system [`store::FsStore`] behind
//! `deltasync-core`'s server connection, one blocking task per client.

pub mod keys;
pub mod live;
pub mod process;
pub mod relay;
pub mod serve;
pub mod store;
