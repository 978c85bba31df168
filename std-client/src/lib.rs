//! The deltasync client library.
