//! The host side of the rig's microcontroller: the serial link, clock sync onto
//! the rig clock, and the virtual rig that speaks the same protocol on a pty.
//!
//! Architecture invariant: no task logic lives here; this crate moves samples,
//! events and commands and puts them on one clock.

pub mod clock;
pub mod link;
pub mod rng;
pub mod rt;
pub mod shm;
pub mod sim;
pub mod sync;
