//! The host side of the rig's microcontroller: the serial link (open,
//! handshake, heartbeat, reconnect), clock sync onto the rig clock, the
//! real-time settings of the latency path, and (in `firmware/`) the firmware
//! source itself. It never contains task logic, and it does not simulate the
//! rig (that is `rig-sim`) nor touch the shared-memory frame ring (that is
//! `frame-ring`).
//!
//! Architecture invariant: no task logic lives here; this crate moves samples,
//! events and commands and puts them on one clock.

pub mod clock;
pub mod link;
pub mod rt;
pub mod sync;
