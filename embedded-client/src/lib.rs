//! The no_std deltasync device client.
#![no_std]
