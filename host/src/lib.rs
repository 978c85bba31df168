//! deltasync-host: what the std shells (the server, the CLI, the GUI, the
//! benchmarks) share on one machine, kept out of the sans-IO core: trees
//! built from files on several threads ([`build`]), chunk hints that spare
//! re-chunking what did not change ([`hints`]), and the machine's
//! conventions: where keys and hints live, and the clock ([`local`]).

pub mod build;
pub mod hints;
pub mod local;
