//! What the rig thread publishes about the running session for everyone else
//! to read: [`LiveStatus`] (counters, lock-free) and [`ClockFitCell`] (the
//! latest rig-clock fit).
//!
//! Architecture invariant: the rig thread never waits on these. Every counter
//! is a relaxed atomic; the clock fit is handed over with `try_lock` (a busy
//! cell skips one fit, the next one comes within a second); the link's detail
//! text is the only lock it takes, and only when the link changes state (never
//! per sample or per trial).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use firmware_bridge::sync::ClockFit;
use protocol::control::LinkState;

/// How many recent control latencies the status keeps.
pub const LATENCIES_KEPT: usize = 200;

const NO_T0: u64 = u64::MAX;

/// The running counters of the rig and its session. Written by the rig
/// thread, read by anyone through [`LiveStatus::snapshot`]. Fields written
/// separately may be seen a moment apart (a trial counted before its
/// reward): it is a status display, the files are the record.
#[derive(Debug)]
pub struct LiveStatus {
    link: AtomicU8,
    link_detail: Mutex<Option<String>>,
    trials: AtomicU64,
    rewards: AtomicU64,
    water_ul_bits: AtomicU64,
    rig_now_us: AtomicU64,
    t0_us: AtomicU64,
    storage_drops: AtomicU64,
    samples_lost: AtomicU64,
    /// Control latencies, µs as f64 bits, in a ring of [`LATENCIES_KEPT`].
    latencies: [AtomicU64; LATENCIES_KEPT],
    latencies_written: AtomicU64,
}

impl Default for LiveStatus {
    fn default() -> Self {
        Self {
            link: AtomicU8::new(0),
            link_detail: Mutex::new(None),
            trials: AtomicU64::new(0),
            rewards: AtomicU64::new(0),
            water_ul_bits: AtomicU64::new(0f64.to_bits()),
            rig_now_us: AtomicU64::new(0),
            t0_us: AtomicU64::new(NO_T0),
            storage_drops: AtomicU64::new(0),
            samples_lost: AtomicU64::new(0),
            latencies: std::array::from_fn(|_| AtomicU64::new(0)),
            latencies_written: AtomicU64::new(0),
        }
    }
}

/// A copy of [`LiveStatus`] at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveSnapshot {
    pub link: Option<LinkState>,
    pub link_detail: Option<String>,
    pub trials: u64,
    pub rewards: u64,
    pub water_ul: f64,
    /// Rig time of the latest sample, µs.
    pub rig_now_us: u64,
    /// Rig time of session start, µs.
    pub t0_us: Option<u64>,
    /// Records the storage thread could not take (queue full).
    pub storage_drops: u64,
    pub samples_lost: u64,
    /// Control latency of recent rewards: crossing sample -> valve open at
    /// the device, µs (oldest first, at most [`LATENCIES_KEPT`]).
    pub latencies_us: Vec<f64>,
}

fn link_code(state: Option<LinkState>) -> u8 {
    match state {
        None => 0,
        Some(LinkState::Connected) => 1,
        Some(LinkState::Lost) => 2,
        Some(LinkState::Reconnecting) => 3,
    }
}

fn link_state(code: u8) -> Option<LinkState> {
    match code {
        1 => Some(LinkState::Connected),
        2 => Some(LinkState::Lost),
        3 => Some(LinkState::Reconnecting),
        _ => None,
    }
}

impl LiveStatus {
    pub fn snapshot(&self) -> LiveSnapshot {
        let written = self.latencies_written.load(Relaxed);
        let kept = written.min(LATENCIES_KEPT as u64);
        let latencies_us = (written - kept..written)
            .map(|i| {
                f64::from_bits(self.latencies[(i % LATENCIES_KEPT as u64) as usize].load(Relaxed))
            })
            .collect();
        let t0 = self.t0_us.load(Relaxed);
        LiveSnapshot {
            link: self.link(),
            link_detail: self
                .link_detail
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default(),
            trials: self.trials.load(Relaxed),
            rewards: self.rewards.load(Relaxed),
            water_ul: f64::from_bits(self.water_ul_bits.load(Relaxed)),
            rig_now_us: self.rig_now_us(),
            t0_us: (t0 != NO_T0).then_some(t0),
            storage_drops: self.storage_drops.load(Relaxed),
            samples_lost: self.samples_lost.load(Relaxed),
            latencies_us,
        }
    }

    pub fn link(&self) -> Option<LinkState> {
        link_state(self.link.load(Relaxed))
    }

    /// Rig time of the latest sample, µs (0 before the first).
    pub fn rig_now_us(&self) -> u64 {
        self.rig_now_us.load(Relaxed)
    }

    pub fn storage_drops(&self) -> u64 {
        self.storage_drops.load(Relaxed)
    }

    /// Lever samples lost this session (index gaps in the device's stream).
    pub fn samples_lost(&self) -> u64 {
        self.samples_lost.load(Relaxed)
    }

    /// Link state changes (the rig thread, on a link event: never per sample).
    pub fn set_link(&self, state: LinkState, detail: Option<String>) {
        if let Ok(mut d) = self.link_detail.lock() {
            *d = detail;
        }
        self.link.store(link_code(Some(state)), Relaxed);
    }

    pub fn set_rig_now_us(&self, t_us: u64) {
        self.rig_now_us.store(t_us, Relaxed);
    }

    pub fn set_t0_us(&self, t_us: u64) {
        self.t0_us.store(t_us, Relaxed);
    }

    /// Zero the session's counters (a new session starts).
    pub fn reset_session(&self) {
        self.trials.store(0, Relaxed);
        self.rewards.store(0, Relaxed);
        self.water_ul_bits.store(0f64.to_bits(), Relaxed);
        self.t0_us.store(NO_T0, Relaxed);
        self.storage_drops.store(0, Relaxed);
        self.samples_lost.store(0, Relaxed);
    }

    /// Count a trial; `reward_ul` when it gave water. Returns the session's
    /// rewards and water so far.
    pub fn add_trial(&self, reward_ul: Option<f64>) -> (u64, f64) {
        self.trials.fetch_add(1, Relaxed);
        let rewards = self.rewards.load(Relaxed);
        let water = f64::from_bits(self.water_ul_bits.load(Relaxed));
        match reward_ul {
            // One writer (the rig thread): load and store cannot race.
            Some(ul) => {
                self.rewards.store(rewards + 1, Relaxed);
                self.water_ul_bits.store((water + ul).to_bits(), Relaxed);
                (rewards + 1, water + ul)
            }
            None => (rewards, water),
        }
    }

    pub fn add_latency_us(&self, latency_us: f64) {
        let i = self.latencies_written.load(Relaxed);
        self.latencies[(i % LATENCIES_KEPT as u64) as usize].store(latency_us.to_bits(), Relaxed);
        self.latencies_written.store(i + 1, Relaxed);
    }

    pub fn add_storage_drop(&self) {
        self.storage_drops.fetch_add(1, Relaxed);
    }

    pub fn add_samples_lost(&self, n: u64) {
        self.samples_lost.fetch_add(n, Relaxed);
    }
}

/// The latest fit of the host clock onto the rig clock, from the link's
/// clock sync. The rig thread publishes with [`ClockFitCell::publish`] (never
/// waits); the storage and imaging threads read with [`ClockFitCell::get`].
#[derive(Debug, Default)]
pub struct ClockFitCell(Mutex<Option<ClockFit>>);

impl ClockFitCell {
    /// Hand over a new fit unless a reader holds the cell this instant (then
    /// the next fit, a second later at most, takes its place).
    pub fn publish(&self, fit: ClockFit) -> bool {
        match self.0.try_lock() {
            Ok(mut g) => {
                *g = Some(fit);
                true
            }
            Err(_) => false,
        }
    }

    pub fn get(&self) -> Option<ClockFit> {
        self.0
            .lock()
            .map(|g| *g)
            .unwrap_or_else(|p| *p.into_inner())
    }
}

/// What the other threads read of the rig thread's live state.
#[derive(Debug, Clone, Default)]
pub struct LiveView {
    pub status: Arc<LiveStatus>,
    pub clock: Arc<ClockFitCell>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_carries_every_counter_and_the_newest_latencies_in_order() {
        let s = LiveStatus::default();
        assert_eq!(s.snapshot(), LiveSnapshot::default());
        s.set_link(LinkState::Lost, Some("unplugged".into()));
        s.set_rig_now_us(7);
        s.set_t0_us(5);
        assert_eq!(s.add_trial(Some(4.0)), (1, 4.0));
        assert_eq!(s.add_trial(None), (1, 4.0));
        assert_eq!(s.add_trial(Some(2.5)), (2, 6.5));
        s.add_storage_drop();
        s.add_samples_lost(3);
        for i in 0..(LATENCIES_KEPT as u64 + 5) {
            s.add_latency_us(i as f64);
        }
        let snap = s.snapshot();
        assert_eq!(snap.link, Some(LinkState::Lost));
        assert_eq!(snap.link_detail.as_deref(), Some("unplugged"));
        assert_eq!((snap.trials, snap.rewards, snap.water_ul), (3, 2, 6.5));
        assert_eq!((snap.rig_now_us, snap.t0_us), (7, Some(5)));
        assert_eq!((snap.storage_drops, snap.samples_lost), (1, 3));
        assert_eq!(snap.latencies_us.len(), LATENCIES_KEPT);
        assert_eq!(snap.latencies_us[0], 5.0);
        assert_eq!(
            *snap.latencies_us.last().unwrap_or(&0.0),
            (LATENCIES_KEPT + 4) as f64
        );
        s.reset_session();
        let snap = s.snapshot();
        assert_eq!(
            (snap.trials, snap.rewards, snap.water_ul, snap.t0_us),
            (0, 0, 0.0, None)
        );
        assert_eq!(
            snap.link,
            Some(LinkState::Lost),
            "the link is not the session's"
        );
    }
}
