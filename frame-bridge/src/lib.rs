//! The network frame bridge: microscope frames over TCP into the shared-memory
//! frame ring. It owns the bridge's wire format ([`wire`], pure codecs,
//! `docs/protocol.md` section 4) and the receiver ([`receiver`], the
//! `rig-frame-bridge` binary's body), which writes every frame it gets into
//! the ring with the sender's frame number and stamp; it never stamps frames
//! itself on the rig clock (rigd does, from the frame-clock TTL) and never
//! depends on the daemon.
//!
//! The senders live beside it: `python/rigbridge.py` (numpy; a bounded queue
//! and a sender thread, so the acquisition call never blocks) and
//! `matlab/` (a ScanImage user function, tested in GNU Octave).

pub mod receiver;
pub mod wire;
