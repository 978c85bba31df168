//! Deterministic test data (the simulation module's generator).

pub use crate::sim::random_bytes;
