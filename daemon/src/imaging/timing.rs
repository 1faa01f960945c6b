//! Frame timestamps on the rig clock. Pure: frames and frame-clock edges go
//! in with their times, stamps come out.
//!
//! With the frame TTL wired, every frame's time is a frame-clock edge stamped
//! by the microcontroller, exact to its clock. Which edge belongs to which
//! frame is found once, from the producer's host time mapped onto the rig clock
//! (the last edge at or before it: the producer stamps a frame at its start, or
//! at the latest before the next frame starts, `docs/protocol.md` 2.3), and then
//! kept as an offset between edge count and frame number, checked on every frame
//! against the mapped time. A missing edge, an extra edge or a restarted
//! producer breaks the check and the match is made again; a frame without an
//! edge is stamped with its mapped host time and marked `mapped`.
//! Without the TTL wired, every frame is `mapped`.

use std::collections::VecDeque;

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
    /// The producer's host stamp mapped onto the rig clock, µs (None when no
    /// clock fit exists yet).
    pub mapped_us: Option<f64>,
}

/// The answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Stamped(Stamp),
    /// The frame's edge may still be on its way from the device: ask again
    /// after more edges arrived (or once `wait_us` of rig time has passed).
    Wait,
}

/// Matches frames to frame-clock edges. See the module docs.
#[derive(Debug, Clone)]
pub struct FrameTimer {
    ttl_wired: bool,
    /// Recent edges: (edge count, rig µs), increasing.
    edges: VecDeque<(u64, u64)>,
    /// edge count - frame number, once matched.
    offset: Option<i64>,
    period_us: f64,
    /// How long (rig µs past a frame's mapped time) to wait for its edge.
    pub wait_us: f64,
    /// Matches made again after the check failed.
    pub resyncs: u64,
}

/// Edges kept (about 35 s at 28.7 Hz).
const MAX_EDGES: usize = 1024;

impl FrameTimer {
    pub fn new(ttl_wired: bool, frame_rate_hz: f64) -> Self {
        let period_us = if frame_rate_hz > 0.0 {
            1e6 / frame_rate_hz
        } else {
            35_000.0
        };
        Self {
            ttl_wired,
            edges: VecDeque::new(),
            offset: None,
            period_us,
            wait_us: 250_000.0,
            resyncs: 0,
        }
    }

    /// A frame-clock edge from the device: `count` edges since its boot.
    pub fn add_edge(&mut self, count: u64, t_us: u64) {
        if let Some(&(c, _)) = self.edges.back() {
            if count <= c {
                // The device rebooted (its count restarted): old edges are
                // from another epoch.
                self.edges.clear();
                self.offset = None;
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

    fn edge(&self, count: u64) -> Option<u64> {
        let first = self.edges.front()?.0;
        if count < first {
            return None;
        }
        // Counts are usually consecutive: index directly, else search.
        let i = (count - first) as usize;
        match self.edges.get(i) {
            Some(&(c, t)) if c == count => Some(t),
            _ => self.edges.iter().find(|e| e.0 == count).map(|e| e.1),
        }
    }

    /// The last edge at or before `t_us` (+ a little for clock error).
    fn edge_before(&self, t_us: f64) -> Option<(u64, u64)> {
        let limit = t_us + 2_000.0_f64.min(self.period_us / 4.0);
        self.edges
            .iter()
            .rev()
            .find(|e| e.1 as f64 <= limit)
            .copied()
    }

    /// Stamp one frame, or say to wait for its edge.
    pub fn stamp(&mut self, f: FrameInfo, now_rig_us: f64) -> Decision {
        let mapped = |t: f64| {
            Decision::Stamped(Stamp {
                t_us: t,
                source: StampSource::Mapped,
            })
        };
        if !self.ttl_wired {
            return match f.mapped_us {
                Some(t) => mapped(t),
                None => Decision::Wait,
            };
        }
        // With an established match, the edge is known by number.
        if let Some(off) = self.offset {
            let want = f.frame_number as i64 + off;
            if want >= 0 {
                if let Some(t) = self.edge(want as u64) {
                    let consistent = f.mapped_us.is_none_or(|m| {
                        let d = m - t as f64;
                        d > -self.period_us * 0.5 && d < self.period_us * 1.5
                    });
                    if consistent {
                        return Decision::Stamped(Stamp {
                            t_us: t as f64,
                            source: StampSource::Ttl,
                        });
                    }
                    // Wrong edge: the producer restarted or an edge was
                    // missed or doubled. Match again below.
                    self.offset = None;
                    self.resyncs += 1;
                } else if self.edges.back().is_some_and(|e| (e.0 as i64) < want) {
                    // Not arrived yet.
                    let late = f.mapped_us.is_some_and(|m| now_rig_us > m + self.wait_us);
                    if !late {
                        return Decision::Wait;
                    }
                    return f.mapped_us.map_or(Decision::Wait, mapped);
                } else {
                    // Later edges came but not this one: the edge was lost.
                    // Keep the match; this frame gets its mapped time.
                    return f.mapped_us.map_or(Decision::Wait, mapped);
                }
            }
        }
        // Match by time.
        let Some(m) = f.mapped_us else {
            return Decision::Wait;
        };
        let newest = self
            .latest_edge_us()
            .map_or(f64::NEG_INFINITY, |t| t as f64);
        if newest < m && now_rig_us < m + self.wait_us {
            // The frame's edge may not have arrived yet.
            return Decision::Wait;
        }
        match self.edge_before(m) {
            Some((count, t)) if m - (t as f64) < self.period_us * 1.5 => {
                self.offset = Some(count as i64 - f.frame_number as i64);
                Decision::Stamped(Stamp {
                    t_us: t as f64,
                    source: StampSource::Ttl,
                })
            }
            _ => mapped(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: f64 = 1e6 / 28.7;

    fn edges(timer: &mut FrameTimer, from: u64, n: u64, t0: f64) {
        for i in 0..n {
            timer.add_edge(from + i, (t0 + i as f64 * P) as u64);
        }
    }

    fn stamped(d: Decision) -> Stamp {
        match d {
            Decision::Stamped(s) => s,
            Decision::Wait => panic!("expected a stamp"),
        }
    }

    #[test]
    fn frames_get_their_own_edges_even_with_a_late_host_stamp() {
        let mut t = FrameTimer::new(true, 28.7);
        edges(&mut t, 100, 50, 1_000_000.0);
        for k in 0..40u64 {
            let edge_t = (1_000_000.0 + (k + 3) as f64 * P) as u64;
            // The producer stamps 10 ms into the frame, with 30 µs of clock error.
            let s = stamped(t.stamp(
                FrameInfo {
                    frame_number: 500 + k,
                    mapped_us: Some(edge_t as f64 + 10_000.0 + 30.0),
                },
                1e9,
            ));
            assert_eq!(s.source, StampSource::Ttl);
            assert_eq!(s.t_us, edge_t as f64, "frame {k}");
        }
        assert_eq!(t.resyncs, 0);
    }

    #[test]
    fn waits_for_an_edge_still_in_flight_then_stamps() {
        let mut t = FrameTimer::new(true, 28.7);
        edges(&mut t, 1, 10, 0.0);
        let f = |k: u64| FrameInfo {
            frame_number: k,
            mapped_us: Some((k - 1) as f64 * P + 5.0),
        };
        assert_eq!(stamped(t.stamp(f(5), 1e6)).source, StampSource::Ttl);
        // Frame 11's edge has not come yet.
        assert_eq!(t.stamp(f(11), 10.0 * P), Decision::Wait);
        t.add_edge(11, (10.0 * P) as u64);
        assert_eq!(
            stamped(t.stamp(f(11), 10.0 * P)).t_us,
            (10.0 * P) as u64 as f64
        );
    }

    #[test]
    fn a_lost_edge_gives_one_mapped_frame_and_the_rest_stay_ttl() {
        let mut t = FrameTimer::new(true, 28.7);
        for i in 0..30u64 {
            if i != 12 {
                t.add_edge(i, (i as f64 * P) as u64);
            }
        }
        let mut sources = Vec::new();
        for k in 0..30u64 {
            let s = stamped(t.stamp(
                FrameInfo {
                    frame_number: k,
                    mapped_us: Some(k as f64 * P + 3.0),
                },
                1e9,
            ));
            sources.push(s.source);
        }
        let mapped: Vec<usize> = sources
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == StampSource::Mapped)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(mapped, vec![12]);
    }

    #[test]
    fn a_restarted_producer_is_matched_again() {
        let mut t = FrameTimer::new(true, 28.7);
        edges(&mut t, 0, 100, 0.0);
        for k in 0..20u64 {
            assert_eq!(
                stamped(t.stamp(
                    FrameInfo {
                        frame_number: k,
                        mapped_us: Some(k as f64 * P)
                    },
                    1e9
                ))
                .source,
                StampSource::Ttl
            );
        }
        // The producer restarts at frame number 0, at edge 60.
        for k in 0..20u64 {
            let s = stamped(t.stamp(
                FrameInfo {
                    frame_number: k,
                    mapped_us: Some((60 + k) as f64 * P + 2.0),
                },
                1e9,
            ));
            assert_eq!(s.t_us, ((60 + k) as f64 * P) as u64 as f64);
            assert_eq!(s.source, StampSource::Ttl);
        }
        assert_eq!(t.resyncs, 1);
    }

    #[test]
    fn without_the_ttl_every_frame_is_mapped() {
        let mut t = FrameTimer::new(false, 28.7);
        let s = stamped(t.stamp(
            FrameInfo {
                frame_number: 3,
                mapped_us: Some(1234.5),
            },
            0.0,
        ));
        assert_eq!(
            s,
            Stamp {
                t_us: 1234.5,
                source: StampSource::Mapped
            }
        );
        assert_eq!(
            t.stamp(
                FrameInfo {
                    frame_number: 4,
                    mapped_us: None
                },
                0.0
            ),
            Decision::Wait
        );
    }

    #[test]
    fn a_device_reboot_restarts_the_edge_count() {
        let mut t = FrameTimer::new(true, 28.7);
        edges(&mut t, 1000, 10, 0.0);
        t.stamp(
            FrameInfo {
                frame_number: 0,
                mapped_us: Some(1.0),
            },
            1e9,
        );
        edges(&mut t, 1, 10, 20.0 * P);
        let s = stamped(t.stamp(
            FrameInfo {
                frame_number: 25,
                mapped_us: Some(22.0 * P + 1.0),
            },
            1e9,
        ));
        assert_eq!(s.t_us, (20.0 * P + 2.0 * P) as u64 as f64);
    }
}
