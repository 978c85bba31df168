//! Feeds the dashboard's [`Hub`] from the server's connections.

use crate::gate::Reason;
use crate::serve::Observer;
use crate::store::ServerStore;
use deltasync_core::conn::server::{Direction, Event, Progress};
use deltasync_core::driver::DriveError;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::message::Outcome;
use deltasync_dashboard::{Hub, Problem};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Publishes connections, transfers and errors to the dashboard.
pub struct LiveObserver(pub Arc<Hub>);

impl LiveObserver {
    /// An observer publishing to `hub`, which lists files from `store`.
    pub fn new<S: ServerStore>(hub: Arc<Hub>, store: S) -> LiveObserver {
        let counted = store.clone();
        hub.set_file_lister(Arc::new(move || {
            let mut s = store.clone();
            s.list().unwrap_or_default()
        }));
        hub.set_store_counters(Arc::new(move || counted.counters()));
        LiveObserver(hub)
    }
}

impl Observer for LiveObserver {
    fn connected(&self, id: u64, peer: SocketAddr) {
        self.0.connected(id, peer);
    }

    fn event(&self, id: u64, event: &Event, wire: u64) {
        let hub = &self.0;
        match event {
            Event::Authenticated { key } => hub.authenticated(id, key),
            Event::Started { name, direction, size, base } => {
                hub.started(id, name, *direction == Direction::Upload, *size, *base, wire)
            }
            Event::Finished { name, direction, size, outcome, literal_bytes, reused_bytes, wire_bytes } => {
                let result = match outcome {
                    Outcome::Written => "written",
                    Outcome::Unchanged => "unchanged",
                    Outcome::Integrity => "integrity",
                };
                let upload = *direction == Direction::Upload;
                hub.finished(
                    id,
                    name,
                    upload,
                    *size,
                    result,
                    (*literal_bytes, *reused_bytes),
                    wire,
                    *wire_bytes,
                );
            }
            Event::Refused { name, code } => hub.error(id, name, Problem::Refused(&code.to_string())),
            Event::Listed { dir } => hub.tree_listed(id, dir, wire),
            Event::Copied { to, .. } => hub.tree_file(id, to, "copied", 0),
            Event::Deleted { name } => hub.tree_file(id, name, "deleted", 0),
        }
    }

    fn progress(&self, id: u64, transfer: Option<Progress>, sent: u64, received: u64) {
        self.0.progress(id, sent, received, transfer.map(|p| p.done));
    }

    fn refused(&self, reason: Reason) {
        self.0.refused(reason.label());
    }

    fn connections(&self, open: usize, unauthenticated: usize) {
        self.0.connections(open, unauthenticated);
    }

    fn closed(&self, id: u64, error: Option<&DriveError<io::Error>>) {
        match error {
            Some(DriveError::Session(SessionError::Protocol(ErrorCode::AuthFailed))) => {
                self.0.error(id, "", Problem::AuthFailed)
            }
            Some(e) => self.0.error(id, "", Problem::Connection(&e.to_string())),
            None => {}
        }
        self.0.closed(id);
    }
}
