//! The deltasync live dashboard.
