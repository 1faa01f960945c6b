//! Frame timestamps on the rig clock. Pure: frames (with the producer's host
//! stamps), frame-clock edges and the clock fit go in, one decision per frame
//! comes out, in frame order.
//!
//! With the frame TTL wired, a frame's time is its frame-clock edge, stamped
//! by the microcontroller, exact on the rig clock, and `ttl` is claimed only
//! when the frame-to-edge correspondence is certain:
//!
//! * **Verdict of one frame.** The producer's host stamp, mapped through the
//!   clock fit, marks the frame's start (its edge) to within a quarter of a
//!   frame period (`docs/protocol.md` 2.5). A frame *points at* edge `c` when
//!   the edge nearest its mapped stamp is `c`, both of `c`'s neighbours
//!   (`c - 1`, `c + 1`) were seen, and the stamp's distance to `c` plus the
//!   fit's error bound (`half_band_us`) is at most a quarter of the shorter
//!   neighbouring edge interval: no other edge can be the frame's. Anything
//!   else (no fit, a fit too coarse, the edge or a neighbour lost, edges
//!   closer than half or further than twice the nominal period) is
//!   *uncertain*.
//! * **Lock by count.** The offset `edge count - frame number` of
//!   [`LOCK_AFTER`] frames in a row that point at their edges with the same
//!   offset becomes the lock (`frame_offset_found`). Under the lock a frame
//!   that points at its edge is `ttl`; an uncertain frame is matched by count
//!   (`ttl`) only between two frames that point at their edges with the lock's
//!   offset, so a change of the offset between them cannot go unseen.
//! * **Continuous verification.** One frame that points at an edge with
//!   another offset ends the lock (`frame_match_lost`); it starts the search
//!   for a new lock (and is `ttl` only if that lock is found with it). A producer restart or a device
//!   reboot (the edge count goes back) ends it too.
//! * **Otherwise** the frame gets its mapped host stamp (`mapped`), or, if
//!   that is not after the previous row's time, no time (`unmatched`): the
//!   times in `frames.tsv` strictly increase.
//!
//! Frames wait (in order) until their verdict and the lock can decide, at
//! most [`FrameTimer::wait_us`] of rig time past their stamp; rows already
//! decided are never rewritten: frames written `mapped` before a lock was
//! found stay `mapped`, and the `frame_offset_found` event says how many.
//! Without the TTL wired every frame is `mapped`.

use std::collections::VecDeque;

use firmware_bridge::sync::ClockFit;

/// How a frame's time was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampSource {
    /// A frame-clock edge stamped by the device.
    Ttl,
    /// The producer's CLOCK_MONOTONIC stamp through the clock-sync fit.
    Mapped,
}

impl StampSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ttl => "ttl",
            Self::Mapped => "mapped",
        }
    }
}

/// A frame's rig time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stamp {
    pub t_us: f64,
    pub source: StampSource,
}

/// What the timer needs to know about a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameInfo {
    /// The producer's frame number.
    pub frame_number: u64,
    /// The producer's host stamp, ns (None when it was implausible).
    pub host_ns: Option<u64>,
    /// The rig's latest sample time when the frame was read, µs.
    pub arrival_rig_us: u64,
    /// `host_ns` is the frame's arrival on the rig PC (a bridge from
    /// another machine), not its start: it never points at an edge.
    pub stamp_at_arrival: bool,
}

/// The answer for the oldest frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Stamped(Stamp),
    /// No certain edge and no mapped time after the previous row's.
    Unmatched,
    /// No clock fit (forced out at the stop or by the pending limit).
    Unstamped,
    /// Not decided yet: ask again after more edges or frames.
    Wait,
}

/// Something the matcher found, for `events.tsv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchEvent {
    /// A lock was found: `offset` = edge count - frame number, from frame
    /// `frame`; `mapped_before` frames of this producer run were already
    /// written without it.
    OffsetFound {
        offset: i128,
        frame: u64,
        mapped_before: u64,
    },
    /// Frame `frame` pointed at its edge with offset `found`, not the lock's
    /// `offset`: the lock ended.
    MatchLost {
        offset: i128,
        found: i128,
        frame: u64,
    },
}

/// What the matcher decided, for the QC record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MatchStats {
    pub ttl: u64,
    pub mapped: u64,
    pub unmatched: u64,
    pub unstamped: u64,
    /// `ttl` rows whose frame was matched by count between two verified ones.
    pub ttl_by_count: u64,
    /// Rows whose time would not have been after the previous row's (they
    /// were written `unmatched` or `mapped` instead; a `ttl` row never is).
    pub order_violations: u64,
    pub offsets_found: u64,
    pub matches_lost: u64,
}

/// One frame's look at the edges.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    /// Points at edge `count` (rig µs `t_us`) with `offset`.
    Points {
        offset: i128,
        t_us: u64,
    },
    Uncertain,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    info: FrameInfo,
    verdict: Option<Verdict>,
    /// The lock this frame was verified under (its verdict agreed), and the
    /// lock epoch of its verdict.
    verified: Option<i128>,
    /// The lock when the verdict was given (after it was applied).
    lock: Option<i128>,
    epoch: u64,
}

/// Frames in a row that must point at their edges with one offset to lock.
pub const LOCK_AFTER: u32 = 5;

/// Edges kept (about 35 s at 28.7 Hz).
const MAX_EDGES: usize = 1024;

/// Matches frames to frame-clock edges. See the module docs.
#[derive(Debug, Clone)]
pub struct FrameTimer {
    ttl_wired: bool,
    /// Recent edges: (edge count, rig µs), increasing.
    edges: VecDeque<(u64, u64)>,
    period_us: f64,
    /// Frames pushed and not yet decided, in order.
    frames: VecDeque<Entry>,
    /// Index in `frames` of the first frame without a verdict.
    next_verdict: usize,
    lock: Option<i128>,
    /// Offset, frames in a row pointing with it.
    run: Option<(i128, u32)>,
    /// Bumped at every change of the lock.
    epoch: u64,
    /// Frames of this producer run written `mapped`/`unmatched` while unlocked.
    unlocked_written: u64,
    last_t_us: Option<f64>,
    /// Epoch of the last frame written `ttl` from its own verdict.
    last_verified_epoch: Option<u64>,
    /// How long (rig µs past a frame's stamp, or its arrival) a frame waits.
    pub wait_us: f64,
    pub stats: MatchStats,
    events: Vec<MatchEvent>,
}

impl FrameTimer {
    pub fn new(ttl_wired: bool, frame_rate_hz: f64) -> Self {
        let period_us = if frame_rate_hz > 0.0 && frame_rate_hz.is_finite() {
            1e6 / frame_rate_hz
        } else {
            35_000.0
        };
        Self {
            ttl_wired,
            edges: VecDeque::new(),
            period_us,
            frames: VecDeque::new(),
            next_verdict: 0,
            lock: None,
            run: None,
            epoch: 0,
            unlocked_written: 0,
            last_t_us: None,
            last_verified_epoch: None,
            wait_us: 5_000_000.0_f64.max(150.0 * period_us),
            stats: MatchStats::default(),
            events: Vec::new(),
        }
    }

    /// A frame-clock edge from the device: `count` edges since its boot.
    pub fn add_edge(&mut self, count: u64, t_us: u64) {
        if let Some(&(c, t)) = self.edges.back() {
            if count <= c || t_us <= t {
                // The device rebooted (its count restarted): old edges are
                // from another epoch, and so is the lock.
                self.edges.clear();
                self.unlock();
            }
        }
        self.edges.push_back((count, t_us));
        while self.edges.len() > MAX_EDGES {
            self.edges.pop_front();
        }
    }

    /// Rig time of the newest edge.
    pub fn latest_edge_us(&self) -> Option<u64> {
        self.edges.back().map(|e| e.1)
    }

    /// The producer restarted: its numbering starts afresh, so does the lock.
    /// Frames pushed before keep what they had.
    pub fn restart(&mut self) {
        // Verdicts of the old run are final; the new run's frames start a
        // new epoch and a new search.
        self.evaluate_all_pending_as_old_run();
        self.unlock();
        self.unlocked_written = 0;
    }

    fn evaluate_all_pending_as_old_run(&mut self) {
        // Frames of the old run without a verdict stay uncertain: their
        // offset can no longer be confirmed by later frames.
        while self.next_verdict < self.frames.len() {
            self.frames[self.next_verdict].verdict = Some(Verdict::Uncertain);
            self.frames[self.next_verdict].epoch = self.epoch;
            self.next_verdict += 1;
        }
    }

    fn unlock(&mut self) {
        self.lock = None;
        self.run = None;
        self.epoch += 1;
    }

    /// The events found since the last call.
    pub fn take_events(&mut self) -> Vec<MatchEvent> {
        std::mem::take(&mut self.events)
    }

    /// Frames pushed and not decided yet.
    pub fn pending(&self) -> usize {
        self.frames.len()
    }

    /// A frame was read (in order).
    pub fn push(&mut self, info: FrameInfo) {
        self.frames.push_back(Entry {
            info,
            verdict: None,
            verified: None,
            lock: None,
            epoch: self.epoch,
        });
    }

    fn edge(&self, count: u64) -> Option<u64> {
        let first = self.edges.front()?.0;
        let i = usize::try_from(count.checked_sub(first)?).ok()?;
        match self.edges.get(i) {
            Some(&(c, t)) if c == count => Some(t),
            _ => self
                .edges
                .binary_search_by_key(&count, |e| e.0)
                .ok()
                .map(|i| self.edges[i].1),
        }
    }

    /// The frame's verdict, or None if its edges may still be on their way.
    fn verdict(
        &self,
        info: &FrameInfo,
        fit: Option<&ClockFit>,
        now_rig_us: f64,
    ) -> Option<Verdict> {
        let Some(host_ns) = info.host_ns else {
            return Some(Verdict::Uncertain);
        };
        if info.stamp_at_arrival {
            // An arrival comes a frame or more after the frame's edge, by a
            // delay no one measured: matching it to the nearest edge could
            // lock one frame late, unseen.
            return Some(Verdict::Uncertain);
        }
        let fit = fit?;
        let m = fit.host_to_rig_us(host_ns);
        if !m.is_finite() {
            return Some(Verdict::Uncertain);
        }
        let newest = self
            .latest_edge_us()
            .map_or(f64::NEG_INFINITY, |t| t as f64);
        // Wait until the edge after the frame's own has come (or give up).
        if newest < m + 1.5 * self.period_us && now_rig_us < m + self.wait_us {
            return None;
        }
        let u = fit.half_band_us;
        if !(u.is_finite() && u >= 0.0 && u <= self.period_us / 8.0) {
            // Too coarse a fit (a young link): wait for a better one.
            return None;
        }
        // The nearest edge.
        let i = self.edges.partition_point(|e| (e.1 as f64) < m);
        let near = [i.checked_sub(1), Some(i)]
            .into_iter()
            .flatten()
            .filter_map(|j| self.edges.get(j).copied())
            .min_by(|a, b| {
                let (da, db) = ((a.1 as f64 - m).abs(), (b.1 as f64 - m).abs());
                da.total_cmp(&db)
            });
        let Some((count, t)) = near else {
            return Some(Verdict::Uncertain);
        };
        let (Some(prev), Some(next)) = (
            count.checked_sub(1).and_then(|c| self.edge(c)),
            count.checked_add(1).and_then(|c| self.edge(c)),
        ) else {
            return Some(Verdict::Uncertain);
        };
        let interval = (t.saturating_sub(prev)).min(next.saturating_sub(t)) as f64;
        let plausible = interval >= 0.5 * self.period_us && interval <= 2.0 * self.period_us;
        if plausible && (m - t as f64).abs() + u <= interval / 4.0 {
            Some(Verdict::Points {
                offset: i128::from(count) - i128::from(info.frame_number),
                t_us: t,
            })
        } else {
            Some(Verdict::Uncertain)
        }
    }

    /// Give verdicts to the frames that can have one, in order, and run the
    /// lock on them.
    fn evaluate(&mut self, fit: Option<&ClockFit>, now_rig_us: f64, force: bool) {
        while self.next_verdict < self.frames.len() {
            let info = self.frames[self.next_verdict].info;
            let v = match self.verdict(&info, fit, now_rig_us) {
                Some(v) => v,
                None if force || self.timed_out(&info, fit, now_rig_us) => Verdict::Uncertain,
                None => return,
            };
            let idx = self.next_verdict;
            self.next_verdict += 1;
            self.apply(idx, v);
        }
    }

    fn timed_out(&self, info: &FrameInfo, fit: Option<&ClockFit>, now_rig_us: f64) -> bool {
        let since = match (info.host_ns, fit) {
            (Some(h), Some(f)) => f.host_to_rig_us(h),
            _ => info.arrival_rig_us as f64,
        };
        // NaN (no usable time) counts as timed out.
        let deadline = since + self.wait_us;
        deadline.is_nan() || now_rig_us >= deadline
    }

    fn apply(&mut self, idx: usize, v: Verdict) {
        self.apply_lock(idx, v);
        self.frames[idx].lock = self.lock;
    }

    fn apply_lock(&mut self, idx: usize, v: Verdict) {
        self.frames[idx].verdict = Some(v);
        self.frames[idx].epoch = self.epoch;
        let Verdict::Points { offset, .. } = v else {
            return;
        };
        let frame = self.frames[idx].info.frame_number;
        match self.lock {
            Some(k) if k == offset => self.frames[idx].verified = Some(k),
            Some(k) => {
                self.stats.matches_lost += 1;
                self.events.push(MatchEvent::MatchLost {
                    offset: k,
                    found: offset,
                    frame,
                });
                self.unlock();
                self.frames[idx].epoch = self.epoch;
                self.run = Some((offset, 1));
            }
            None => {
                let n = match self.run {
                    Some((k, n)) if k == offset => n + 1,
                    _ => 1,
                };
                self.run = Some((offset, n));
                if n >= LOCK_AFTER {
                    self.lock = Some(offset);
                    self.run = None;
                    // The run's frames (the ones still waiting) are verified;
                    // uncertain frames between them are not in the run.
                    let old = self.epoch;
                    self.epoch += 1;
                    let epoch = self.epoch;
                    let mut left = n;
                    for e in self.frames.range_mut(..=idx).rev() {
                        if left == 0 || e.epoch != old {
                            break;
                        }
                        if let Some(Verdict::Points { offset: o, .. }) = e.verdict {
                            if o == offset {
                                e.verified = Some(offset);
                                e.lock = Some(offset);
                                e.epoch = epoch;
                                left -= 1;
                            }
                        }
                    }
                    self.stats.offsets_found += 1;
                    self.events.push(MatchEvent::OffsetFound {
                        offset,
                        frame,
                        mapped_before: self.unlocked_written,
                    });
                    self.unlocked_written = 0;
                }
            }
        }
    }

    /// Decide the oldest frame, if it can be decided now (`force`: at the
    /// stop, or when too many frames wait). `now_rig_us`: the rig's latest
    /// sample time.
    pub fn next(&mut self, fit: Option<&ClockFit>, now_rig_us: f64, force: bool) -> Decision {
        let Some(front) = self.frames.front().copied() else {
            return Decision::Wait;
        };
        let mapped_us = match (front.info.host_ns, fit) {
            (Some(h), Some(f)) => Some(f.host_to_rig_us(h)).filter(|m| m.is_finite()),
            _ => None,
        };
        let decision = if !self.ttl_wired {
            match mapped_us {
                Some(m) => self.mapped(m),
                None if front.info.host_ns.is_some() && !force => return Decision::Wait,
                None => self.no_time(fit),
            }
        } else {
            self.evaluate(fit, now_rig_us, force);
            match self.ttl_decision(fit, now_rig_us, force) {
                Some(d) => d,
                None => return Decision::Wait,
            }
        };
        if self.frames.pop_front().is_some() && self.next_verdict > 0 {
            self.next_verdict -= 1;
        }
        decision
    }

    /// With the TTL wired: the front frame's decision, or None to wait.
    fn ttl_decision(
        &mut self,
        fit: Option<&ClockFit>,
        now_rig_us: f64,
        force: bool,
    ) -> Option<Decision> {
        let front = *self.frames.front()?;
        let v = front.verdict?;
        let give_up = force || self.timed_out(&front.info, fit, now_rig_us);
        let mapped_us = match (front.info.host_ns, fit) {
            (Some(h), Some(f)) => Some(f.host_to_rig_us(h)).filter(|m| m.is_finite()),
            _ => None,
        };
        let fallback = |s: &mut Self| match mapped_us {
            Some(m) => s.mapped(m),
            None => s.no_time(fit),
        };
        match (v, front.verified) {
            (Verdict::Points { t_us, .. }, Some(_)) => {
                let d = self.ttl(t_us as f64, false);
                if matches!(
                    d,
                    Decision::Stamped(Stamp {
                        source: StampSource::Ttl,
                        ..
                    })
                ) {
                    self.last_verified_epoch = Some(front.epoch);
                }
                Some(d)
            }
            (Verdict::Points { offset, .. }, None) => {
                // Part of a run that may still lock.
                let growing = self.lock.is_none()
                    && self.run.is_some_and(|(k, _)| k == offset)
                    && front.epoch == self.epoch;
                if growing && !give_up {
                    None
                } else {
                    Some(fallback(self))
                }
            }
            (Verdict::Uncertain, _) => {
                // Matched by count only between two verified frames of one lock.
                let Some(k) = front.lock else {
                    return Some(fallback(self));
                };
                if self.last_verified_epoch != Some(front.epoch) {
                    return Some(fallback(self));
                }
                // The next frame with a verdict that points at an edge.
                let mut later = None;
                for e in self.frames.iter().skip(1) {
                    match e.verdict {
                        Some(Verdict::Points { .. }) => {
                            later = Some(e.verified == Some(k) && e.epoch == front.epoch);
                            break;
                        }
                        Some(Verdict::Uncertain) => {}
                        None => break,
                    }
                }
                match later {
                    Some(true) => {
                        let edge = i128::from(front.info.frame_number)
                            .checked_add(k)
                            .and_then(|c| u64::try_from(c).ok())
                            .and_then(|c| self.edge(c));
                        match edge {
                            Some(t) => Some(self.ttl(t as f64, true)),
                            None => Some(fallback(self)),
                        }
                    }
                    Some(false) => Some(fallback(self)),
                    None if give_up => Some(fallback(self)),
                    None => None,
                }
            }
        }
    }
}

impl FrameTimer {
    /// `ttl` at edge time `t_us`, if after the previous row's time (else
    /// the frame's own time is not trusted: mapped or unmatched).
    fn ttl(&mut self, t_us: f64, by_count: bool) -> Decision {
        if self.last_t_us.is_some_and(|last| t_us <= last) {
            self.stats.order_violations += 1;
            self.stats.unmatched += 1;
            self.unlocked_written += 1;
            return Decision::Unmatched;
        }
        self.last_t_us = Some(t_us);
        self.stats.ttl += 1;
        if by_count {
            self.stats.ttl_by_count += 1;
        }
        Decision::Stamped(Stamp {
            t_us,
            source: StampSource::Ttl,
        })
    }

    fn mapped(&mut self, m: f64) -> Decision {
        self.unlocked_written += 1;
        if self.last_t_us.is_some_and(|last| m <= last) {
            self.stats.order_violations += 1;
            self.stats.unmatched += 1;
            return Decision::Unmatched;
        }
        self.last_t_us = Some(m);
        self.stats.mapped += 1;
        Decision::Stamped(Stamp {
            t_us: m,
            source: StampSource::Mapped,
        })
    }

    /// No mapped time: no fit at all (`none`), or an implausible stamp.
    fn no_time(&mut self, fit: Option<&ClockFit>) -> Decision {
        self.unlocked_written += 1;
        if fit.is_none() {
            self.stats.unstamped += 1;
            Decision::Unstamped
        } else {
            self.stats.unmatched += 1;
            Decision::Unmatched
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: f64 = 1e6 / 28.7;

    /// Host µs = rig µs + `offset_us`, with the given error bound.
    fn fit(offset_us: f64, half_band_us: f64) -> ClockFit {
        ClockFit {
            host_ref_us: offset_us,
            rig_ref_us: 0.0,
            drift_ppm: 0.0,
            half_band_us,
            exchanges: 100,
            min_rtt_us: 100.0,
        }
    }

    fn info(frame_number: u64, host_us: f64) -> FrameInfo {
        FrameInfo {
            frame_number,
            host_ns: Some((host_us * 1000.0) as u64),
            arrival_rig_us: host_us as u64,
            stamp_at_arrival: false,
        }
    }

    fn drain(t: &mut FrameTimer, f: &ClockFit, now: f64, force: bool) -> Vec<Decision> {
        let mut out = Vec::new();
        loop {
            match t.next(Some(f), now, force) {
                Decision::Wait => return out,
                d => out.push(d),
            }
        }
    }

    fn ttl(d: &Decision) -> Option<f64> {
        match d {
            Decision::Stamped(Stamp {
                t_us,
                source: StampSource::Ttl,
            }) => Some(*t_us),
            _ => None,
        }
    }

    #[test]
    fn frames_lock_by_count_and_the_first_ones_wait_for_the_lock() {
        let mut t = FrameTimer::new(true, 28.7);
        let f = fit(0.0, 50.0);
        // Edge 999 comes before the first frame's (an edge without its
        // neighbours is never certain).
        t.add_edge(999, (1e6 - P) as u64);
        for c in 0..40u64 {
            t.add_edge(1000 + c, (1e6 + c as f64 * P) as u64);
        }
        // Frame number n is edge n + 990, stamped 3 ms after it.
        for n in 10..35u64 {
            t.push(info(n, 1e6 + (n - 10) as f64 * P + 3000.0));
        }
        let d = drain(&mut t, &f, 1e6 + 40.0 * P, false);
        assert_eq!(d.len(), 25);
        for (i, d) in d.iter().enumerate() {
            assert_eq!(
                ttl(d),
                Some((1e6 + i as f64 * P) as u64 as f64),
                "frame {i}"
            );
        }
        assert_eq!(
            t.take_events(),
            [MatchEvent::OffsetFound {
                offset: 990,
                frame: 14,
                mapped_before: 0
            }]
        );
    }

    #[test]
    fn an_arrival_stamp_never_points_at_an_edge() {
        // A bridge from another PC: each frame arrives one period and 2 ms
        // after its edge, i.e. 2 ms after the *next* edge. Taken as a start
        // stamp it would lock one frame late with every row on an edge;
        // marked as an arrival, every frame is `mapped`.
        let mut t = FrameTimer::new(true, 28.7);
        let f = fit(0.0, 50.0);
        for c in 0..60u64 {
            t.add_edge(c, (c as f64 * P) as u64);
        }
        for n in 1..40u64 {
            let mut i = info(n, n as f64 * P + P + 2000.0);
            i.stamp_at_arrival = true;
            t.push(i);
        }
        let d = drain(&mut t, &f, 1e12, false);
        assert_eq!(d.len(), 39);
        assert!(d.iter().all(|d| ttl(d).is_none()), "{d:?}");
        assert_eq!((t.stats.mapped, t.stats.ttl), (39, 0));
        assert!(t.take_events().is_empty());
        // The same stamps as start stamps: the late lock this prevents.
        let mut t = FrameTimer::new(true, 28.7);
        for c in 0..60u64 {
            t.add_edge(c, (c as f64 * P) as u64);
        }
        for n in 1..40u64 {
            t.push(info(n, n as f64 * P + P + 2000.0));
        }
        drain(&mut t, &f, 1e12, false);
        assert!(matches!(
            t.take_events()[..],
            [MatchEvent::OffsetFound { offset: 1, .. }]
        ));
    }

    #[test]
    fn a_stamp_halfway_between_edges_is_never_a_guessed_ttl() {
        let mut t = FrameTimer::new(true, 28.7);
        let f = fit(0.0, 50.0);
        for c in 0..40u64 {
            t.add_edge(c, (c as f64 * P) as u64);
        }
        for n in 0..30u64 {
            t.push(info(n, n as f64 * P + P / 2.0));
        }
        let d = drain(&mut t, &f, 1e12, false);
        assert_eq!(d.len(), 30);
        assert!(d.iter().all(|d| ttl(d).is_none()), "{d:?}");
        assert_eq!(t.stats.mapped, 30);
    }

    #[test]
    fn an_offset_that_changes_is_an_event_and_no_frame_gets_a_wrong_edge() {
        let mut t = FrameTimer::new(true, 28.7);
        let f = fit(0.0, 50.0);
        // The microscope made no frame at edge 20 (the device counted an
        // extra edge): from frame 20 on, frame n is at edge n + 1. Frames
        // 19 and 20 lack a neighbouring edge (uncertain); frame 21 shows it.
        let edge_t = |c: u64| (c as f64 * P) as u64;
        for c in 0..60u64 {
            if c != 20 {
                t.add_edge(c, edge_t(c));
            }
        }
        // (edge 20 was also never heard by the daemon)
        for n in 0..50u64 {
            let true_edge = if n < 20 { n } else { n + 1 };
            t.push(info(n, edge_t(true_edge) as f64 + 100.0));
        }
        let d = drain(&mut t, &f, 1e12, false);
        assert_eq!(d.len(), 50);
        for (n, d) in d.iter().enumerate() {
            let true_edge = if n < 20 { n as u64 } else { n as u64 + 1 };
            if let Some(x) = ttl(d) {
                assert_eq!(x, edge_t(true_edge) as f64, "frame {n}");
            }
        }
        let ev = t.take_events();
        assert!(
            ev.contains(&MatchEvent::MatchLost {
                offset: 0,
                found: 1,
                frame: 21
            }),
            "{ev:?}"
        );
        assert_eq!(t.stats.offsets_found, 2);
    }

    #[test]
    fn a_frame_that_cannot_tell_is_not_matched_by_count_across_an_offset_change() {
        let mut t = FrameTimer::new(true, 28.7);
        let f = fit(0.0, 50.0);
        let edge_t = |c: u64| (c as f64 * P) as u64;
        for c in 0..60u64 {
            t.add_edge(c, edge_t(c));
        }
        // From frame 20 on, frame n is at edge n + 1; frame 20's own stamp
        // is unusable.
        for n in 0..40u64 {
            let edge = if n < 20 { n } else { n + 1 };
            let mut i = info(n, edge_t(edge) as f64 + 100.0);
            if n == 20 {
                i.host_ns = None;
            }
            t.push(i);
        }
        let d = drain(&mut t, &f, 1e12, false);
        assert_eq!(d.len(), 40);
        assert_eq!(ttl(&d[19]), Some(edge_t(19) as f64));
        assert_eq!(ttl(&d[20]), None, "{:?}", d[20]);
        assert_eq!(ttl(&d[21]), Some(edge_t(22) as f64));
    }

    #[test]
    fn a_coarse_clock_fit_gives_mapped_frames_not_ttl() {
        let mut t = FrameTimer::new(true, 28.7);
        // The fit's error bound is larger than an eighth of a period.
        let f = fit(0.0, P / 4.0);
        for c in 0..40u64 {
            t.add_edge(c, (c as f64 * P) as u64);
        }
        for n in 0..20u64 {
            t.push(info(n, n as f64 * P));
        }
        let d = drain(&mut t, &f, 1e12, false);
        assert_eq!(d.len(), 20);
        assert!(d.iter().all(|d| ttl(d).is_none()));
    }

    #[test]
    fn without_the_ttl_every_frame_is_mapped_and_times_increase() {
        let mut t = FrameTimer::new(false, 28.7);
        let f = fit(0.0, 50.0);
        t.push(info(3, 1234.0));
        t.push(info(4, 1000.0));
        assert_eq!(
            drain(&mut t, &f, 0.0, false),
            [
                Decision::Stamped(Stamp {
                    t_us: 1234.0,
                    source: StampSource::Mapped
                }),
                Decision::Unmatched
            ]
        );
        assert_eq!(t.stats.order_violations, 1);
    }

    /// One simulated acquisition for the property test.
    #[derive(Debug, Clone)]
    struct Run {
        rate_hz: f64,
        offset: u64,
        latency_frac: f64,
        fit_err_us: f64,
        half_band_us: f64,
        frames: usize,
        lost_edges: Vec<usize>,
        dropped_frames: Vec<usize>,
        bad_stamps: Vec<usize>,
        restart_at: Option<usize>,
        /// From this frame on, each frame is one edge later (the microscope
        /// made no frame at one edge and did not number it).
        shift_at: Option<usize>,
    }

    fn run_strategy() -> impl Strategy<Value = Run> {
        (
            5.0f64..200.0,
            0u64..1_000_000,
            -0.2f64..0.2,
            -1.0f64..1.0,
            0.0f64..0.2,
            20usize..300,
            prop::collection::vec(0usize..300, 0..4),
            prop::collection::vec(0usize..300, 0..10),
            prop::collection::vec(0usize..300, 0..10),
            (
                prop::option::of(0usize..300),
                prop::option::of(0usize..300),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    rate_hz,
                    offset,
                    latency_frac,
                    e,
                    hb,
                    frames,
                    lost,
                    dropped,
                    bad,
                    (restart, shift, bad_at_shift),
                )| {
                    let mut bad = bad;
                    if let (Some(s), true) = (shift, bad_at_shift) {
                        // The frames where the offset changes cannot tell
                        // by themselves.
                        bad.extend([s, s + 1]);
                    }
                    let p = 1e6 / rate_hz;
                    let half_band_us = hb * p;
                    Run {
                        rate_hz,
                        offset,
                        latency_frac,
                        fit_err_us: e * half_band_us,
                        half_band_us,
                        frames,
                        lost_edges: lost,
                        dropped_frames: dropped,
                        bad_stamps: bad,
                        restart_at: restart,
                        shift_at: shift,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the rate, offset, latency, fit error, lost edges,
        /// dropped frames, absurd stamps and restarts: a `ttl` time is the
        /// frame's own edge, and times strictly increase.
        #[test]
        fn a_ttl_stamp_is_always_the_frames_own_edge(r in run_strategy()) {
            let p = 1e6 / r.rate_hz;
            let mut t = FrameTimer::new(true, r.rate_hz);
            let f = fit(r.fit_err_us, r.half_band_us);
            let t0 = 1e7;
            let edge_t = |i: usize| (t0 + i as f64 * p) as u64;
            // Frame i (the i-th frame of the acquisition) is at edge i (i + 1
            // from the shift on); its number is i (after a restart numbered
            // afresh from 7).
            let edge_of = |i: usize| if r.shift_at.is_some_and(|s| i >= s) { i + 1 } else { i };
            let mut expected = Vec::new();
            let mut lost = 0u64;
            for i in 0..r.frames + 4 {
                if r.lost_edges.contains(&i) {
                    lost += 1;
                    continue;
                }
                // The device count skips nothing: a lost edge is one the
                // daemon never heard of.
                t.add_edge(r.offset + i as u64, edge_t(i));
            }
            let _ = lost;
            for i in 0..r.frames {
                if r.restart_at == Some(i) {
                    // Frames pushed so far are decided first, as the ingest
                    // writes rows in order.
                    for d in drain(&mut t, &f, 1e15, true) { expected.push(d); }
                    t.restart();
                }
                if r.dropped_frames.contains(&i) {
                    continue;
                }
                let number = match r.restart_at {
                    Some(at) if i >= at => (i - at) as u64 + 7,
                    _ => i as u64,
                };
                let host = edge_t(edge_of(i)) as f64 + r.latency_frac * p / 2.0 - r.fit_err_us;
                let host_ns = if r.bad_stamps.contains(&i) {
                    Some(u64::MAX / 2 + i as u64)
                } else {
                    Some((host.max(0.0) * 1000.0) as u64)
                };
                t.push(FrameInfo {
                    frame_number: number,
                    host_ns,
                    arrival_rig_us: edge_t(edge_of(i)),
                    stamp_at_arrival: false,
                });
            }
            let mut decisions = std::mem::take(&mut expected);
            decisions.extend(drain(&mut t, &f, 1e15, true));
            let kept: Vec<usize> = (0..r.frames).filter(|i| !r.dropped_frames.contains(i)).collect();
            prop_assert_eq!(decisions.len(), kept.len());
            let mut last = f64::NEG_INFINITY;
            for (d, &i) in decisions.iter().zip(&kept) {
                if let Some(x) = ttl(d) {
                    prop_assert_eq!(x, edge_t(edge_of(i)) as f64, "frame {}", i);
                }
                if let Decision::Stamped(s) = d {
                    prop_assert!(s.t_us > last, "times increase");
                    last = s.t_us;
                }
            }
        }
    }
}
