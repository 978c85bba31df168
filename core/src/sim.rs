//! A deterministic client <-> server simulation: in-memory pipes, a
//! simulated clock, optional splitting of reads and a cut after N bytes. Used
//! by the tests and the wire-bytes benchmark; no sockets, no threads.

use crate::access::{Access, Keys};
use crate::channel::{CipherKind, ClientKey};
use crate::chunker::ChunkerKind;
use crate::conn::ClientHandshake;
use crate::conn::server::{Published, ServerConn, Store, StoredFile};
use crate::driver::BATCH_ROOM;
use crate::driver::{DriveError, Pump, Step};
use crate::error::ErrorCode;
use crate::frame::{MAX_ENCODED, MAX_SEALED};
use crate::machine::{Machine, Poll};
use crate::message::Expect;
use crate::source::{IoFailed, Output};
use crate::tree::{Tree, TreeIndexer};
use crate::{Hash, Instant};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

/// The files of a [`MemStore`], shared with the test that inspects them.
pub type Files = Rc<RefCell<BTreeMap<String, Vec<u8>>>>;

/// An in-memory store; `finish` publishes only verified versions.
pub struct MemStore(pub Files);

/// A version being written to a [`MemStore`]. Like the real server's, it
/// accepts to index a whole version itself (here, all at once at the end).
#[derive(Debug, Default)]
pub struct MemWriter {
    data: Vec<u8>,
    index: Option<ChunkerKind>,
    /// The hash of the version stored when the writer was created.
    base: Option<Hash>,
    /// Whether the upload is conditional (on `base`).
    conditional: bool,
}

impl MemWriter {
    /// The bytes written so far.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl Output for MemWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn index_in_background(&mut self, kind: ChunkerKind) -> bool {
        self.index = Some(kind);
        true
    }
    fn finish_tree(&mut self) -> Result<Tree, IoFailed> {
        let mut ix = TreeIndexer::without_file_hash(self.index.ok_or(IoFailed)?);
        ix.feed(&self.data);
        Ok(ix.finish())
    }
}

impl Store for MemStore {
    type Reader = Vec<u8>;
    type Writer = MemWriter;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        let files = self.0.borrow();
        let Some(d) = files.get(name) else { return Ok(None) };
        let size = d.len() as u64;
        let kind = chunking.unwrap_or(ChunkerKind::for_size(size));
        Ok(kind.suits(size).then(|| (Tree::build(d, kind), d.clone())))
    }
    fn create(&mut self, name: &str, _size: u64, expect: Option<Expect>) -> Result<MemWriter, ErrorCode> {
        let base = self.0.borrow().get(name).map(|d| Hash::of(d));
        let holds = match expect {
            None => true,
            Some(Expect::Absent) => base.is_none(),
            Some(Expect::Match(h)) => base == Some(h),
        };
        if !holds {
            return Err(ErrorCode::Conflict);
        }
        Ok(MemWriter { base, conditional: expect.is_some(), ..MemWriter::default() })
    }
    fn finish(&mut self, name: &str, w: MemWriter, tree: Option<Tree>) -> Result<Published, ErrorCode> {
        let replaced = self.0.borrow().get(name).map(|d| Hash::of(d)) != w.base;
        let Some(t) = tree else { return Ok(Published { file_hash: None, replaced }) };
        let hash = Hash::of(&w.data);
        let claimed = t.summary().file_hash;
        if claimed.is_known() && claimed != hash {
            return Err(ErrorCode::Integrity);
        }
        if replaced && w.conditional {
            return Err(ErrorCode::Conflict);
        }
        self.0.borrow_mut().insert(name.to_string(), w.data);
        Ok(Published { file_hash: Some(hash), replaced })
    }
    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        Ok(self
            .0
            .borrow()
            .iter()
            .map(|(n, d)| StoredFile {
                name: n.clone(),
                size: d.len() as u64,
                modified: 0,
                sha256: Hash::of(d),
                chunking: ChunkerKind::for_size(d.len() as u64),
                ..Default::default()
            })
            .collect())
    }
    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        let f = self.0.borrow();
        let d = f.get(name).ok_or(ErrorCode::NotFound)?;
        let size = d.len() as u64;
        Ok(StoredFile {
            name: name.to_string(),
            size,
            modified: 0,
            sha256: Hash::of(d),
            chunking: ChunkerKind::for_size(size),
            ..Default::default()
        })
    }
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        self.0.borrow_mut().remove(name).map(|_| ()).ok_or(ErrorCode::NotFound)
    }
    /// Times and modes are not kept here.
    fn create_with(
        &mut self,
        name: &str,
        size: u64,
        expect: Option<Expect>,
        _meta: Option<crate::message::Meta>,
    ) -> Result<MemWriter, ErrorCode> {
        self.create(name, size, expect)
    }
    /// Directories are those the names imply.
    fn list_dir(&mut self, dir: &str) -> Result<Vec<StoredFile>, ErrorCode> {
        let entries = self.entries(dir)?;
        if entries.is_empty() && !dir.is_empty() {
            return Err(ErrorCode::NotFound);
        }
        Ok(entries)
    }
    fn copy(
        &mut self,
        from: &str,
        sha256: Hash,
        to: &str,
        _meta: crate::message::Meta,
    ) -> Result<Hash, ErrorCode> {
        let data = self.0.borrow().get(from).cloned().ok_or(ErrorCode::Conflict)?;
        if Hash::of(&data) != sha256 {
            return Err(ErrorCode::Conflict);
        }
        self.0.borrow_mut().insert(to.to_string(), data);
        Ok(sha256)
    }
}

impl MemStore {
    /// The files directly in `dir` and the directories the names below it
    /// imply, sorted.
    fn entries(&mut self, dir: &str) -> Result<Vec<StoredFile>, ErrorCode> {
        let names: Vec<String> = self.0.borrow().keys().cloned().collect();
        let mut out: BTreeMap<String, StoredFile> = BTreeMap::new();
        for name in names {
            let rest = if dir.is_empty() {
                Some(name.as_str())
            } else {
                name.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
            };
            let Some(rest) = rest else { continue };
            let entry = match rest.split_once('/') {
                Some((sub, _)) => {
                    let n = if dir.is_empty() { sub.to_string() } else { alloc::format!("{dir}/{sub}") };
                    StoredFile {
                        name: n,
                        kind: crate::message::EntryKind::Dir,
                        mode: 0o755,
                        ..Default::default()
                    }
                }
                None => self.stat(&name)?,
            };
            out.insert(entry.name.clone(), entry);
        }
        Ok(out.into_values().collect())
    }
}

/// A growable buffer.
pub type Buf = Vec<u8>;
/// A pump with heap buffers.
pub type StdPump = Pump<Buf, Buf, Buf>;

/// A pump with full-size buffers.
pub fn pump() -> StdPump {
    Pump::new(vec![0u8; 64 * 1024], vec![0u8; MAX_SEALED], vec![0u8; MAX_ENCODED + BATCH_ROOM])
}

/// The link between the two ends.
pub struct Net {
    /// Bytes in flight to the server.
    pub to_server: VecDeque<u8>,
    /// Bytes in flight to the client.
    pub to_client: VecDeque<u8>,
    /// Largest piece delivered per read (exercises reassembly).
    pub piece: usize,
    /// Stop carrying bytes after this many (both directions together) and
    /// report end of stream to both sides.
    pub cut_after: Option<u64>,
    /// Bytes carried so far.
    pub carried: u64,
    /// Flip this bit of the carried stream (both directions in the order
    /// they were carried, counted from 0), as a meddling relay would.
    pub flip_bit: Option<u64>,
    /// Every frame carried, in order: whether it went to the server, and
    /// its length on the wire.
    pub frames: Vec<(bool, u64)>,
    /// The simulated time.
    pub clock: Instant,
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Net {
    /// A perfect link.
    pub fn new() -> Self {
        Net {
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            piece: usize::MAX,
            cut_after: None,
            carried: 0,
            flip_bit: None,
            frames: Vec::new(),
            clock: Instant(0),
        }
    }
    fn cut(&self) -> bool {
        self.cut_after.is_some_and(|c| self.carried >= c)
    }
}

/// Why a simulated run stopped early.
#[derive(Debug)]
pub enum Stop {
    /// The client failed.
    Client(DriveError<()>),
    /// The server failed.
    Server(DriveError<()>),
    /// Neither side could move.
    Stalled,
    /// The client did not finish in [`MAX_TURNS`] turns although the sides
    /// kept moving: a loop.
    Endless,
}

/// Turns [`run`] and [`run_paced`] give the client to finish: far more than
/// any simulated transfer takes (one frame or batch per side and turn), so
/// that a machine that loops fails its test instead of hanging it.
pub const MAX_TURNS: usize = 1 << 22;

/// Advances one side (the client's when `to_server`) by one step over
/// `net`, recording each frame it sends; returns whether it made progress,
/// or its output when done.
fn side<M: Machine>(
    m: &mut M,
    p: &mut StdPump,
    net: &mut Net,
    to_server: bool,
) -> Result<(bool, Option<M::Output>), DriveError<()>> {
    let cut = net.cut();
    let (inbox, outbox) = if to_server {
        (&mut net.to_client, &mut net.to_server)
    } else {
        (&mut net.to_server, &mut net.to_client)
    };
    let (written, done) = match p.step::<M, ()>(m, net.clock)? {
        Step::Write(n) => (n, None),
        Step::Finish(n, o) => (n, Some(o)),
        Step::Again => return Ok((true, None)),
        Step::Done(o) => return Ok((true, Some(o))),
        Step::Read(_) => {
            if cut {
                p.filled(0);
                return Ok((true, None));
            }
            if inbox.is_empty() {
                return Ok((false, None));
            }
            let buf = p.input();
            let n = buf.len().min(inbox.len()).min(net.piece);
            for (i, b) in inbox.drain(..n).enumerate() {
                buf[i] = b;
            }
            p.filled(n);
            return Ok((true, None));
        }
    };
    let n = written;
    if !cut {
        let start = outbox.len();
        outbox.extend(p.output(n));
        if let Some(bit) = net.flip_bit
            && let Some(at) = (bit / 8).checked_sub(net.carried).filter(|&at| at < n as u64)
        {
            outbox[start + at as usize] ^= 1 << (bit % 8);
        }
        net.carried += n as u64;
        net.frames.push((to_server, n as u64));
    }
    Ok((true, done))
}

/// Runs `client` until it finishes, with `server` answering. The server's
/// failures end the run too.
/// Runs both sides for at most `rounds` turns each: the client's output
/// once it is done, `None` if it is not yet.
pub fn run_rounds<C: Machine, S: Machine>(
    client: &mut C,
    cp: &mut StdPump,
    server: &mut S,
    sp: &mut StdPump,
    net: &mut Net,
    rounds: usize,
) -> Result<Option<C::Output>, Stop> {
    for _ in 0..rounds {
        let (c_prog, done) = side(client, cp, net, true).map_err(Stop::Client)?;
        if let Some(o) = done {
            return Ok(Some(o));
        }
        let (s_prog, _) = side(server, sp, net, false).map_err(Stop::Server)?;
        if !c_prog && !s_prog {
            return Err(Stop::Stalled);
        }
    }
    Ok(None)
}

/// Runs both sides until the client is done over a slow link: `tick_ms`
/// of simulated time pass with every turn, and a side writes only while
/// fewer than `window` bytes it sent are unread (a socket's buffer), so
/// that neither runs ahead of the other.
pub fn run_paced<C: Machine, S: Machine>(
    client: &mut C,
    cp: &mut StdPump,
    server: &mut S,
    sp: &mut StdPump,
    net: &mut Net,
    window: usize,
    tick_ms: u64,
) -> Result<C::Output, Stop> {
    for _ in 0..MAX_TURNS {
        let mut progress = false;
        if net.to_server.len() < window {
            let (p, done) = side(client, cp, net, true).map_err(Stop::Client)?;
            if let Some(o) = done {
                return Ok(o);
            }
            progress |= p;
        }
        if net.to_client.len() < window {
            let (p, _) = side(server, sp, net, false).map_err(Stop::Server)?;
            progress |= p;
        }
        if !progress && net.to_server.len() < window && net.to_client.len() < window {
            return Err(Stop::Stalled);
        }
        net.clock = net.clock.plus_ms(tick_ms);
    }
    Err(Stop::Endless)
}

/// Runs both sides until the client is done.
pub fn run<C: Machine, S: Machine>(
    client: &mut C,
    cp: &mut StdPump,
    server: &mut S,
    sp: &mut StdPump,
    net: &mut Net,
) -> Result<C::Output, Stop> {
    run_rounds(client, cp, server, sp, net, MAX_TURNS)?.ok_or(Stop::Endless)
}

/// The key of the simulations' client (not secret: tests only).
pub const KEY: ClientKey = ClientKey { id: *b"simulkey", secret: [0x42; 32] };

/// The keys of a simulated server: [`KEY`] with every permission.
pub fn keys() -> Vec<(ClientKey, Access)> {
    vec![(KEY, Access::full("sim"))]
}

/// A server connection over `files` checking clients against `keys`.
pub fn server<K: Keys>(files: &Files, keys: K) -> ServerConn<MemStore, K> {
    ServerConn::new(MemStore(files.clone()), keys, [9u8; 32], Instant(0))
}

/// A client handshake with `key` (ChaCha20-Poly1305, as devices use).
pub fn handshake(key: ClientKey) -> ClientHandshake {
    ClientHandshake::new(key, CipherKind::ChaChaPoly, [1u8; 32], Instant(0))
}

/// The framed hello a client with `key` opens its session with (for tests
/// that play a client by hand: a replayed hello, a wrong key).
pub fn hello_frame(key: ClientKey) -> Vec<u8> {
    let mut out = vec![0u8; 512];
    match handshake(key).poll(Instant(0), &mut out) {
        Ok(Poll::Transmit(n)) => out.truncate(n),
        other => panic!("a handshake starts with its hello, not {other:?}"),
    }
    out
}

/// `len` reproducible pseudo-random bytes (xorshift).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// About `len` bytes (whole lines, at least `len`) of a reproducible
/// service log: timestamps that move on, levels, peers, request ids,
/// methods, paths, statuses, sizes and durations drawn at random, as text
/// the way servers write it (what compression of a real log sees).
pub fn log_lines(seed: u64, len: usize) -> Vec<u8> {
    use core::fmt::Write as _;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    const LEVELS: [&str; 10] = ["INFO "; 10];
    const PATHS: [&str; 8] = [
        "/api/v1/files",
        "/api/v1/files/reports",
        "/api/v1/upload",
        "/api/v1/sessions",
        "/healthz",
        "/metrics",
        "/api/v1/users",
        "/static/app.js",
    ];
    const METHODS: [&str; 4] = ["GET", "GET", "PUT", "POST"];
    const STATUS: [u16; 8] = [200, 200, 200, 200, 204, 304, 404, 500];
    let mut ms = 1_795_000_000_000u64 + seed % 1000;
    let mut line = String::new();
    let mut out = Vec::with_capacity(len + 200);
    while out.len() < len {
        ms += next(40);
        let (s, milli) = (ms / 1000, ms % 1000);
        let (h, m, sec) = (s / 3600 % 24, s / 60 % 60, s % 60);
        let level = match next(20) {
            0 => "WARN ",
            1 => "DEBUG",
            k => LEVELS[k as usize % LEVELS.len()],
        };
        line.clear();
        let _ = writeln!(
            line,
            "2026-11-22T{h:02}:{m:02}:{sec:02}.{milli:03}Z {level} http{{peer=10.0.{}.{}:{} req={:016x}}}: {} {}/{} -> {} ({} B, {}.{} ms)",
            next(4),
            next(256),
            32768 + next(28232),
            next(u64::MAX),
            METHODS[next(4) as usize],
            PATHS[next(8) as usize],
            next(5000),
            STATUS[next(8) as usize],
            next(200_000),
            next(300),
            next(10),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}
