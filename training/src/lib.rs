//! Training across days: the mouse record (`subject`), training protocols
//! and their stage rules (`stages`), the mouse's history read from its
//! session folders (`history`), the lab's time zone (`zone`), the water
//! ledger per lab-local day (`water`), the history table and the HTML
//! report (`report`). Format and workflow: `docs/training.md`.
//!
//! Architecture invariant: a mouse's training state is derived from its
//! session folders and its `subject.toml`; there is no other mutable state
//! file, so a crash cannot corrupt it and any rig sharing the data root
//! picks it up.

pub mod fsio;
pub mod history;
pub mod reference;
pub mod report;
pub mod stages;
pub mod subject;
pub mod table;
pub mod water;
pub mod zone;

pub use history::{read_sessions, training_day, SessionRow, TrainingRecord};
pub use stages::{decide, Protocol, ProtocolError, SessionMeasures, StageDecision};
pub use subject::{Subject, SubjectError};
pub use zone::LabZone;

#[cfg(test)]
mod tests;
