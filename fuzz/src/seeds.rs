//! Seed inputs, and replay of the corpora and regressions.
//!
//! Seeds are written by real client machines (`Query`, `Upload`,
//! `Download`) talking through the server_session harness itself, so that
//! a replay meets exactly the requests they answered. Each seed is checked
//! to reach what it was made for. `DELTASYNC_FUZZ_WRITE_SEEDS=1 cargo test
//! --lib` (in fuzz/) writes them to `corpus/<target>/seed-<name>`.

use crate::server_session::{self, Client, Reply};
use crate::{frame_decoder, frame_payload, message_decode, receiver};
use deltasync_core::channel::CipherKind;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::server::{Direction, Event};
use deltasync_core::conn::{ClientHandshake, Download, Query, QueryKind, Upload};
use deltasync_core::error::ErrorCode;
use deltasync_core::frame::{self, MAX_ENCODED, MAX_SEALED};
use deltasync_core::hash::Hash;
use deltasync_core::machine::{Machine, Poll};
use deltasync_core::message::{Expect, FileInfo, Message, Outcome, PartialInfo};
use deltasync_core::receiver::Base;
use deltasync_core::sender::Sender;
use deltasync_core::sim::{self, KEY};
use deltasync_core::tree::{Summary, Tree};
use deltasync_core::{Instant, PROTOCOL_VERSION};
use std::path::{Path, PathBuf};

const AUTH: u8 = 1;
const P1: u8 = 1 << 1;
const P2: u8 = 2 << 1;
const P3: u8 = 3 << 1;
const RESTRICTED: u8 = 8;
const AES: u8 = 16;
const PARTIAL: u8 = 32;

/// A server_session script (see that module for the format).
struct Script(Vec<u8>);

impl Script {
    fn new(config: u8) -> Self {
        Script(vec![config])
    }
    fn frame(&mut self, payload: &[u8]) {
        self.0.push(0);
        self.0.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_le_bytes());
        self.0.extend_from_slice(payload);
    }
    fn raw(&mut self, bytes: &[u8]) {
        self.0.push(1);
        self.0.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
    fn time(&mut self, ms: u32) {
        self.0.push(2);
        self.0.extend_from_slice(&ms.to_le_bytes());
    }
    fn piece(&mut self, b: u8) {
        self.0.extend_from_slice(&[3, b]);
    }
    fn eof(&mut self) {
        self.0.push(4);
    }
}

fn payload_of(m: &Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_ENCODED];
    let n = frame::encode(m, &mut buf).unwrap();
    frame_payload(&buf[..n]).unwrap().to_vec()
}

/// Runs a client machine against the session, recording its frames into
/// `script`; stops after `limit` frames, when it finishes, fails or stalls.
fn drive<M: Machine>(s: &mut dyn Client, script: &mut Script, m: &mut M, limit: usize) -> Option<M::Output> {
    // Smaller than a pump's (which is MAX_ENCODED less room for the tag):
    // the client then sends small `Data` frames, and seeds stay small.
    let mut buf = vec![0u8; 8 * 1024];
    let mut sent = 0;
    loop {
        loop {
            if sent == limit {
                return None;
            }
            match m.poll(s.now(), &mut buf) {
                Ok(Poll::Transmit(n)) => {
                    let p = frame_payload(&buf[..n]).unwrap().to_vec();
                    script.frame(&p);
                    s.send_frame(&p);
                    sent += 1;
                    if !s.settle(false) {
                        return None;
                    }
                }
                Ok(Poll::Wait(_)) => break,
                Ok(Poll::Done(o)) => return Some(o),
                Err(_) => return None,
            }
        }
        let inbox = s.take_inbox();
        if inbox.is_empty() {
            return None;
        }
        for p in inbox {
            if m.handle(s.now(), Message::decode(&p).unwrap()).is_err() {
                return None;
            }
        }
    }
}

fn query(s: &mut dyn Client, script: &mut Script, kind: QueryKind<'_>) {
    let mut q = Query::new(kind, PROTOCOL_VERSION, |_| {}, s.now());
    drive(s, script, &mut q, usize::MAX);
}

fn upload(
    s: &mut dyn Client,
    script: &mut Script,
    name: &str,
    data: &[u8],
    offer: impl Fn(Summary) -> Summary,
) {
    upload_limited(s, script, name, data, offer, None, usize::MAX);
}

fn upload_limited(
    s: &mut dyn Client,
    script: &mut Script,
    name: &str,
    data: &[u8],
    offer: impl Fn(Summary) -> Summary,
    expect: Option<Expect>,
    limit: usize,
) -> Option<Outcome> {
    let kind = ChunkerKind::for_size(data.len() as u64);
    let tree = Tree::build(data, kind);
    let summary = offer(tree.summary());
    let sender = Sender::new(&tree, data, summary, s.salt(), s.now()).compress(true);
    let mut op = Upload::new(name, sender);
    if let Some(e) = expect {
        op = op.expecting(e, PROTOCOL_VERSION);
    }
    let o = drive(s, script, &mut op, limit);
    if o.is_none() && op.sender().awaiting_root() && limit == usize::MAX {
        // A rootless upload stalls once its bytes are out: give the root.
        let t = tree.summary();
        op.sender_mut().set_root(t.root, t.height);
        return drive(s, script, &mut op, limit);
    }
    o
}

fn download(s: &mut dyn Client, script: &mut Script, name: &str, local: Option<&[u8]>) -> Option<Outcome> {
    let tree = local.map(|d| Tree::build(d, ChunkerKind::Cdc));
    let base = local.zip(tree.as_ref()).map(|(d, t)| Base { tree: t, source: d });
    let mut op = Download::new(name, s.salt(), base, Vec::new(), s.now());
    drive(s, script, &mut op, usize::MAX)
}

fn edited(mut v: Vec<u8>, at: usize, len: usize) -> Vec<u8> {
    let patch = sim::random_bytes(99, len);
    v[at..at + len].copy_from_slice(&patch);
    v
}

/// A recorded session: the script and what running it reported.
fn session(config: u8, f: impl FnOnce(&mut dyn Client, &mut Script)) -> Vec<u8> {
    let mut script = Script::new(config);
    server_session::with_session(config, |s| f(s, &mut script));
    script.0
}

/// Seeds of the server_session target, by name.
fn server_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    // Before authentication: the real hello (fixed ephemeral), then a frame
    // in clear where a sealed one is due.
    let mut hs = ClientHandshake::new(KEY, CipherKind::ChaChaPoly, [1u8; 32], Instant(0));
    let mut buf = vec![0u8; 256];
    let Ok(Poll::Transmit(n)) = hs.poll(Instant(0), &mut buf) else { panic!("a hello") };
    let mut s = Script::new(P1);
    s.frame(frame_payload(&buf[..n]).unwrap());
    s.frame(&payload_of(&Message::List));
    seeds.push(("hello", s.0));
    let mut s = Script::new(0);
    s.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    seeds.push(("http", s.0));
    let mut s = Script::new(0);
    let mut old = vec![0u8, 4, 1];
    old.extend_from_slice(&[0x55; 32]);
    s.frame(&old);
    seeds.push(("old-hello", s.0));

    seeds.push((
        "queries",
        session(AUTH | P2, |c, s| {
            query(c, s, QueryKind::List);
            query(c, s, QueryKind::ListAll);
            query(c, s, QueryKind::Stat("a"));
            query(c, s, QueryKind::Delete("empty"));
            query(c, s, QueryKind::Stat("nope/x"));
        }),
    ));
    seeds.push((
        "restricted",
        session(AUTH | P3 | RESTRICTED | AES, |c, s| {
            query(c, s, QueryKind::List);
            download(c, s, "dir/log", None);
        }),
    ));
    seeds.push((
        "download-delta",
        session(AUTH | P2, |c, s| {
            let local = edited(sim::random_bytes(2, 100_000), 40_000, 3_000);
            download(c, s, "dir/b", Some(&local));
        }),
    ));
    seeds.push((
        "download-zstd",
        session(AUTH | P3, |c, s| {
            download(c, s, "dir/log", None);
        }),
    ));
    seeds.push((
        "upload-new",
        session(AUTH | P1, |c, s| upload(c, s, "new/file", &sim::random_bytes(5, 12_000), |o| o)),
    ));
    seeds.push((
        "upload-delta",
        session(AUTH | P2, |c, s| {
            let data = edited(sim::random_bytes(2, 100_000), 10_000, 500);
            upload(c, s, "dir/b", &data, |o| o);
        }),
    ));
    seeds.push((
        "upload-rootless",
        session(AUTH | P1, |c, s| {
            let rootless =
                |o: Summary| Summary { root: Hash::UNKNOWN, height: 0, file_hash: Hash::UNKNOWN, ..o };
            upload(c, s, "fresh", &sim::log_lines(6, 30_000), rootless);
        }),
    ));
    seeds.push((
        "upload-if",
        session(AUTH | P2, |c, s| {
            let data = edited(sim::random_bytes(1, 10_000), 100, 50);
            let stored = Hash::of(&sim::random_bytes(1, 10_000));
            // Expecting another version, then none: refused; then the one stored.
            upload_limited(c, s, "a", &data, |o| o, Some(Expect::Match(Hash::of(&data))), usize::MAX);
            upload_limited(c, s, "a", &data, |o| o, Some(Expect::Absent), usize::MAX);
            upload_limited(c, s, "a", &data, |o| o, Some(Expect::Match(stored)), usize::MAX);
        }),
    ));
    seeds.push((
        "upload-hashless",
        session(AUTH | P2, |c, s| {
            let data = edited(sim::random_bytes(1, 10_000), 100, 50);
            upload(c, s, "a", &data, |o| Summary { file_hash: Hash::UNKNOWN, ..o });
        }),
    ));
    seeds.push((
        "partial-resume",
        session(AUTH | P2 | PARTIAL, |c, s| {
            let data = sim::random_bytes(7, 30_000);
            upload_limited(c, s, "big", &data, |o| o, None, 3);
            // The server gives up on the quiet client and keeps a partial;
            // the client connects again and resumes.
            s.time(31_000);
            c.advance(31_000);
            assert!(!c.settle(false), "the server times out");
            c.reconnect();
            // Listed and described as an interrupted upload.
            query(c, s, QueryKind::ListAll);
            query(c, s, QueryKind::Stat("big"));
            upload(c, s, "big", &data, |o| o);
        }),
    ));
    seeds.push((
        "timeout",
        session(AUTH | P1, |c, s| {
            query(c, s, QueryKind::List);
            s.time(30_001);
            c.advance(30_001);
            assert!(!c.settle(false));
            c.reconnect();
            query(c, s, QueryKind::Stat("a"));
        }),
    ));
    seeds.push((
        "tree",
        session(AUTH | P2, |c, s| {
            use deltasync_core::conn::batch::{Batch, Listings};
            use deltasync_core::conn::put::{PutBatch, PutFile};
            use deltasync_core::message::{EntryKind, Meta};
            use deltasync_core::plan::Op;
            let dirs = ["", "dir", "nope"];
            let mut l = Listings::new(&dirs, PROTOCOL_VERSION, |_, _| {}, c.now());
            drive(c, s, &mut l, usize::MAX);
            let meta = Meta { modified: 1_600_000_000, nanos: 2, mode: 0o640 };
            let b = sim::random_bytes(2, 100_000);
            let ops = vec![
                Op::MakeDir { name: "new".into(), meta },
                Op::Copy { from: "dir/b".into(), sha256: Hash::of(&b), to: "new/b".into(), meta },
                Op::Copy { from: "a".into(), sha256: Hash::of(&b), to: "new/a".into(), meta },
                Op::SetMeta { name: "a".into(), meta, kind: EntryKind::File },
                Op::Delete { name: "nope".into(), kind: EntryKind::File },
            ];
            let mut batch = Batch::new(ops, PROTOCOL_VERSION, |_, _| {}, c.now());
            drive(c, s, &mut batch, usize::MAX);
            let file = |name: &str, data: Vec<u8>, base| PutFile {
                name: name.into(),
                kind: ChunkerKind::for_size(data.len() as u64),
                data,
                meta,
                base,
            };
            let files = vec![
                file("dir/b", edited(b, 30_000, 2_000), true),
                file("new/c", sim::log_lines(3, 20_000), false),
                file("new/empty", Vec::new(), false),
            ];
            let mut puts = PutBatch::new(files, c.salt(), PROTOCOL_VERSION, true, |_, _| {}, c.now());
            drive(c, s, &mut puts, usize::MAX);
            let names = ["new/c", "nope", "a"];
            let outs: Vec<Vec<u8>> = vec![Vec::new(); 3];
            let mut fetches = deltasync_core::conn::fetch::FetchBatch::new(
                &names,
                outs,
                PROTOCOL_VERSION,
                |_, _| {},
                c.now(),
            );
            drive(c, s, &mut fetches, usize::MAX);
        }),
    ));
    seeds.push((
        "pieces-eof",
        session(AUTH | P1, |c, s| {
            s.piece(6);
            c.run(crate::Input::new(&[3, 6]));
            upload(c, s, "small", &sim::random_bytes(8, 3_000), |o| o);
            s.eof();
        }),
    ));
    seeds
}

/// Seeds of the receiver target.
fn receiver_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // flags, kind, seed, half-length (u16 LE), edits...
    fn head(flags: u8, kind: u8, seed: u8, half: u16, edits: &[(u8, u32, u16)]) -> Vec<u8> {
        let mut v = vec![flags, kind, seed];
        v.extend_from_slice(&half.to_le_bytes());
        v.push(edits.len() as u8);
        for &(op, at, len) in edits {
            v.push(op);
            v.extend_from_slice(&at.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
        }
        v
    }
    let mut seeds = Vec::new();
    seeds.push(("fresh", head(0, 0, 1, 10_000, &[])));
    let mut v = head(1, 1, 2, 30_000, &[(0, 5_000, 100), (1, 40_000, 3_000)]);
    v.extend_from_slice(&[0, 0, 0, 6]);
    seeds.push(("delta-fixed", v));
    seeds.push(("hashless", head(3, 0, 3, 20_000, &[(2, 12_345, 4_000)])));
    let mut v = head(5, 3, 4, 40_000, &[(0, 1, 9)]);
    v.extend_from_slice(&[6, 4, 100, 0, 0, 0, 5, 6]);
    seeds.push(("rootless", v));
    seeds.push(("zstd-background", head(0x31, 0, 5, 8_000, &[(3, 9_000, 0)])));
    let mut v = head(9, 0, 6, 5_000, &[(0, 10, 10)]);
    v.push(32 | 64);
    seeds.push(("claims-old", v));
    seeds.push(("base-cdc", head(0x41, 2, 7, 16_000, &[(1, 0, 700)])));
    seeds.push(("empty", head(0, 0, 8, 0, &[])));
    let mut v = head(1, 0, 9, 20_000, &[(0, 20_000, 64)]);
    let entries =
        payload_of(&Message::Entries { level: 0, start: 0, offset: 0, last: true, packed: &[1; 9] });
    v.push(1);
    v.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    v.extend_from_slice(&entries);
    v.extend_from_slice(&[2, 3, 0, 0xff, 3, 4]);
    v.extend_from_slice(&40_000u32.to_le_bytes());
    seeds.push(("meddled", v));
    seeds.push(("deltas-edits", head(0x81, 0, 10, 30_000, &[(0, 20_000, 1), (0, 45_000, 2)])));
    seeds.push(("deltas-append", head(0x81, 0, 11, 30_000, &[(1, 60_000, 900)])));
    let mut v = head(0x81, 0, 12, 20_000, &[(0, 30_000, 3)]);
    let pieces = payload_of(&Message::Pieces { offset: 24_000, last: true, packed: &[3; 9] });
    v.extend_from_slice(&[0, 0, 0, 1]);
    v.extend_from_slice(&(pieces.len() as u16).to_le_bytes());
    v.extend_from_slice(&pieces);
    seeds.push(("deltas-meddled", v));
    seeds
}

fn every_message() -> Vec<Vec<u8>> {
    let h = Hash([7; 32]);
    let s = Summary { size: 300, root: h, height: 2, file_hash: h, chunking: ChunkerKind::Fixed(4096) };
    let info = FileInfo { name: "a/b", size: 3, modified: 4, sha256: h, chunking: ChunkerKind::CdcScaled(2) };
    [
        Message::Hello { version: 5, cipher: CipherKind::ChaChaPoly, key: *b"simulkey", noise: &[1; 49] },
        Message::Accept { noise: &[2; 56] },
        Message::RetiredAuth,
        Message::RetiredWelcome,
        Message::List,
        Message::Stat { name: "a" },
        Message::Upload { name: "f", offer: s },
        Message::Download { name: "dir/f" },
        Message::Delete { name: "f" },
        Message::Info(info),
        Message::ListEnd,
        Message::Deleted,
        Message::Error(ErrorCode::Tampered),
        Message::Offer(s),
        Message::GetChildren { level: 2, index: 1, count: 3 },
        Message::Entries {
            level: 1,
            start: 2,
            offset: 4096,
            last: true,
            packed: &[9, 9, 9, 9, 9, 9, 9, 9, 0x80, 0x20],
        },
        Message::GetData { offset: 10, len: 300 },
        Message::Data { offset: 10, bytes: &[5; 40] },
        Message::Done { outcome: Outcome::Written, file_hash: Some(h) },
        Message::DataZ { offset: 0, raw: 5, bytes: &[0x28, 0xb5, 0x2f, 0xfd] },
        Message::Root { root: h, height: 3 },
        Message::UploadIf { name: "f", offer: s, expect: Expect::Match(h) },
        Message::ListAll,
        Message::Partial(PartialInfo { name: "a/b", size: 3, modified: 4 }),
        Message::Replaced,
        Message::GetSuffix { offset: 4096, len: 5000, have: 1000, id: 0x0102_0304_0506_0708 },
        Message::GetPieces { offset: 4096, len: 3000 },
        Message::Pieces { offset: 4096, last: false, packed: &[9, 9, 9, 9, 9, 9, 9, 9, 0x80, 0x02] },
        Message::GetFine { offset: 4096, len: 700 },
        Message::Fine { packed: &[9, 9, 9, 9, 40, 8, 8, 8, 8, 16] },
        Message::GetPiecesV2 { offset: 4096, len: 3000 },
        Message::GetChildrenV2 { level: 2, index: 1, count: 3 },
    ]
    .iter()
    .map(payload_of)
    .collect()
}

/// Seeds of the frame_decoder target.
fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let head = |cap: u16, pieces: &[u8]| {
        let mut v = cap.to_le_bytes().to_vec();
        v.push(pieces.len() as u8);
        v.extend_from_slice(pieces);
        v
    };
    let mut stream = Vec::new();
    let mut buf = vec![0u8; MAX_ENCODED];
    let data = sim::random_bytes(1, 3_000);
    for m in [
        Message::List,
        Message::Stat { name: "a/b" },
        Message::Data { offset: 9, bytes: &data },
        Message::Done { outcome: Outcome::Written, file_hash: None },
    ] {
        let n = frame::encode(&m, &mut buf).unwrap();
        stream.extend_from_slice(&buf[..n]);
    }
    let mut seeds = Vec::new();
    let mut v = head(MAX_SEALED as u16, &[0, 6, 199]);
    v.extend_from_slice(&stream);
    seeds.push(("messages", v));
    let mut v = head(100, &[2]);
    v.extend_from_slice(&stream[..10]);
    v.extend_from_slice(&[0xff, 0xff, 0x7f]);
    seeds.push(("too-long", v));
    let mut v = head(3, &[]);
    v.extend_from_slice(&[0, 0, 1, 4, 3, 1, 2, 3, 0x80, 0x80, 0x80, 0x01]);
    seeds.push(("tiny-cap", v));
    let mut v = head(4000, &[0]);
    v.extend_from_slice(&stream[..stream.len() - 5]);
    seeds.push(("truncated", v));
    seeds
}

/// Named inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

fn all_seeds() -> Vec<(&'static str, Seeds)> {
    let named = |v: Vec<(&'static str, Vec<u8>)>| v.into_iter().map(|(n, d)| (n.to_string(), d)).collect();
    let messages =
        every_message().into_iter().enumerate().map(|(i, d)| (format!("variant-{i:02}"), d)).collect();
    vec![
        ("frame_decoder", named(frame_seeds())),
        ("message_decode", messages),
        ("server_session", named(server_seeds())),
        ("receiver", named(receiver_seeds())),
    ]
}

fn run_target(target: &str, data: &[u8]) {
    match target {
        "frame_decoder" => frame_decoder::run(data),
        "message_decode" => message_decode::run(data),
        "server_session" => drop(server_session::run(data)),
        "receiver" => drop(receiver::run(data)),
        _ => panic!("no target {target}"),
    }
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn seeds_reach_what_they_were_made_for() {
    let write = std::env::var_os("DELTASYNC_FUZZ_WRITE_SEEDS").is_some();
    for (target, seeds) in all_seeds() {
        for (name, data) in seeds {
            run_target(target, &data);
            if write {
                let dir = fuzz_dir().join("corpus").join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{name}")), &data).unwrap();
            }
        }
    }
    let get = |name: &str| server_seeds().into_iter().find(|s| s.0 == name).unwrap().1;
    let written = |r: &server_session::Report, name: &str| {
        r.events.iter().any(|e| {
            matches!(e, Event::Finished { name: n, direction: Direction::Upload, outcome: Outcome::Written, .. } if n == name)
        })
    };
    let hello = server_session::run(&get("hello"));
    assert_eq!(hello.replies.first(), Some(&Reply::Accept), "{hello:?}");
    assert!(hello.end.as_deref().unwrap_or("").contains("Tampered"), "{hello:?}");
    let old = server_session::run(&get("old-hello"));
    assert_eq!(old.replies, [Reply::Error(ErrorCode::VersionMismatch)]);
    let q = server_session::run(&get("queries"));
    assert!(q.replies.contains(&Reply::ListEnd) && q.replies.contains(&Reply::Deleted), "{q:?}");
    assert!(q.replies.contains(&Reply::Error(ErrorCode::NotFound)), "{q:?}");
    let r = server_session::run(&get("restricted"));
    assert!(r.replies.contains(&Reply::Data), "{r:?}");
    for name in ["download-delta", "download-zstd"] {
        let r = server_session::run(&get(name));
        assert!(r.replies.contains(&Reply::Offer) && r.replies.contains(&Reply::Data), "{name}: {r:?}");
        assert!(
            r.events.iter().any(|e| matches!(
                e,
                Event::Finished { direction: Direction::Download, outcome: Outcome::Written, .. }
            )),
            "{name}: {r:?}"
        );
    }
    for (seed, name) in [
        ("upload-new", "new/file"),
        ("upload-delta", "dir/b"),
        ("upload-rootless", "fresh"),
        ("upload-hashless", "a"),
        ("upload-if", "a"),
        ("partial-resume", "big"),
        ("pieces-eof", "small"),
    ] {
        let r = server_session::run(&get(seed));
        assert!(written(&r, name), "{seed}: {r:?}");
    }
    let r = server_session::run(&get("tree"));
    for name in ["dir/b", "new/c", "new/empty"] {
        assert!(written(&r, name), "tree: {name}: {r:?}");
    }
    assert!(r.events.iter().any(|e| matches!(e, Event::Copied { to, .. } if to == "new/b")), "{r:?}");
    assert!(
        r.events.iter().any(|e| matches!(e, Event::Started { name, base: true, .. } if name == "dir/b")),
        "{r:?}"
    );
    assert!(r.replies.contains(&Reply::Error(ErrorCode::Conflict)), "the wrong copy is refused: {r:?}");
    assert!(
        r.events.iter().any(|e| matches!(
            e,
            Event::Finished { name, direction: Direction::Download, outcome: Outcome::Written, .. } if name == "new/c"
        )),
        "fetched: {r:?}"
    );
    let r = server_session::run(&get("partial-resume"));
    assert!(
        r.events.iter().any(|e| matches!(e, Event::Started { name, base: true, .. } if name == "big")),
        "the resumed upload reuses the partial: {r:?}"
    );
    assert!(r.replies.contains(&Reply::Partial), "listed and described: {r:?}");
    let r = server_session::run(&get("upload-if"));
    assert_eq!(r.replies.iter().filter(|r| **r == Reply::Error(ErrorCode::Conflict)).count(), 2, "{r:?}");
    let r = server_session::run(&get("timeout"));
    assert!(r.replies.contains(&Reply::Info), "a second connection after the timeout: {r:?}");

    let rx = |name: &str| receiver::run(&receiver_seeds().into_iter().find(|s| s.0 == name).unwrap().1);
    for name in ["fresh", "delta-fixed", "hashless", "rootless", "zstd-background", "base-cdc", "empty"] {
        let r = rx(name);
        assert_eq!(r.outcome, Some(Outcome::Written), "{name}: {r:?}");
    }
    assert!(rx("delta-fixed").reused > 0);
    assert_eq!(rx("claims-old").outcome, Some(Outcome::Unchanged));
    assert!(rx("meddled").error.is_some());
}

/// Every file under `corpus/<target>/` and `regressions/<target>/` runs
/// through its harness without a panic (all are run; the failures listed).
#[test]
fn corpus_and_regressions_replay() {
    let mut failed = Vec::new();
    for sub in ["corpus", "regressions"] {
        for (target, _) in all_seeds() {
            let dir = fuzz_dir().join(sub).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                if !replay(target, f) {
                    failed.push(f.display().to_string());
                }
            }
        }
    }
    assert!(failed.is_empty(), "inputs that panicked:\n{}", failed.join("\n"));
}

fn replay(target: &str, file: &Path) -> bool {
    let data = std::fs::read(file).unwrap();
    std::panic::catch_unwind(|| run_target(target, &data)).is_ok()
}
