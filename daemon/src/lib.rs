//! `rigd` and `rigctl`: the task engine, sessions, imaging ingest, storage,
//! preview and the control socket.
//!
//! Architecture invariant: the daemon never encodes or decodes wire bytes
//! itself; it uses the `protocol` crate for every wire.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod behaviour;
pub mod conns;
pub mod control;
pub mod imaging;
pub mod metrics;
pub mod notify;
pub mod realtime;
pub mod rig;
pub mod session;
pub mod shutdown;
pub mod storage_thread;
pub mod supervisor;
pub mod task;
pub mod training_cli;
/// `println!` that ignores a closed stdout (a pager quit, a pipe closed)
/// instead of panicking: progress output must never stop a session.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod preview;
