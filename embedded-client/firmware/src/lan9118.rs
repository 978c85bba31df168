//! A minimal polled driver for the SMSC LAN9118 Ethernet controller as QEMU's
//! mps2 boards model it (32-bit mode, no PHY set-up needed), as a smoltcp
//! `phy::Device`. No interrupts and no DMA: frames move through the chip's
//! FIFO ports one 32-bit word at a time.

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Register offsets from the chip's base address.
mod reg {
    pub const RX_DATA_FIFO: usize = 0x00;
    pub const TX_DATA_FIFO: usize = 0x20;
    pub const RX_STATUS_FIFO: usize = 0x40;
    pub const TX_STATUS_FIFO: usize = 0x48;
    pub const ID_REV: usize = 0x50;
    pub const INT_EN: usize = 0x5c;
    pub const BYTE_TEST: usize = 0x64;
    pub const RX_CFG: usize = 0x6c;
    pub const TX_CFG: usize = 0x70;
    pub const HW_CFG: usize = 0x74;
    pub const RX_FIFO_INF: usize = 0x7c;
    pub const TX_FIFO_INF: usize = 0x80;
    pub const PMT_CTRL: usize = 0x84;
    pub const MAC_CSR_CMD: usize = 0xa4;
    pub const MAC_CSR_DATA: usize = 0xa8;
}

/// MAC registers, reached through MAC_CSR_CMD / MAC_CSR_DATA.
mod mac {
    pub const CR: u32 = 1;
    pub const ADDRH: u32 = 2;
    pub const ADDRL: u32 = 3;
    pub const CR_TXEN: u32 = 1 << 3;
    pub const CR_RXEN: u32 = 1 << 2;
    pub const CR_FDPX: u32 = 1 << 20;
}

const BYTE_TEST_VALUE: u32 = 0x8765_4321;
const HW_CFG_SRST: u32 = 1;
const PMT_CTRL_READY: u32 = 1;
const TX_CFG_TX_ON: u32 = 1 << 1;
const MAC_CSR_BUSY: u32 = 1 << 31;
const MAC_CSR_READ: u32 = 1 << 30;
const RX_STATUS_ERROR: u32 = 1 << 15;
const TX_CMD_A_FIRST_SEG: u32 = 1 << 13;
const TX_CMD_A_LAST_SEG: u32 = 1 << 12;
/// The frame check sequence the chip appends to every received frame.
const FCS_LEN: usize = 4;
/// A full Ethernet frame without FCS (1500-byte MTU + 14-byte header).
pub const FRAME_MAX: usize = 1514;
/// Room for a received frame and its FCS, rounded up to whole FIFO words.
const RX_BUF: usize = (FRAME_MAX + FCS_LEN + 3) & !3;
/// Bounded busy-waits for the chip's self-clearing bits.
const SPIN_LIMIT: u32 = 100_000;

/// Why the controller could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// BYTE_TEST did not read 0x87654321: no LAN9118 at this address.
    NotFound(u32),
    /// A reset or MAC register access did not complete.
    Stuck(&'static str),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NotFound(v) => write!(f, "no LAN9118 (BYTE_TEST read {v:#010x})"),
            InitError::Stuck(what) => write!(f, "LAN9118 stuck: {what}"),
        }
    }
}

/// The frame buffers the driver needs; kept outside the driver so the
/// firmware can place them in a named static.
pub struct Buffers {
    rx: [u8; RX_BUF],
    tx: [u8; FRAME_MAX],
}

impl Buffers {
    /// Zeroed buffers (placed in .bss).
    pub const fn new() -> Self {
        Buffers { rx: [0; RX_BUF], tx: [0; FRAME_MAX] }
    }
}

/// The chip's register block.
#[derive(Clone, Copy)]
struct Regs(usize);

impl Regs {
    fn read(self, off: usize) -> u32 {
        // SAFETY: `Lan9118::new`'s contract: `base + off` is a register of a
        // chip only this driver touches.
        unsafe { core::ptr::read_volatile((self.0 + off) as *const u32) }
    }

    fn write(self, off: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.0 + off) as *mut u32, v) }
    }

    fn spin_until(self, what: &'static str, done: impl Fn(Self) -> bool) -> Result<(), InitError> {
        for _ in 0..SPIN_LIMIT {
            if done(self) {
                return Ok(());
            }
        }
        Err(InitError::Stuck(what))
    }

    fn mac_idle(self) -> Result<(), InitError> {
        self.spin_until("MAC CSR busy", |r| r.read(reg::MAC_CSR_CMD) & MAC_CSR_BUSY == 0)
    }

    fn mac_read(self, m: u32) -> Result<u32, InitError> {
        self.mac_idle()?;
        self.write(reg::MAC_CSR_CMD, MAC_CSR_BUSY | MAC_CSR_READ | m);
        self.mac_idle()?;
        Ok(self.read(reg::MAC_CSR_DATA))
    }

    fn mac_write(self, m: u32, v: u32) -> Result<(), InitError> {
        self.mac_idle()?;
        self.write(reg::MAC_CSR_DATA, v);
        self.write(reg::MAC_CSR_CMD, MAC_CSR_BUSY | m);
        self.mac_idle()
    }

    /// Pops the next received frame into `buf`; its length without FCS, or
    /// `None` if no good frame is waiting. Returns bad frames in `dropped`.
    fn pop_frame(self, buf: &mut [u8; RX_BUF], dropped: &mut u32) -> Option<usize> {
        loop {
            // RX_FIFO_INF[23:16]: frames whose status word is waiting.
            if (self.read(reg::RX_FIFO_INF) >> 16) & 0xff == 0 {
                return None;
            }
            let status = self.read(reg::RX_STATUS_FIFO);
            // The length counts the 4-byte FCS the chip appends.
            let len = ((status >> 16) & 0x3fff) as usize;
            let keep = status & RX_STATUS_ERROR == 0 && len > FCS_LEN && len <= RX_BUF;
            // The whole frame must leave the data FIFO, even when dropped.
            for i in 0..len.div_ceil(4) {
                let w = self.read(reg::RX_DATA_FIFO).to_le_bytes();
                if keep {
                    buf[4 * i..4 * i + 4].copy_from_slice(&w);
                }
            }
            if keep {
                return Some(len - FCS_LEN);
            }
            *dropped = dropped.wrapping_add(1);
        }
    }

    /// Sends `frame` (without FCS; the chip adds it) as one single-segment packet.
    fn send_frame(self, frame: &[u8]) {
        // Discard transmit statuses: nothing here waits for them, and a full
        // status FIFO would stall a real chip.
        while (self.read(reg::TX_FIFO_INF) >> 16) & 0xff != 0 {
            let _ = self.read(reg::TX_STATUS_FIFO);
        }
        // TX_FIFO_INF[15:0]: free data FIFO space (bytes on the chip, words in
        // QEMU's model; either way a frame fits as soon as the last one left).
        let _ = self
            .spin_until("TX FIFO space", |r| (r.read(reg::TX_FIFO_INF) & 0xffff) as usize >= frame.len() + 8);
        let len = frame.len() as u32;
        // Command A: first and last segment, no offset, buffer size in [10:0];
        // command B: packet tag (unused) in [31:16], packet length in [10:0].
        self.write(reg::TX_DATA_FIFO, TX_CMD_A_FIRST_SEG | TX_CMD_A_LAST_SEG | len);
        self.write(reg::TX_DATA_FIFO, len);
        for chunk in frame.chunks(4) {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write(reg::TX_DATA_FIFO, u32::from_le_bytes(w));
        }
    }
}

/// A LAN9118 at a fixed address.
pub struct Lan9118 {
    regs: Regs,
    bufs: &'static mut Buffers,
    /// Received frames dropped because the chip flagged them or they were too long.
    pub rx_dropped: u32,
}

impl Lan9118 {
    /// Resets the chip at `base` and enables its transmitter and receiver.
    ///
    /// # Safety
    /// `base` must be the address of a LAN9118's register block that nothing
    /// else accesses while the returned driver lives.
    pub unsafe fn new(base: usize, bufs: &'static mut Buffers) -> Result<Self, InitError> {
        let regs = Regs(base);
        let test = regs.read(reg::BYTE_TEST);
        if test != BYTE_TEST_VALUE {
            return Err(InitError::NotFound(test));
        }
        regs.write(reg::HW_CFG, HW_CFG_SRST);
        regs.spin_until("soft reset", |r| r.read(reg::HW_CFG) & HW_CFG_SRST == 0)?;
        regs.spin_until("power-management ready", |r| r.read(reg::PMT_CTRL) & PMT_CTRL_READY != 0)?;
        regs.write(reg::INT_EN, 0);
        // No RX padding or offset: every frame starts on a word of its own.
        regs.write(reg::RX_CFG, 0);
        regs.write(reg::TX_CFG, TX_CFG_TX_ON);
        // Our own unicast address and broadcast only (this also leaves the
        // promiscuous mode the chip resets into).
        regs.mac_write(mac::CR, mac::CR_TXEN | mac::CR_RXEN | mac::CR_FDPX)?;
        Ok(Lan9118 { regs, bufs, rx_dropped: 0 })
    }

    /// The chip's ID_REV register (0x0118_xxxx for a LAN9118).
    pub fn id_rev(&self) -> u32 {
        self.regs.read(reg::ID_REV)
    }

    /// The station address the chip holds (QEMU's `-nic ...,mac=`, loaded
    /// from its EEPROM at reset).
    pub fn mac_address(&self) -> Result<[u8; 6], InitError> {
        let lo = self.regs.mac_read(mac::ADDRL)?.to_le_bytes();
        let hi = self.regs.mac_read(mac::ADDRH)?.to_le_bytes();
        Ok([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]])
    }
}

/// A received frame, already copied out of the chip.
pub struct RxToken<'a>(&'a [u8]);

/// Permission to send one frame, built in the driver's TX buffer.
pub struct TxToken<'a> {
    regs: Regs,
    tx: &'a mut [u8; FRAME_MAX],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let frame = &mut self.tx[..len.min(FRAME_MAX)];
        let r = f(frame);
        self.regs.send_frame(frame);
        r
    }
}

impl Device for Lan9118 {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let Buffers { rx, tx } = &mut *self.bufs;
        let len = self.regs.pop_frame(rx, &mut self.rx_dropped)?;
        Some((RxToken(&rx[..len]), TxToken { regs: self.regs, tx }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken { regs: self.regs, tx: &mut self.bufs.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        caps
    }
}
