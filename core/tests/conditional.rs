//! The client's upload session (its policy: `Stat`, then a streamed or a
//! tree offer, `NeedTree` fallback), conditional uploads (`UploadIf`), the notice an upload gets when the
//! version it started from was replaced meanwhile (`Replaced`), interrupted
//! uploads in listings (`ListAll`, `Stat`), and a client of protocol 5
//! served by this server: over the in-memory harness, with a store that
//! keeps partials and lets another writer publish while an upload runs.

use deltasync_core::access::Access;
use deltasync_core::channel::ClientKey;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::server::{PartialFile, Published, ServerConn, Store, StoredFile};
use deltasync_core::conn::session::{DownloadSession, Need, UploadSession};
use deltasync_core::conn::{Listed, Query, QueryKind, Upload};
use deltasync_core::driver::DriveError;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::machine::{Machine, Poll};
use deltasync_core::message::Message;
use deltasync_core::message::{Expect, Outcome};
use deltasync_core::sender::Sender;
use deltasync_core::sim::*;
use deltasync_core::tree::Summary;
use deltasync_core::tree::Tree;
use deltasync_core::{Hash, Instant, PROTOCOL_VERSION};

/// A [`MemStore`] where another writer publishes `other` as `name` just
/// before this connection's upload is published (between the store's
/// `create` and its `finish`: the race a conditional upload guards), or
/// deletes `name` if `other` is empty; and which holds `partials` (what
/// interrupted uploads of those names left).
struct Racing {
    inner: MemStore,
    other: Option<(&'static str, Vec<u8>)>,
    partials: Vec<(&'static str, Vec<u8>)>,
    /// How the store chunks its files' trees (else as their size picks).
    kind: Option<ChunkerKind>,
}

impl Racing {
    /// Over `files`, with no other writer, no partials, chunked as sizes pick.
    fn new(files: &Files) -> Racing {
        Racing { inner: MemStore(files.clone()), other: None, partials: Vec::new(), kind: None }
    }
}

impl Store for Racing {
    type Reader = Vec<u8>;
    type Writer = MemWriter;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        self.inner.open(name, chunking.or(self.kind))
    }
    fn create(&mut self, name: &str, size: u64, expect: Option<Expect>) -> Result<MemWriter, ErrorCode> {
        self.inner.create(name, size, expect)
    }
    fn finish(&mut self, name: &str, w: MemWriter, tree: Option<Tree>) -> Result<Published, ErrorCode> {
        match self.other.take() {
            Some((n, data)) if data.is_empty() => drop(self.inner.0.borrow_mut().remove(n)),
            Some((n, data)) => drop(self.inner.0.borrow_mut().insert(n.to_string(), data)),
            None => {}
        }
        self.inner.finish(name, w, tree)
    }
    fn partial(&mut self, name: &str, chunking: ChunkerKind) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        let p = self.partials.iter().find(|p| p.0 == name);
        Ok(p.map(|(_, d)| (Tree::build(&d[..], chunking), d.clone())))
    }
    fn holds(&mut self, name: &str) -> Result<bool, ErrorCode> {
        Ok(self.inner.0.borrow().contains_key(name) || self.partials.iter().any(|p| p.0 == name))
    }
    fn partials(&mut self) -> Result<Vec<PartialFile>, ErrorCode> {
        let describe =
            |(n, d): &(&str, Vec<u8>)| PartialFile { name: n.to_string(), size: d.len() as u64, modified: 7 };
        Ok(self.partials.iter().map(describe).collect())
    }
    fn partial_info(&mut self, name: &str) -> Result<Option<PartialFile>, ErrorCode> {
        Ok(self.partials()?.into_iter().find(|p| p.name == name))
    }
    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        self.inner.list()
    }
    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        let f = self.inner.stat(name)?;
        Ok(StoredFile { chunking: self.kind.unwrap_or(f.chunking), ..f })
    }
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        self.inner.delete(name)
    }
}

type Keys = Vec<(ClientKey, Access)>;

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
    connect_to(Racing { other, ..Racing::new(files) }, keys(), version)
}

fn connect_to(store: Racing, keys: Keys, version: u16) -> Session {
    connect_as(KEY, store, keys, version)
}

/// A session with the client's key `key`, to a server that knows `keys`.
fn connect_as(key: ClientKey, store: Racing, keys: Keys, version: u16) -> Session {
    let mut s = Session {
        server: ServerConn::new(store, keys, [9u8; 32], Instant(0)),
        cp: pump(),
        sp: pump(),
        net: Net::new(),
        salt: [0; 8],
        version: 0,
    };
    let mut hs = handshake(key).at_most(version);
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
    // Another name's change is not this one's.
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("other", v1.clone())), PROTOCOL_VERSION);
    let (r, replaced, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(!replaced);
    // Deleted meanwhile counts too (the other writer's `rm` is undone, and
    // it is said).
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", Vec::new())), PROTOCOL_VERSION);
    let (r, replaced, _) = upload(&mut s, "f", &v2, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(replaced);
    assert!(files.borrow()["f"] == v2);
    // A conditional upload refuses to undo it.
    let files = files_with("f", &v1);
    let mut s = connect(&files, Some(("f", Vec::new())), PROTOCOL_VERSION);
    let (r, _, _) = upload(&mut s, "f", &v2, Some(Expect::Match(Hash::of(&v1))));
    assert!(conflict(&r), "{r:?}");
    assert!(!files.borrow().contains_key("f"));
}

#[test]
fn a_partial_holding_all_of_the_offer_is_published_not_called_unchanged() {
    // A server that died after the last byte but before publishing kept the
    // whole version as a partial: a retry publishes it (copying every byte
    // from the partial), it does not end `Unchanged` with nothing stored.
    let (v0, v1) = (random_bytes(1, 60_000), random_bytes(2, 60_000));
    for stored in [None, Some(v0.clone())] {
        let files = Files::default();
        if let Some(v) = &stored {
            files.borrow_mut().insert("f".into(), v.clone());
        }
        let store = Racing { partials: vec![("f", v1.clone())], ..Racing::new(&files) };
        let mut s = connect_to(store, keys(), PROTOCOL_VERSION);
        let expect = if stored.is_some() { Expect::Match(Hash::of(&v0)) } else { Expect::Absent };
        let (r, _, sent) = upload(&mut s, "f", &v1, Some(expect));
        assert_eq!(r.unwrap(), Outcome::Written, "stored: {}", stored.is_some());
        assert_eq!(sent, 0, "every byte came from the partial");
        assert!(files.borrow()["f"] == v1);
    }
    // The stored version itself is still unchanged, partial or not.
    let files = files_with("f", &v1);
    let store = Racing { partials: vec![("f", v0.clone())], ..Racing::new(&files) };
    let mut s = connect_to(store, keys(), PROTOCOL_VERSION);
    assert_eq!(upload(&mut s, "f", &v1, None).0.unwrap(), Outcome::Unchanged);
}

#[test]
fn interrupted_uploads_are_listed_and_described_within_the_keys_prefixes() {
    let files = files_with("dir/a", b"a");
    files.borrow_mut().insert("other/b".into(), b"b".to_vec());
    let partials = vec![("dir/a", vec![1; 10]), ("dir/new", vec![2; 20]), ("other/c", vec![3; 30])];
    let reader = ClientKey { id: *b"readerky", secret: [0x43; 32] };
    let access = Access {
        key: "reader".into(),
        read: true,
        write: false,
        delete: false,
        prefixes: vec!["dir/".into()],
    };
    let keyring = vec![(KEY, Access::full("sim")), (reader.clone(), access)];
    let listed = |key: ClientKey, kind: QueryKind<'_>| {
        let store = Racing { partials: partials.clone(), ..Racing::new(&files) };
        let mut s = connect_as(key, store, keyring.clone(), PROTOCOL_VERSION);
        let mut seen = Vec::new();
        let on_entry = |e: Listed<'_>| {
            seen.push(match e {
                Listed::File(f) => format!("file {} {}", f.name, f.size),
                Listed::Partial(p) => format!("partial {} {} {}", p.name, p.size, p.modified),
                Listed::Entry(e) => format!("entry {} {}", e.name, e.size),
            })
        };
        let mut q = Query::new(kind, PROTOCOL_VERSION, on_entry, Instant(0));
        let r = run(&mut q, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
        (r.map(|st| st.map(|st| st.size)), seen)
    };
    let (r, seen) = listed(KEY, QueryKind::ListAll);
    r.unwrap();
    assert_eq!(
        seen,
        [
            "file dir/a 1",
            "file other/b 1",
            "partial dir/a 10 7",
            "partial dir/new 20 7",
            "partial other/c 30 7"
        ]
    );
    // A key limited to `dir/` sees nothing of `other/`.
    let (r, seen) = listed(reader.clone(), QueryKind::ListAll);
    r.unwrap();
    assert_eq!(seen, ["file dir/a 1", "partial dir/a 10 7", "partial dir/new 20 7"]);
    // Stat: the file and its partial; a partial alone; neither.
    let (r, seen) = listed(reader.clone(), QueryKind::Stat("dir/a"));
    assert_eq!(r.unwrap(), Some(1));
    assert_eq!(seen, ["file dir/a 1", "partial dir/a 10 7"]);
    let (r, seen) = listed(reader.clone(), QueryKind::Stat("dir/new"));
    assert_eq!(r.unwrap(), None, "no file");
    assert_eq!(seen, ["partial dir/new 20 7"]);
    let (r, _) = listed(reader.clone(), QueryKind::Stat("dir/none"));
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::NotFound))))),
        "{r:?}"
    );
    let (r, seen) = listed(reader, QueryKind::Stat("other/c"));
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::PermissionDenied))))),
        "{r:?}"
    );
    assert!(seen.is_empty());
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

/// Drives an [`UploadSession`] as a shell would: whenever it asks for the
/// tree, builds it (chunked as asked) and gives it at once, or for a
/// streamed offer `delay` polls later (its bytes go out meanwhile).
struct Shell<'n> {
    session: UploadSession<'n, Tree, Vec<u8>>,
    data: Vec<u8>,
    asked: Vec<Need>,
    building: Option<(Tree, u32)>,
    delay: u32,
    /// Gives the tree the moment it is asked for, even between a message
    /// and the next poll (a shell with the tree at hand).
    eager: bool,
    /// The whole-file hash the shell gives with the tree (as hints of
    /// this very version know it), if any.
    hash: Option<Hash>,
}

impl Machine for Shell<'_> {
    type Output = Outcome;
    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.session.handle(now, msg)?;
        if self.eager {
            self.take_need();
            if let Some((tree, _)) = self.building.take() {
                self.give(tree);
            }
        }
        Ok(())
    }
    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        loop {
            self.take_need();
            match self.building.take() {
                Some((tree, 0)) => self.give(tree),
                Some((tree, n)) => self.building = Some((tree, n - 1)),
                None => {}
            }
            let p = self.session.poll(now, out)?;
            self.take_need();
            match p {
                // Nothing else to do meanwhile: the build finishes.
                Poll::Wait(_) if self.building.is_some() => {
                    let (tree, _) = self.building.take().unwrap();
                    self.give(tree);
                }
                p => return Ok(p),
            }
        }
    }
}

impl Shell<'_> {
    fn take_need(&mut self) {
        if let Some(need) = self.session.need() {
            let Need::Tree { kind, streaming } = need;
            self.asked.push(need);
            let delay = if streaming { self.delay } else { 0 };
            self.building = Some((Tree::build(&self.data[..], kind), delay));
        }
    }

    fn give(&mut self, tree: Tree) {
        let summary = Summary { file_hash: self.hash.unwrap_or(Hash::UNKNOWN), ..tree.summary() };
        self.session.tree_ready(tree, summary);
    }
}

/// Uploads `data` as `name` through an [`UploadSession`] (streaming if
/// `stream`): the outcome, what the shell was asked, file bytes sent.
fn session_upload(
    s: &mut Session,
    name: &str,
    data: &[u8],
    stream: bool,
    expect: Option<Expect>,
) -> (Result<Outcome, Stop>, Vec<Need>, u64) {
    let session = UploadSession::new(name, data.len() as u64, data.to_vec(), s.salt, s.version, s.net.clock)
        .streaming(stream)
        .expecting(expect);
    let mut shell = Shell {
        session,
        data: data.to_vec(),
        asked: Vec::new(),
        building: None,
        delay: 3,
        eager: false,
        hash: None,
    };
    let r = run(&mut shell, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    (r, shell.asked, shell.session.literal_bytes())
}

/// Uploads `data` as `name` with its whole-file hash said to be `hash`:
/// the outcome and the hash the session reports.
fn hashed_upload(
    s: &mut Session,
    name: &str,
    data: &[u8],
    hash: Hash,
    expect: Option<Expect>,
) -> (Outcome, Option<Hash>) {
    let session = UploadSession::new(name, data.len() as u64, data.to_vec(), s.salt, s.version, s.net.clock)
        .expecting(expect);
    let mut shell = Shell {
        session,
        data: data.to_vec(),
        asked: Vec::new(),
        building: None,
        delay: 0,
        eager: false,
        hash: Some(hash),
    };
    let r = run(&mut shell, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    (r.expect("upload"), shell.session.reported_hash())
}

#[test]
fn an_upload_offering_its_hash_reports_it_once_the_server_checked_it() {
    // A server tells the whole-file hash only to an offer that left it
    // unknown; one that offered it (from hints) needs it too, or its
    // shell hashes the whole file again after the upload.
    let v1 = random_bytes(7, 200_000);
    let mut v2 = v1.clone();
    v2[100_000] ^= 1;
    let (h1, h2) = (Hash::of(&v1), Hash::of(&v2));
    let files = files_with("f", &v1);
    let mut s = connect(&files, None, PROTOCOL_VERSION);
    // Written: the server checked the offered hash.
    assert_eq!(hashed_upload(&mut s, "f", &v2, h2, None), (Outcome::Written, Some(h2)));
    // Held already (offered all the same, to publish only over it): the
    // hash `Stat` told, which is the offer's.
    assert_eq!(hashed_upload(&mut s, "f", &v2, h2, Some(Expect::Match(h2))), (Outcome::Unchanged, Some(h2)));
    // A wrong claim on a version held: unchecked, not reported.
    assert_eq!(hashed_upload(&mut s, "f", &v2, h1, Some(Expect::Match(h2))), (Outcome::Unchanged, None));
    // A wrong claim on a new version: refused, nothing published.
    assert_eq!(hashed_upload(&mut s, "f", &v1, Hash([9; 32]), None), (Outcome::Integrity, None));
    assert!(files.borrow()["f"] == v2);
}

#[test]
fn the_upload_session_streams_a_first_upload_and_sends_a_delta_otherwise() {
    let v1 = random_bytes(1, 300_000);
    let mut v2 = v1.clone();
    v2[150_000..150_100].fill(7);
    let kind = ChunkerKind::for_size(300_000);
    let files = Files::default();
    let mut s = connect(&files, None, PROTOCOL_VERSION);
    // Nothing stored: the bytes go out while the tree is built.
    let (r, asked, sent) = session_upload(&mut s, "f", &v1, true, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert_eq!(asked, [Need::Tree { kind, streaming: true }]);
    assert_eq!(sent, 300_000);
    assert!(files.borrow()["f"] == v1);
    // Stored: a delta, chunked as the stored version is.
    let (r, asked, sent) = session_upload(&mut s, "f", &v2, true, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert_eq!(asked, [Need::Tree { kind, streaming: false }]);
    assert!(sent < 30_000, "a delta sent {sent}");
    assert!(files.borrow()["f"] == v2);
    // The same version again: unchanged, nothing sent.
    let (r, _, sent) = session_upload(&mut s, "f", &v2, true, None);
    assert_eq!((r.unwrap(), sent), (Outcome::Unchanged, 0));
    // A shell that cannot stream waits for its tree; an empty file never streams.
    let (r, asked, _) = session_upload(&mut s, "g", &v1, false, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert_eq!(asked, [Need::Tree { kind, streaming: false }]);
    let (r, asked, _) = session_upload(&mut s, "empty", &[], true, Some(Expect::Absent));
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(matches!(asked[..], [Need::Tree { streaming: false, .. }]));
    assert!(files.borrow()["empty"].is_empty());
}

#[test]
fn a_streamed_upload_the_server_wants_as_a_delta_falls_back_to_the_tree() {
    // An interrupted upload of the name is held: the rootless offer gets
    // `NeedTree`, and the session offers the tree once the shell gives it.
    let v1 = random_bytes(4, 300_000);
    let files = Files::default();
    let store = Racing { partials: vec![("f", v1[..200_000].to_vec())], ..Racing::new(&files) };
    let mut s = connect_to(store, keys(), PROTOCOL_VERSION);
    let (r, asked, sent) = session_upload(&mut s, "f", &v1, true, Some(Expect::Absent));
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(matches!(asked[..], [Need::Tree { streaming: true, .. }]), "{asked:?}");
    assert!(sent < 150_000, "the partial was reused: {sent} bytes sent");
    assert!(files.borrow()["f"] == v1);
}

#[test]
fn the_upload_session_works_with_a_server_of_protocol_5_terms() {
    let (v1, v2) = (random_bytes(5, 80_000), random_bytes(6, 80_000));
    let files = files_with("f", &v1);
    let mut s = connect(&files, None, 5);
    let (r, asked, _) = session_upload(&mut s, "f", &v2, true, None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(matches!(asked[..], [Need::Tree { streaming: false, .. }]));
    let (r, _, _) = session_upload(&mut s, "new", &v2, true, None);
    assert_eq!(r.unwrap(), Outcome::Written, "NotFound from a version 5 Stat");
    assert!(files.borrow()["new"] == v2);
    let (r, _, _) = session_upload(&mut s, "f", &v1, true, Some(Expect::Absent));
    assert!(
        matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::Unsupported))))),
        "{r:?}"
    );
}

/// Downloads `name` through a [`DownloadSession`], with `local` as the
/// shell's current copy: the outcome, what was asked, the bytes received
/// and the file bytes that crossed.
fn session_download(
    s: &mut Session,
    name: &str,
    local: Option<&[u8]>,
) -> (Result<Outcome, Stop>, Vec<Need>, Vec<u8>, u64) {
    struct DShell<'n> {
        session: DownloadSession<'n, Tree, Vec<u8>, Vec<u8>>,
        local: Option<Vec<u8>>,
        asked: Vec<Need>,
    }
    impl Machine for DShell<'_> {
        type Output = Outcome;
        fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
            self.session.handle(now, msg)
        }
        fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
            loop {
                let p = self.session.poll(now, out)?;
                match self.session.need() {
                    Some(need @ Need::Tree { kind, .. }) => {
                        self.asked.push(need);
                        let local =
                            self.local.as_deref().expect("asked for the tree of a copy it does not have");
                        self.session.tree_ready(Tree::build(local, kind));
                    }
                    None => return Ok(p),
                }
            }
        }
    }
    let session =
        DownloadSession::new(name, Vec::new(), local.map(<[u8]>::to_vec), s.salt, s.version, s.net.clock);
    let mut shell = DShell { session, local: local.map(<[u8]>::to_vec), asked: Vec::new() };
    let r = run(&mut shell, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    let literal = shell.session.stats().literal_bytes;
    let got = shell.session.take_result().map(|(w, _)| w).unwrap_or_default();
    (r, shell.asked, got, literal)
}

#[test]
fn the_download_session_reuses_the_local_copy_chunked_as_the_server_chunks() {
    let v1 = random_bytes(7, 400_000);
    let mut v2 = v1.clone();
    v2[200_000..200_050].fill(1);
    // Stored chunked unlike what its size would pick: the local copy's tree
    // must be chunked the same way to share anything.
    let files = Files::default();
    let store = Racing {
        partials: vec![("p", vec![1; 10])],
        kind: Some(ChunkerKind::Fixed(4096)),
        ..Racing::new(&files)
    };
    let mut s = connect_to(store, keys(), PROTOCOL_VERSION);
    let tree = Tree::build(&v2[..], ChunkerKind::Fixed(4096));
    let sender = Sender::new(&tree, &v2[..], tree.summary(), s.salt, s.net.clock);
    assert_eq!(
        run(&mut Upload::new("f", sender), &mut s.cp, &mut s.server, &mut s.sp, &mut s.net).unwrap(),
        Outcome::Written
    );
    let (r, _, _, literal) = session_download(&mut s, "f", Some(&v2));
    assert_eq!((r.unwrap(), literal), (Outcome::Unchanged, 0), "the same copy");
    let (r, asked, got, literal) = session_download(&mut s, "f", Some(&v1));
    assert_eq!(r.unwrap(), Outcome::Written);
    assert_eq!(asked, [Need::Tree { kind: ChunkerKind::Fixed(4096), streaming: false }]);
    assert!(got == v2);
    assert!(literal <= 8192, "a delta: {literal} bytes");
    // Without a copy: no Stat, no tree asked for, the whole file.
    let (r, asked, got, literal) = session_download(&mut s, "f", None);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(asked.is_empty() && got == v2 && literal == 400_000);
    // Nothing stored (only an interrupted upload): no such file.
    for name in ["p", "none"] {
        let (r, _, _, _) = session_download(&mut s, name, Some(&v1));
        assert!(
            matches!(r, Err(Stop::Client(DriveError::Session(SessionError::Peer(ErrorCode::NotFound))))),
            "{name}: {r:?}"
        );
    }
}

#[test]
fn a_tree_given_before_the_streamed_offer_went_out_is_offered_instead() {
    // Protocol 5: the `NotFound` of the Stat decides in `handle`, and this
    // shell gives the tree at once, before the streamed offer is polled
    // out. The server holds an interrupted upload (a streamed offer would
    // get `NeedTree`): the offer must carry the tree, never a root alone.
    let v1 = random_bytes(9, 300_000);
    let files = Files::default();
    let store = Racing { partials: vec![("f", v1[..150_000].to_vec())], ..Racing::new(&files) };
    let mut s = connect_to(store, keys(), 5);
    let session =
        UploadSession::new("f", 300_000, v1.clone(), s.salt, s.version, s.net.clock).streaming(true);
    let mut shell = Shell {
        session,
        data: v1.clone(),
        asked: Vec::new(),
        building: None,
        delay: 0,
        eager: true,
        hash: None,
    };
    let r = run(&mut shell, &mut s.cp, &mut s.server, &mut s.sp, &mut s.net);
    assert_eq!(r.unwrap(), Outcome::Written);
    assert!(shell.session.literal_bytes() < 200_000, "a delta against the partial");
    assert!(files.borrow()["f"] == v1);
}

#[test]
fn a_server_error_while_the_tree_is_built_is_the_servers() {
    // Waiting for the shell's tree, the server gives up (its idle timeout):
    // that is its error, not a protocol violation.
    let mut up: UploadSession<'_, Tree, Vec<u8>> =
        UploadSession::new("f", 10, vec![0; 10], [0; 8], 5, Instant(0));
    let mut out = vec![0u8; 256];
    assert!(matches!(up.poll(Instant(0), &mut out), Ok(Poll::Transmit(_))), "the Stat");
    up.handle(Instant(1), Message::Error(ErrorCode::NotFound)).unwrap();
    assert!(up.need().is_some());
    assert_eq!(up.poll(Instant(1), &mut out), Ok(Poll::Wait(Instant(u64::MAX))));
    assert_eq!(
        up.handle(Instant(2), Message::Error(ErrorCode::Timeout)),
        Err(SessionError::Peer(ErrorCode::Timeout))
    );
    let mut down: DownloadSession<'_, Tree, Vec<u8>, Vec<u8>> =
        DownloadSession::new("f", Vec::new(), Some(vec![1; 10]), [0; 8], 6, Instant(0));
    assert!(matches!(down.poll(Instant(0), &mut out), Ok(Poll::Transmit(_))));
    let info = deltasync_core::message::FileInfo {
        name: "f",
        size: 10,
        modified: 0,
        sha256: Hash::of(&[1; 10]),
        chunking: ChunkerKind::Cdc,
    };
    down.handle(Instant(1), Message::Info(info)).unwrap();
    down.handle(Instant(1), Message::ListEnd).unwrap();
    assert_eq!(down.poll(Instant(1), &mut out), Ok(Poll::Wait(Instant(u64::MAX))));
    assert_eq!(
        down.handle(Instant(2), Message::Error(ErrorCode::Timeout)),
        Err(SessionError::Peer(ErrorCode::Timeout))
    );
}
