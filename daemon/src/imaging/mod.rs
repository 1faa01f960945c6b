//! Imaging ingest: frames from the shared-memory ring, stamped on the rig
//! clock.

pub mod analysis;
pub mod dff;
pub mod fov;
pub mod ingest;
pub mod motion;
pub mod rois;
pub mod timing;
