//! deltasync on a microcontroller: device logs kept in a fixed memory region
//! and pushed to a deltasync server with delta sync, through the very same
//! `deltasync-core` state machines the desktop client runs.
//!
//! No allocator: the log lives in a [`log::LogStore`], the tree of the log in
//! a fixed-size array, and the connection's buffers on the stack. Any
//! `embedded-io` stream carries the protocol; [`net::TcpIo`] (feature
//! `smoltcp`) makes a smoltcp TCP socket one.
#![no_std]

pub mod log;
#[cfg(feature = "smoltcp")]
pub mod net;
pub mod sync;
