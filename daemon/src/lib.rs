//! `rigd` and `rigctl`: the task engine, sessions, imaging ingest, storage,
//! preview and the control socket.
//!
//! Architecture invariant: the daemon never encodes or decodes wire bytes
//! itself; it uses the `protocol` crate for every wire.
