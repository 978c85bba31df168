//! Conditional uploads (`UploadIf`), the notice an upload gets when the
//! version it started from was replaced meanwhile (`Replaced`), and a client
//! of protocol 5 served by this server: over the in-memory harness, with a
//! store that lets another writer publish while an upload runs.

use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::server::{Published, ServerConn, Store, StoredFile};
use deltasync_core::conn::{Query, QueryKind, Upload};
use deltasync_core::driver::DriveError;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::message::{Expect, Outcome};
use deltasync_core::sender::Sender;
use deltasync_core::sim::*;
use deltasync_core::tree::Tree;
use deltasync_core::{Hash, Instant, PROTOCOL_VERSION};

/// A [`MemStore`] where another writer publishes `other` as `name` just
/// before this connection's upload is published (between the store's
/// `create` and its `finish`: the race a conditional upload guards).
struct Racing {
    inner: MemStore,
    other: Option<(&'static str, Vec<u8>)>,
}

impl Store for Racing {
    type Reader = Vec<u8>;
    type Writer = MemWriter;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        self.inner.open(name, chunking)
    }
    fn create(&mut self, name: &str, size: u64, expect: Option<Expect>) -> Result<MemWriter, ErrorCode> {
        self.inner.create(name, size, expect)
    }
    fn finish(&mut self, name: &str, w: MemWriter, tree: Option<Tree>) -> Result<Published, ErrorCode> {
        if let Some((n, data)) = self.other.take() {
            self.inner.0.borrow_mut().insert(n.to_string(), data);
        }
        self.inner.finish(name, w, tree)
    }
    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        self.inner.list()
    }
    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        self.inner.stat(name)
    }
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        self.inner.delete(name)
    }
}

type Keys = Vec<(deltasync_core::channel::ClientKey, deltasync_core::access::Access)>;

struct Session {
    server: ServerConn<Racing, Keys>,
    cp: StdPump,
    sp: StdPump,
    net: Net,
    salt: [u8; 8],
    version: u16,
}

/// A session over `files` (protocol `version` at most) in which another
/// writer publishes `other` during the first upload, if given.
fn connect(files: &Files, other: Option<(&'static str, Vec<u8>)>, version: u16) -> Session {
    let store = Racing { inner: MemStore(files.clone()), other };
    let mut s = Session {
        server: ServerConn::new(store, keys(), [9u8; 32], Instant(0)),
        cp: pump(),
        sp: pump(),
        net: Net::new(),
        salt: [0; 8],
        version: 0,
    };
    let mut hs = handshake(KEY).at_most(version);
    s.salt = run(&mut hs, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).expect("handshake");
    s.version = hs.version();
    s
}

/// Uploads `data` as `name` (conditionally with `expect`): the outcome,
/// whether the server said the version was replaced meanwhile, and the file
/// bytes that went out.
fn upload(
    s: &mut Session,
    name: &str,
    data: &[u8],
    expect: Option<Expect>,
) -> (Result<Outcome, Stop>, bool, u64) {
    let tree = Tree::build(data, ChunkerKind::Cdc);
    let sender = Sender::new(&tree, data, tree.summary(), s.salt, s.net.clock);
    let mut op = Upload::new(name, sender);
    if let Some(e) = expect {
        op = op.expecting(e, s.version);
    }
    let r = run(&mut op, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    (r, op.replaced(), op.sender().literal_bytes())
}

fn conflict(r: &Result<Outcome, Stop>) -> bool {
    matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Conflict)))))
}

fn files_with(name: &str, data: &[u8]) -> Files {
    let files = Files::default();
    files.borrow_mut().insert(name.to_string(), data.to_vec());
    files
}

#[test]
fn an_upload_if_match_publishes_while_the_version_is_the_one_named() {
    let (v1, v2) = (random_bytes(1, 50_000), random_bytes(2, 50_000));
    let files = files_with("f", &v1);
    let mut s = connect(&files, None, PROTOCOL_VERSION);
    let (r, replaced, _) = upload(&mut s, "f", &v2, Some(Expect::Match(Hash::of(&v1))));
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(!replaced);
    assert!(files.borrow()["f"] == v2);
    // The session goes on: the next request is served.
    let (r, _, _) = upload(&mut s, "g", &v1, Some(Expect::Absent));
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(files.borrow()["g"] == v1);
}

#[test]
fn an_upload_expecting_another_version_fails_before_sending_anything() {
    let (v1, v2) = (random_bytes(1, 50_000), random_bytes(2, 50_000));
    let files = files_with("f", &v1);
    let mut s = connect(&files, None, PROTOCOL_VERSION);
    let (r, _, sent) = upload(&mut s, "f", &v2, Some(Expect::Match(Hash::of(&v2))));
    assert!(conflict(&r), "{r:?}");
    assert_eq!(sent, 0, "refused before the transfer");
    let (r, _, sent) = upload(&mut s, "f", &v2, Some(Expect::Absent));
    assert!(conflict(&r), "{r:?}");
    assert_eq!(sent, 0);
    let (r, _, _) = upload(&mut s, "new", &v2, Some(Expect::Match(Hash::of(&v1))));
    assert!(conflict(&r), "a version expected where none is: {r:?}");
    assert!(files.borrow()["f"] == v1, "the stored version stays");
    assert!(!files.borrow().contains_key("new"));
    // Still usable afterwards.
    let (r, _, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written);
}

#[test]
fn a_conditional_upload_that_loses_the_race_publishes_nothing() {
    let (v1, v2, theirs) = (random_bytes(1, 50_000), random_bytes(2, 50_000), random_bytes(3, 40_000));
    // Another writer publishes between the check at the start and the end.
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", theirs.clone())), PROTOCOL_VERSION);
    let (r, _, sent) = upload(&mut s, "f", &v2, Some(Expect::Match(Hash::of(&v1))));
    assert!(conflict(&r), "{r:?}");
    assert!(sent > 0, "the race was lost after the transfer began");
    assert!(files.borrow()["f"] == theirs, "the other writer's version stays");
    // The same with nothing to send (the upload is of the version named):
    // it is not the one stored any more.
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", theirs.clone())), PROTOCOL_VERSION);
    let (r, _, _) = upload(&mut s, "f", &v1, Some(Expect::Match(Hash::of(&v1))));
    assert!(conflict(&r), "{r:?}");
    // And a first upload that finds the name taken at the end.
    let files = Files::default();
    let mut s = connect(&files, Some(("f", theirs.clone())), PROTOCOL_VERSION);
    let (r, _, _) = upload(&mut s, "f", &v2, Some(Expect::Absent));
    assert!(conflict(&r), "{r:?}");
    assert!(files.borrow()["f"] == theirs);
}

#[test]
fn an_upload_over_a_version_replaced_meanwhile_is_told_so() {
    let (v1, v2, theirs) = (random_bytes(1, 50_000), random_bytes(2, 50_000), random_bytes(3, 40_000));
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", theirs.clone())), PROTOCOL_VERSION);
    let (r, replaced, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written, "last writer wins");
    assert!(replaced, "the Done says the base was replaced");
    assert!(files.borrow()["f"] == v2);
    // Without another writer, nothing to tell.
    let (r, replaced, _) = upload(&mut s, "f", &v1, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(!replaced);
    // Deleted meanwhile counts too (the other writer's `rm` is undone).
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("other", v1.clone())), PROTOCOL_VERSION);
    let (r, replaced, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(!replaced, "another name's change is not this one's");
}

#[test]
fn a_client_of_protocol_5_is_served_as_before() {
    let (v1, v2, theirs) = (random_bytes(1, 50_000), random_bytes(2, 50_000), random_bytes(3, 40_000));
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", theirs)), 5);
    assert_eq!(s.version, 5, "the older version is agreed on");
    // Stat is answered by the file's Info alone.
    let mut q = Query::new(QueryKind::Stat("f"), 5, |_| {}, Instant(0));
    let st = run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap().unwrap();
    assert_eq!(st.sha256, Hash::of(&v1));
    // What version 5 lacks is refused before anything is sent...
    let sent = s.cp.sent;
    let (r, _, _) = upload(&mut s, "f", &v2, Some(Expect::Absent));
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported))))),
        "{r:?}"
    );
    let mut q = Query::new(QueryKind::ListAll, 5, |_| {}, Instant(0));
    assert!(run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).is_err());
    assert_eq!(s.cp.sent, sent);
    // ... and by the server, from a client that sends it anyway.
    let mut q = Query::new(QueryKind::ListAll, 6, |_| {}, Instant(0));
    let r = run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported))))),
        "{r:?}"
    );
    // A plain upload is published as before, with no `Replaced` for a
    // client that would not know it.
    let (r, replaced, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(!replaced);
    assert!(files.borrow()["f"] == v2);
}
