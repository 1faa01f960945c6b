//! The wire contracts of the rig, as types and pure codecs: the serial link to the
//! microcontroller ([`serial`]), the shared-memory frame ring the microscope writes
//! into ([`ring`]) and the experimenter's control socket ([`control`]).
//!
//! Architecture invariant: this crate does no I/O, starts no threads and reads no
//! clock. Everything here works on byte slices and values, so the firmware, a frame
//! producer in C or Python and the daemon can all be checked against it.

pub mod control;
pub mod ring;
pub mod serial;
