//! A smoltcp TCP socket as an `embedded-io` stream. Each read and write
//! polls the interface until it can make progress, so the blocking driver of
//! `deltasync-core` runs unchanged over it.

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

/// Why the socket failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpError {
    /// No progress before the timeout.
    TimedOut,
    /// The connection was closed or reset.
    Closed,
}

impl core::fmt::Display for TcpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TcpError::TimedOut => "timed out",
            TcpError::Closed => "connection closed",
        })
    }
}

impl core::error::Error for TcpError {}

impl embedded_io::Error for TcpError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            TcpError::TimedOut => embedded_io::ErrorKind::TimedOut,
            TcpError::Closed => embedded_io::ErrorKind::ConnectionReset,
        }
    }
}

/// A connected smoltcp TCP socket and what it takes to drive it.
pub struct TcpIo<'a, 'b, D: Device> {
    /// The interface.
    pub iface: &'a mut Interface,
    /// The network device.
    pub device: &'a mut D,
    /// The sockets.
    pub sockets: &'a mut SocketSet<'b>,
    /// This connection's socket.
    pub handle: SocketHandle,
    /// The clock.
    pub now: fn() -> Instant,
    /// A read or write that makes no progress for this long fails with
    /// `TimedOut` (the state machines then check their own deadlines).
    pub timeout_ms: u64,
}

impl<D: Device> TcpIo<'_, '_, D> {
    fn poll(&mut self) {
        let now = (self.now)();
        self.iface.poll(now, self.device, self.sockets);
    }

    fn deadline(&self) -> Instant {
        (self.now)() + smoltcp::time::Duration::from_millis(self.timeout_ms)
    }
}

impl<D: Device> embedded_io::ErrorType for TcpIo<'_, '_, D> {
    type Error = TcpError;
}

impl<D: Device> embedded_io::Read for TcpIo<'_, '_, D> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, TcpError> {
        let deadline = self.deadline();
        loop {
            self.poll();
            let h = self.handle;
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.can_recv() {
                return s.recv_slice(buf).map_err(|_| TcpError::Closed);
            }
            if !s.may_recv() {
                // The peer closed its side: end of stream.
                return Ok(0);
            }
            if (self.now)() >= deadline {
                return Err(TcpError::TimedOut);
            }
        }
    }
}

impl<D: Device> embedded_io::Write for TcpIo<'_, '_, D> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, TcpError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.deadline();
        loop {
            self.poll();
            let h = self.handle;
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.can_send() {
                let n = s.send_slice(buf).map_err(|_| TcpError::Closed)?;
                self.poll();
                return Ok(n);
            }
            if !s.may_send() {
                return Err(TcpError::Closed);
            }
            if (self.now)() >= deadline {
                return Err(TcpError::TimedOut);
            }
        }
    }

    fn flush(&mut self) -> Result<(), TcpError> {
        let deadline = self.deadline();
        loop {
            self.poll();
            let h = self.handle;
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.send_queue() == 0 {
                return Ok(());
            }
            if !s.may_send() {
                return Err(TcpError::Closed);
            }
            if (self.now)() >= deadline {
                return Err(TcpError::TimedOut);
            }
        }
    }
}
