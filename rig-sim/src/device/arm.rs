//! The device-armed reward (protocol version 2, docs/protocol.md 1.10): the
//! host arms a threshold, the device checks every lever sample against it and
//! opens the valve at the sample that crosses, whatever the host is doing.
//!
//! The virtual device decides at the simulated sample (the firmware decides
//! at the encoder edge, which a sampled lever model does not have). The
//! `RewardFired` event's `t_cross_us` is the sample's time; its `t_valve_us`
//! is the device time at which the simulator actually executed that sample
//! (the runner's lag behind real time, which a busy host makes visible), so
//! `t_valve_us - t_cross_us` is the virtual device's own latency. The
//! simulated valve opens at the sample.

use protocol::serial::{
    direction, disarm_reason, AckStatus, ArmReward, DeviceMessage, RewardEnded, RewardFired,
};

use super::{cause, Device, DeviceIo};

/// The report the last arm ended with.
#[derive(Debug, Clone, Copy)]
pub(super) enum Report {
    Fired(RewardFired),
    Ended(RewardEnded),
}

/// An armed reward waiting for its crossing.
#[derive(Debug, Clone, Copy)]
pub(super) struct Armed {
    tag: u32,
    rest: i32,
    threshold: u32,
    rearm: u32,
    down: bool,
    /// Unwrapped device time the arm expires.
    end_us: u64,
    pulse_us: u32,
    /// The lever was below the re-arm point since the arm (a crossing counts).
    ready: bool,
}

impl Armed {
    /// Lever displacement from rest in the armed direction, counts.
    fn displacement(&self, counts: i32) -> i64 {
        let d = i64::from(counts) - i64::from(self.rest);
        if self.down {
            -d
        } else {
            d
        }
    }
}

impl Device {
    /// The expiry time of the armed reward, if one is armed.
    pub(super) fn armed_deadline(&self) -> Option<u64> {
        self.armed.map(|a| a.end_us)
    }

    /// Validate an `ArmReward` and arm it; returns the `Ack` status.
    pub(super) fn arm(&mut self, t: u64, a: ArmReward) -> AckStatus {
        let ahead = a.window_end_us.wrapping_sub(self.stamp(t));
        if a.threshold_counts == 0
            || a.threshold_counts > i32::MAX as u32
            || a.rearm_counts >= a.threshold_counts
            || a.direction > direction::DOWN
            || a.pulse_us == 0
            || ahead == 0
            || ahead >= 0x8000_0000
        {
            return AckStatus::BadValue;
        }
        let cap_us = u64::from(
            self.limits
                .max_valve_open_ms
                .min(self.fw.hard_max_valve_open_ms),
        ) * 1000;
        if u64::from(a.pulse_us) > cap_us || self.stream.is_none() {
            return AckStatus::Refused;
        }
        if self.armed.is_some() || self.valve.is_some() {
            return AckStatus::Busy;
        }
        let mut armed = Armed {
            tag: a.trial_tag,
            rest: a.rest_counts,
            threshold: a.threshold_counts,
            rearm: a.rearm_counts,
            down: a.direction == direction::DOWN,
            end_us: t + u64::from(ahead),
            pulse_us: a.pulse_us,
            ready: false,
        };
        armed.ready = self
            .last_counts
            .is_some_and(|c| armed.displacement(c) < i64::from(armed.rearm));
        self.armed = Some(armed);
        AckStatus::Ok
    }

    /// The host's `Disarm`: ends the arm if it carries `tag`; for the last
    /// arm, already ended, repeats its report (a host that lost the link in
    /// between learns what happened).
    pub(super) fn disarm_tag(&mut self, t: u64, tag: u32, io: &mut impl DeviceIo) {
        if self.armed.is_some_and(|a| a.tag == tag) {
            self.disarm(t, disarm_reason::HOST, io);
            return;
        }
        match self.last_report {
            Some(Report::Fired(r)) if r.trial_tag == tag => {
                self.send(t, DeviceMessage::RewardFired(r), io);
            }
            Some(Report::Ended(r)) if r.trial_tag == tag => {
                self.send(t, DeviceMessage::RewardEnded(r), io);
            }
            _ => {}
        }
    }

    /// End the arm (if any) without firing.
    pub(super) fn disarm(&mut self, t: u64, reason: u8, io: &mut impl DeviceIo) {
        if let Some(a) = self.armed.take() {
            let next = self.stream.as_ref().map_or(0, |s| s.next_index);
            let ended = RewardEnded {
                trial_tag: a.tag,
                t_us: self.stamp(t),
                reason,
                next_sample_index: next,
            };
            self.last_report = Some(Report::Ended(ended));
            self.send(t, DeviceMessage::RewardEnded(ended), io);
        }
    }

    /// One lever sample (index `index`, device time `t`): fire if it crosses.
    pub(super) fn check_armed(&mut self, t: u64, index: u32, counts: i32, io: &mut impl DeviceIo) {
        self.last_counts = Some(counts);
        let Some(mut a) = self.armed else {
            return;
        };
        if t >= a.end_us {
            return; // the expiry timer ends it: never fire late
        }
        let disp = a.displacement(counts);
        if a.ready && disp >= i64::from(a.threshold) {
            self.armed = None;
            if self.valve.is_some() {
                let ended = RewardEnded {
                    trial_tag: a.tag,
                    t_us: self.stamp(t),
                    reason: disarm_reason::VALVE_BUSY,
                    next_sample_index: index.wrapping_add(1),
                };
                self.last_report = Some(Report::Ended(ended));
                self.send(t, DeviceMessage::RewardEnded(ended), io);
                return;
            }
            let fired = RewardFired {
                trial_tag: a.tag,
                sample_index: index,
                t_cross_us: self.stamp(t),
                t_valve_us: self.stamp(self.executed_at_us.max(t)),
                counts,
                pulse_us: a.pulse_us,
            };
            self.last_report = Some(Report::Fired(fired));
            if !std::mem::take(&mut self.drop_next_report) {
                self.send(t, DeviceMessage::RewardFired(fired), io);
            }
            self.open_valve(
                t,
                a.pulse_us,
                u64::from(a.pulse_us),
                cause::COMPLETED,
                0,
                io,
            );
            return;
        }
        if disp < i64::from(a.rearm) {
            a.ready = true;
            self.armed = Some(a);
        }
    }
}
