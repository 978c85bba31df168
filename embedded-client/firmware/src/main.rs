//! deltasync device firmware for QEMU's `mps2-an386` (Cortex-M4F with an
//! SMSC LAN9118): keeps a sensor log in a 16 KiB [`LogStore`] and pushes it
//! to a deltasync server three times over smoltcp TCP, each time on a new
//! connection, printing one `SYNC` line per push on the semihosting console.
//!
//! The run is deterministic apart from nonces and timing: 200 records, sync,
//! 20 more records, sync, sync with nothing new. std-server/tests/qemu.rs
//! boots it and checks the lines and the file the server stored.
#![no_std]
#![no_main]

mod lan9118;

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{ExceptionFrame, entry, exception};
use cortex_m_semihosting::{debug, hprintln};
use deltasync_core::channel::ClientKey;
use deltasync_core::hash::Hash;
use deltasync_embedded::log::LogStore;
use deltasync_embedded::net::TcpIo;
use deltasync_embedded::sync::{SyncReport, sync_log};
use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

// Critical-section implementation (cortex-m's single-core one) for the crates that need one.
use cortex_m as _;

/// The device's own key (`deltasync-server key add NAME --prefix devices/7
/// --write-only` prints one), fixed at build time from
/// `DELTASYNC_DEVICE_KEY`. Without it the build fails, unless the feature
/// `qemu-test-key` asks for the published test key.
const KEY: &str = match option_env!("DELTASYNC_DEVICE_KEY") {
    Some(k) => k,
    #[cfg(feature = "qemu-test-key")]
    None => QEMU_TEST_KEY,
    #[cfg(not(feature = "qemu-test-key"))]
    None => panic!(
        "set DELTASYNC_DEVICE_KEY to the device's key (or enable feature qemu-test-key for QEMU tests)"
    ),
};
/// The key QEMU test builds use (feature `qemu-test-key`): published here,
/// so it protects nothing.
#[cfg(feature = "qemu-test-key")]
const QEMU_TEST_KEY: &str =
    "dsk1-6465766963652d37-1717171717171717171717171717171717171717171717171717171717171717";
/// The name the log is stored under on the server.
const LOG_NAME: &str = "devices/7/log";
/// Bytes the log store holds.
const LOG_CAPACITY: usize = 16 * 1024;
/// Records written before the first sync, and before the second.
const FIRST_RECORDS: u32 = 200;
const MORE_RECORDS: u32 = 20;

/// mps2-an386's LAN9118 (QEMU hw/arm/mps2.c).
const LAN9118_BASE: usize = 0x4020_0000;
/// The core clock SysTick counts (QEMU's mps2 SYSCLK_FRQ).
const CORE_HZ: u32 = 25_000_000;

/// QEMU user networking: our address, its gateway, and the guestfwd address
/// that reaches the server on the host.
const DEVICE_IP: IpCidr = IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24);
const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
const SERVER: (IpAddress, u16) = (IpAddress::v4(10, 0, 2, 100), 5001);
/// First local TCP port; each sync uses the next one.
const LOCAL_PORT_BASE: u16 = 49152;

/// The TCP receive buffer, and so the window the server may fill: QEMU's
/// LAN9118 drops frames once its 10 KiB RX FIFO is full, so keep it small.
const TCP_RX: usize = 2048;
/// The TCP send buffer: data in flight towards the server.
const TCP_TX: usize = 4096;
/// Per-read/write progress timeout of the socket adapter; the protocol's own
/// idle deadline (30 s) decides when to give up.
const IO_TIMEOUT_MS: u64 = 1000;
const CONNECT_TIMEOUT_MS: u64 = 10_000;
const CLOSE_TIMEOUT_MS: u64 = 5_000;

/// Milliseconds since boot, counted by the SysTick exception.
static MILLIS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    MILLIS.fetch_add(1, Ordering::Relaxed);
}

fn millis() -> u64 {
    u64::from(MILLIS.load(Ordering::Relaxed))
}

fn net_now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_millis(millis() as i64)
}

/// The socket buffers, in one named static (see scripts/firmware.sh's size report).
struct NetBuffers {
    tcp_rx: [u8; TCP_RX],
    tcp_tx: [u8; TCP_TX],
}

/// Why the run failed.
enum Failure {
    Init(lan9118::InitError),
    Connect(u32, &'static str),
    Sync(u32, deltasync_embedded::sync::SyncError<deltasync_embedded::net::TcpError>),
    LogFull,
    Key,
}

// Display rather than a derived Debug: string Debug would pull core's
// Unicode escaping tables into flash.
impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Init(e) => write!(f, "init: {e}"),
            Failure::Connect(n, why) => write!(f, "sync {n}: connect to 10.0.2.100:5001: {why}"),
            Failure::Sync(n, e) => write!(f, "sync {n}: {e:?}"),
            Failure::LogFull => f.write_str("a record is larger than the log store"),
            Failure::Key => f.write_str("DELTASYNC_DEVICE_KEY is not a deltasync key (dsk1-...)"),
        }
    }
}

/// A `&'static mut` to a static whose initial value is built at compile time
/// (so it sits in .bss and never passes through the stack, unlike
/// `cortex_m::singleton!`); panics if the same one is taken twice.
macro_rules! take_static {
    ($name:ident: $ty:ty = $init:expr) => {{
        static mut $name: $ty = $init;
        static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        assert!(!TAKEN.swap(true, Ordering::AcqRel), concat!(stringify!($name), " taken twice"));
        // SAFETY: the flag above lets this reference be created only once.
        unsafe { &mut *(&raw mut $name) }
    }};
}

#[entry]
fn main() -> ! {
    match run() {
        Ok(()) => {
            hprintln!("DONE");
            debug::exit(debug::EXIT_SUCCESS);
        }
        Err(e) => {
            hprintln!("ERROR {}", e);
            debug::exit(debug::EXIT_FAILURE);
        }
    }
    halt()
}

/// Where a run ends if nothing handled the semihosting exit request (no
/// QEMU, no debugger): sleep for good.
fn halt() -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}

fn run() -> Result<(), Failure> {
    let mut cp = cortex_m::Peripherals::take().expect("core peripherals taken twice");
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(CORE_HZ / 1000 - 1);
    cp.SYST.clear_current();
    cp.SYST.enable_counter();
    cp.SYST.enable_interrupt();

    let log = take_static!(LOG_STORE: LogStore<LOG_CAPACITY> = LogStore::new());
    let frames = take_static!(ETH_FRAMES: lan9118::Buffers = lan9118::Buffers::new());
    let net = take_static!(NET_BUFFERS: NetBuffers = NetBuffers { tcp_rx: [0; TCP_RX], tcp_tx: [0; TCP_TX] });
    let storage = take_static!(SOCKET_STORAGE: [SocketStorage<'static>; 1] = [SocketStorage::EMPTY]);

    // SAFETY: the LAN9118's registers are at this address on mps2-an386 and
    // only this driver touches them.
    let mut eth = unsafe { lan9118::Lan9118::new(LAN9118_BASE, frames) }.map_err(Failure::Init)?;
    let mac = eth.mac_address().map_err(Failure::Init)?;
    hprintln!(
        "BOOT lan9118 id={:#010x} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} stack={}",
        eth.id_rev(),
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        stack_peak()
    );

    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = u64::from(cortex_m::peripheral::SYST::get_current()) ^ 0x5eed_0000_d5c0_0007;
    let mut iface = Interface::new(config, &mut eth, net_now());
    iface.update_ip_addrs(|addrs| {
        addrs.push(DEVICE_IP).expect("one address fits");
    });
    iface.routes_mut().add_default_ipv4_route(GATEWAY).expect("one route fits");
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(&mut net.tcp_rx[..]),
        tcp::SocketBuffer::new(&mut net.tcp_tx[..]),
    );
    // Frames are written whole by the protocol driver; don't hold the tail back.
    socket.set_nagle_enabled(false);
    let handle = sockets.add(socket);

    let key = ClientKey::parse(KEY).map_err(|_| Failure::Key)?;
    let mut sensor = Sensor::new();
    let mut link = Link { iface: &mut iface, eth: &mut eth, sockets: &mut sockets, handle, key };
    let rounds: [u32; 3] = [FIRST_RECORDS, MORE_RECORDS, 0];
    for (i, &records) in rounds.iter().enumerate() {
        let n = i as u32 + 1;
        let mut appended = 0usize;
        for _ in 0..records {
            let line = sensor.next_record();
            log.append(line.as_bytes()).map_err(|_| Failure::LogFull)?;
            appended += line.len + 1;
        }
        let start = millis();
        let report = link.sync(n, log.as_bytes())?;
        print_sync(n, &report, appended, millis() - start, log.as_bytes());
    }
    hprintln!("STACK peak={} rx_dropped={}", stack_peak(), link.eth.rx_dropped);
    Ok(())
}

/// `SYNC n ...`: what std-server/tests/qemu.rs parses (keep the keys stable).
fn print_sync(n: u32, r: &SyncReport, appended: usize, ms: u64, log: &[u8]) {
    hprintln!(
        "SYNC {} outcome={:?} wire={} literal={} log={} appended={} sent={} received={} ms={} stack={} sha256={}",
        n,
        r.outcome,
        r.wire_sent + r.wire_received,
        r.literal_bytes,
        r.log_bytes,
        appended,
        r.wire_sent,
        r.wire_received,
        ms,
        stack_peak(),
        Hash::of(log).to_hex()
    );
}

/// The network stack, one TCP socket reused for every connection.
struct Link<'a, 'b> {
    iface: &'a mut Interface,
    eth: &'a mut lan9118::Lan9118,
    sockets: &'a mut SocketSet<'b>,
    handle: smoltcp::iface::SocketHandle,
    /// The device's key.
    key: ClientKey,
}

impl<'b> Link<'_, 'b> {
    fn poll(&mut self) {
        self.iface.poll(net_now(), self.eth, self.sockets);
    }

    fn socket(&mut self) -> &mut tcp::Socket<'b> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// Opens a connection, syncs `log` over it, and closes it. (Not inlined:
    /// keeps its large frame, mostly `sync_log`'s, apart in stack reports.)
    #[inline(never)]
    fn sync(&mut self, n: u32, log: &[u8]) -> Result<SyncReport, Failure> {
        let port = LOCAL_PORT_BASE + n as u16;
        let handle = self.handle;
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, SERVER, port)
            .map_err(|_| Failure::Connect(n, "the socket cannot connect"))?;
        let deadline = millis() + CONNECT_TIMEOUT_MS;
        loop {
            self.poll();
            let s = self.socket();
            if s.may_send() {
                break;
            }
            if !s.is_open() {
                return Err(Failure::Connect(n, "connection refused"));
            }
            if millis() >= deadline {
                return Err(Failure::Connect(n, "timed out"));
            }
        }
        let result = {
            let mut io = TcpIo {
                iface: &mut *self.iface,
                device: &mut *self.eth,
                sockets: &mut *self.sockets,
                handle,
                now: net_now,
                timeout_ms: IO_TIMEOUT_MS,
            };
            sync_log(&mut io, &self.key, LOG_NAME, log, ephemeral(&self.key, n), || {
                deltasync_core::Instant(millis())
            })
        };
        self.close();
        result.map_err(|e| Failure::Sync(n, e))
    }

    /// Closes gracefully (FIN both ways) if the peer plays along within
    /// [`CLOSE_TIMEOUT_MS`], else resets; either way the socket is reusable.
    fn close(&mut self) {
        self.socket().close();
        let deadline = millis() + CLOSE_TIMEOUT_MS;
        while self.socket().is_open() && millis() < deadline {
            self.poll();
        }
        if self.socket().is_open() {
            self.socket().abort();
            self.poll();
        }
    }
}

/// The session's X25519 ephemeral private key: the device secret, the sync
/// number, the clock and SysTick's sub-millisecond count, hashed, so that
/// nobody without the secret can predict it. mps2-an386 has no hardware
/// random number generator; a board that has one feeds it here instead
/// (with this derivation, whoever later learns the device secret and
/// recorded a session could recompute its ephemeral key).
fn ephemeral(key: &ClientKey, n: u32) -> [u8; 32] {
    let mut seed = [0u8; 48];
    seed[..32].copy_from_slice(&key.secret);
    seed[32..36].copy_from_slice(&n.to_le_bytes());
    seed[36..44].copy_from_slice(&millis().to_le_bytes());
    seed[44..].copy_from_slice(&cortex_m::peripheral::SYST::get_current().to_le_bytes());
    Hash::of(&seed).0
}

/// The deterministic sensor: readings from a fixed-seed xorshift32.
struct Sensor {
    rng: u32,
    seq: u32,
}

/// One record, built without `format!`.
struct Line {
    buf: [u8; 64],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    /// `v` in decimal, zero-padded to `width` digits.
    fn num(&mut self, mut v: u32, width: usize) {
        let mut digits = [b'0'; 10];
        let mut i = digits.len();
        while v > 0 || i == digits.len() {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        let start = i.min(digits.len() - width);
        self.push(&digits[start..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Sensor {
    fn new() -> Self {
        Sensor { rng: 0x2545_f491, seq: 0 }
    }

    /// `t=<secs> dev=7 temp=<18.0..26.9> seq=<n> status=<ok|warn>`.
    fn next_record(&mut self) -> Line {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        let t = self.seq * 30 + x % 30;
        let tenths = 180 + (x >> 8) % 90;
        let mut l = Line { buf: [0; 64], len: 0 };
        l.push(b"t=");
        l.num(t, 6);
        l.push(b" dev=7 temp=");
        l.num(tenths / 10, 2);
        l.push(b".");
        l.num(tenths % 10, 1);
        l.push(b" seq=");
        l.num(self.seq, 6);
        l.push(if (x >> 20) & 0xf == 0 { b" status=warn" } else { b" status=ok" });
        self.seq += 1;
        l
    }
}

/// Deepest stack use so far: cortex-m-rt's `paint-stack` fills the stack
/// region with 0xCCCCCCCC at reset; the first word from the bottom that
/// differs marks the deepest point reached.
fn stack_peak() -> usize {
    unsafe extern "C" {
        static _stack_start: u32;
        static _stack_end: u32;
    }
    let top = &raw const _stack_start as usize;
    let mut p = &raw const _stack_end as usize;
    // SAFETY: every word between the two linker symbols is RAM; reading
    // painted or stale stack words has no side effects.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == cortex_m_rt::STACK_PAINT_VALUE {
        p += 4;
    }
    top - p
}

#[exception]
unsafe fn HardFault(ef: &ExceptionFrame) -> ! {
    hprintln!("ERROR hard fault at pc={:#010x}", ef.pc());
    debug::exit(debug::EXIT_FAILURE);
    halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("ERROR panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    halt()
}
