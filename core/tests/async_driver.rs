//! The async driver over `embedded-io-async`, as the tokio shells use it
//! (through `embedded-io-adapters`): a handshake and an upload between a
//! client and a server connection over an in-memory tokio duplex pipe.

use deltasync_core::Instant;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::Upload;
use deltasync_core::driver::{DriveError, run_async};
use deltasync_core::message::Outcome;
use deltasync_core::sender::Sender;
use deltasync_core::sim::{Files, KEY, handshake, keys, pump, random_bytes, server};
use deltasync_core::tree::Tree;
use embedded_io_adapters::tokio_1::FromTokio;

#[tokio::test(flavor = "current_thread")]
async fn a_client_and_server_sync_over_the_async_driver() {
    let files = Files::default();
    let old = random_bytes(1, 2 << 20);
    let mut new = old.clone();
    new[1 << 20..(1 << 20) + 4096].fill(7);
    files.borrow_mut().insert("f".into(), old);

    // A small pipe buffer forces many partial reads and writes.
    let (a, b) = tokio::io::duplex(4096);
    let (mut cio, mut sio) = (FromTokio::new(a), FromTokio::new(b));
    let mut srv = server(&files, keys());
    let (mut cp, mut sp) = (pump(), pump());

    let client = async move {
        let mut hs = handshake(KEY);
        let salt = run_async(&mut hs, &mut cio, &mut cp, || Instant(0)).await.unwrap();
        let tree = Tree::build(&new, ChunkerKind::Cdc);
        let sender = Sender::new(&tree, &new[..], tree.summary(), salt, Instant(0));
        let mut up = Upload::new("f", sender);
        let outcome = run_async(&mut up, &mut cio, &mut cp, || Instant(0)).await.unwrap();
        drop(cio);
        (outcome, cp.sent + cp.received, new)
    };
    let server = async move {
        // The server runs until the client hangs up.
        let r = run_async(&mut srv, &mut sio, &mut sp, || Instant(0)).await;
        assert!(matches!(r, Err(DriveError::Closed)), "{r:?}");
    };
    let ((outcome, wire, new), ()) = tokio::join!(client, server);
    assert_eq!(outcome, Outcome::Written);
    assert!(wire < 40_000, "a 4 KiB edit moved {wire} bytes");
    assert!(files.borrow()["f"] == new);
}
