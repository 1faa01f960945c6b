//! The live preview page: a small read-only web server (axum, HTTP/1.1) that
//! serves one page (plain JS + canvas, all assets embedded) and streams what
//! [`PreviewState`] holds to it over Server-Sent Events.
//!
//! Routes (all `GET`; other methods get 405, other paths 404):
//! * `/` — the page; `/?poll=1` makes it poll `/api/state` instead of SSE.
//! * `/page.js`, `/page.css` — its assets.
//! * `/events` — SSE: a full snapshot first (`"reset": true`), then every
//!   [`server::TICK`] what is new (lever points, trials, dF/F rows, lick
//!   onsets, motion bins, the task state, health;
//!   ROIs and the mean image when they change).
//! * `/api/state` — the full snapshot as JSON.
//! * `/metrics` — the daemon's counters for Prometheus ([`crate::metrics`]).

mod outline;
mod server;
mod state;

pub use outline::{roi_contour, roi_outlines};
pub use server::{
    bind_listener, serve, serve_listener, start_preview, PreviewError, PreviewHandle, LIMITS,
    MAX_CONNECTIONS, TICK,
};
pub use state::{
    page_image, Cursor, DffRow, Health, MeanImage, MotionBin, PreviewState, RigCounters, RigMark,
    Rois, SessionView, TaskStateView, TrialEvent, Update, DFF_BIN_US, DFF_WINDOW_US, LEVER_BIN_US,
    LEVER_WINDOW_US, LICK_WINDOW_US, MAX_IMAGE_SIDE, MAX_LICKS_KEPT, MAX_ROIS_SENT,
    MAX_TRIALS_KEPT, MOTION_BIN_US,
};
