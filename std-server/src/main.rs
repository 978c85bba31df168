//! The deltasync server (tokio shell over `deltasync-core`).
fn main() {}
