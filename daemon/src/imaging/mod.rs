//! Imaging ingest: frames from the shared-memory ring, stamped on the rig
//! clock.

pub mod ingest;
pub mod timing;
