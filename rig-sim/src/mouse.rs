//! The simulated lever and the mouse pushing it.
//!
//! **Lever.** A mass on a return spring with damping (5 Hz, damping ratio 0.7),
//! between hard stops at 0 (rest) and `travel_mm`. It is integrated on a fixed
//! 100 µs grid of true time and read by linear interpolation, so the trajectory
//! does not depend on when or how often the device samples it. The encoder
//! reports `round(position_mm * counts_per_mm)`.
//!
//! **Press.** The mouse's paw tracks a desired position (a stiff, damped pull,
//! 20 Hz): a raised-cosine push from rest to the peak over `rise`, a hold at the
//! peak (sometimes with a dip and a second push, more often in naive mice), then
//! a raised-cosine release of the paw's force over `release`, after which the
//! spring brings the lever back to rest. Peak, rise, hold, release and the
//! double push are drawn per press; their spread shrinks with training, so
//! expert trajectories are stereotyped.
//!
//! **Mouse.** Answers the cue tone (`ToneOn`) with probability
//! [`Behaviour::response_prob`], after a log-normal reaction time; presses
//! spontaneously (Poisson) when not busy; makes small sub-threshold twitches;
//! licks in a bout after every valve opening (and now and then on its own).
//! `--day` 1..=14 moves every parameter from naive to expert along a learning
//! curve that is fast at first (`learning(day)`).

use std::collections::VecDeque;
use std::f64::consts::PI;

use crate::rng::Rng;
use crate::truth::TruthEvent;

/// Physics step, µs of true time.
const DT_US: f64 = 100.0;
/// Lever return spring: natural frequency (Hz) and damping ratio.
const SPRING_HZ: f64 = 5.0;
const SPRING_ZETA: f64 = 0.7;
/// The paw's pull towards its desired position.
const PAW_HZ: f64 = 20.0;
const PAW_ZETA: f64 = 0.6;
/// A press has ended when the lever is back below this, mm.
const REST_MM: f64 = 0.1;

/// How far `jiggle` pushes the lever, mm (below the usual 1.5 mm threshold).
pub const JIGGLE_MM: f64 = 1.0;

/// The lever's geometry and encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeverSpec {
    /// Full travel, mm; the lever rests at 0.
    pub travel_mm: f64,
    /// Encoder counts (quadrature, x4) per mm.
    pub counts_per_mm: f64,
}

impl Default for LeverSpec {
    fn default() -> Self {
        Self {
            travel_mm: 6.0,
            counts_per_mm: 40.0,
        }
    }
}

/// Progress of learning on training day `day` (1..=14): 0 on day 1, 1 on day
/// 14, rising fast at first (1 - e^(-2.5 x), normalised).
pub fn learning(day: u8) -> f64 {
    let x = (f64::from(day.clamp(1, 14)) - 1.0) / 13.0;
    (1.0 - (-2.5 * x).exp()) / (1.0 - (-2.5f64).exp())
}

/// How the mouse behaves on a training day. Times in ms unless named `_s`;
/// `*_sigma` are log-space standard deviations of log-normal draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    pub day: u8,
    /// Probability of answering a cue with a press.
    pub response_prob: f64,
    /// Reaction time, cue onset to press onset: median (s) and spread.
    pub rt_median_s: f64,
    pub rt_sigma: f64,
    /// Spontaneous presses per second when the mouse is not busy.
    pub spontaneous_rate_hz: f64,
    /// Small sub-threshold movements per second.
    pub twitch_rate_hz: f64,
    /// Peak of a meant press, mm.
    pub amplitude_median_mm: f64,
    pub amplitude_sigma: f64,
    pub rise_median_ms: f64,
    pub rise_sigma: f64,
    pub hold_median_ms: f64,
    pub hold_sigma: f64,
    pub release_median_ms: f64,
    pub release_sigma: f64,
    /// Probability of a press with a dip and a second push.
    pub double_push_prob: f64,
    /// Delay from valve opening to the first lick, median.
    pub lick_delay_median_ms: f64,
    /// Licks per bout after water, inclusive range.
    pub lick_bout: (u32, u32),
    pub spontaneous_lick_rate_hz: f64,
}

/// Rewarded trials after which the mouse has learned `1 - 1/e` (63 %) of
/// the task: the experience model's time constant.
pub const LEARNING_REWARDS: f64 = 400.0;

/// Progress of learning after `rewards` rewarded trials in all: 0 for a
/// naive mouse, 1 - e^(-rewards / LEARNING_REWARDS), so about 0.95 after
/// 1200 rewards (two weeks of ~90 rewards a day).
pub fn experience(rewards: u64) -> f64 {
    experience_with(rewards, LEARNING_REWARDS)
}

/// [`experience`] with another time constant (a faster or slower learner).
pub fn experience_with(rewards: u64, learning_rewards: f64) -> f64 {
    1.0 - (-(rewards as f64) / learning_rewards.max(1.0)).exp()
}

impl Behaviour {
    /// Naive on day 1, expert on day 14 (clamped to 1..=14).
    pub fn for_day(day: u8) -> Self {
        let day = day.clamp(1, 14);
        Self::for_progress(learning(day), day)
    }

    /// The behaviour at learning progress `s` (0 naive ..= 1 expert); `day`
    /// is only recorded.
    pub fn for_progress(s: f64, day: u8) -> Self {
        let s = s.clamp(0.0, 1.0);
        let lerp = |a: f64, b: f64| a + (b - a) * s;
        let glerp = |a: f64, b: f64| (a.ln() + (b.ln() - a.ln()) * s).exp();
        Self {
            day,
            response_prob: lerp(0.5, 0.95),
            rt_median_s: glerp(2.0, 0.3),
            rt_sigma: lerp(0.6, 0.25),
            spontaneous_rate_hz: lerp(0.12, 0.04),
            twitch_rate_hz: lerp(0.15, 0.03),
            amplitude_median_mm: lerp(2.3, 2.8),
            amplitude_sigma: lerp(0.25, 0.07),
            rise_median_ms: glerp(300.0, 130.0),
            rise_sigma: lerp(0.45, 0.1),
            hold_median_ms: glerp(250.0, 120.0),
            hold_sigma: lerp(0.6, 0.12),
            release_median_ms: glerp(120.0, 60.0),
            release_sigma: lerp(0.4, 0.1),
            double_push_prob: lerp(0.35, 0.02),
            lick_delay_median_ms: glerp(400.0, 150.0),
            lick_bout: if s < 0.5 { (2, 6) } else { (5, 9) },
            spontaneous_lick_rate_hz: lerp(0.05, 0.02),
        }
    }
}

/// Why the mouse moved the lever.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PressKind {
    /// Answering the cue, after this reaction time (ms).
    Cued {
        rt_ms: f64,
    },
    Spontaneous,
    /// A small movement that is not meant as a press.
    Twitch,
}

/// One planned movement: times are true µs.
#[derive(Debug, Clone, Copy)]
struct Press {
    kind: PressKind,
    start_us: f64,
    amplitude_mm: f64,
    rise_us: f64,
    hold_us: f64,
    release_us: f64,
    /// Depth of the mid-hold dip as a fraction of the amplitude (0: none).
    dip: f64,
    peak_mm: f64,
}

impl Press {
    /// The paw's desired position (mm) and the strength of its pull (0..=1)
    /// at true time `t`.
    fn paw(&self, t: f64) -> (f64, f64) {
        let tau = t - self.start_us;
        if tau < 0.0 {
            return (0.0, 0.0);
        }
        let a = self.amplitude_mm;
        if tau < self.rise_us {
            return (a * (1.0 - (PI * tau / self.rise_us).cos()) / 2.0, 1.0);
        }
        let tau = tau - self.rise_us;
        if tau < self.hold_us {
            let u = tau / self.hold_us;
            let dip = self.dip * (1.0 - (2.0 * PI * u).cos()) / 2.0;
            return (a * (1.0 - dip), 1.0);
        }
        let tau = tau - self.hold_us;
        if tau < self.release_us {
            return (a, (1.0 + (PI * tau / self.release_us).cos()) / 2.0);
        }
        (a, 0.0)
    }

    fn released_at(&self) -> f64 {
        self.start_us + self.rise_us + self.hold_us + self.release_us
    }

    fn describe(&self) -> String {
        let kind = match self.kind {
            PressKind::Cued { rt_ms } => format!("cued rt_ms={rt_ms:.0}"),
            PressKind::Spontaneous => "spontaneous".to_string(),
            PressKind::Twitch => "twitch".to_string(),
        };
        format!(
            "{kind} rise_ms={:.0} hold_ms={:.0} release_ms={:.0} double={}",
            self.rise_us / 1e3,
            self.hold_us / 1e3,
            self.release_us / 1e3,
            u8::from(self.dip > 0.0)
        )
    }
}

/// The lever and the mouse, advanced in true time (µs since the simulator
/// started). Time only moves forward: queries for an earlier time get the
/// state at the latest time reached.
#[derive(Debug, Clone)]
pub struct Mouse {
    b: Behaviour,
    lever: LeverSpec,
    threshold_mm: f64,
    rng: Rng,
    /// Physics time (a multiple of the step) and the state then and one step before.
    t_us: f64,
    x_mm: f64,
    v_mm_s: f64,
    prev_x_mm: f64,
    press: Option<Press>,
    /// A cued press waiting to start (after its reaction time, and after the
    /// current movement).
    queued: Option<Press>,
    next_spontaneous_us: f64,
    next_twitch_us: f64,
    next_spontaneous_lick_us: f64,
    /// No spontaneous presses before this (drinking, just pressed).
    busy_until_us: f64,
    licks: VecDeque<(f64, bool)>,
    licks_planned_until_us: f64,
    truth: Vec<TruthEvent>,
    /// After this many drinks the mouse is sated: it ignores cues and stops
    /// pressing (`None`: never).
    sated_after: Option<u32>,
    drinks: u32,
    /// Rewarded trials before this run, when the mouse learns from its
    /// experience (`--prior-rewards`): its skill then follows
    /// [`experience`] of these plus its drinks here, updated at every drink.
    prior_rewards: Option<u64>,
    /// The experience model's time constant, rewards.
    learning_rewards: f64,
    /// Fault injection: the lever held at least this far down (mm) from
    /// `.0` until `.1` (true µs).
    hold: Option<(f64, f64, f64)>,
    /// Fault injection: the lever jiggled from `.0` until `.1` (true µs).
    jiggle: Option<(f64, f64)>,
}

impl Mouse {
    /// The same mouse, sated after `drinks` valve openings.
    pub fn with_sated_after(mut self, drinks: Option<u32>) -> Self {
        self.sated_after = drinks;
        self
    }

    /// The same mouse learning from experience: `prior` rewarded trials
    /// before this run set its skill (not the day), and every drink here
    /// adds to it. `None` keeps the day's behaviour.
    pub fn with_prior_rewards(mut self, prior: Option<u64>) -> Self {
        self.prior_rewards = prior;
        if let Some(n) = prior {
            self.b = Behaviour::for_progress(experience_with(n, self.learning_rewards), self.b.day);
        }
        self
    }

    /// The same mouse learning `learning_rewards` times as slowly as a mouse
    /// with a time constant of one reward ([`LEARNING_REWARDS`] by default).
    /// Set before [`Mouse::with_prior_rewards`].
    pub fn with_learning_rewards(mut self, learning_rewards: f64) -> Self {
        self.learning_rewards = learning_rewards;
        self
    }

    /// Whether it has had its fill.
    pub fn sated(&self) -> bool {
        self.sated_after.is_some_and(|n| self.drinks >= n)
    }

    /// A mouse on training day `day` (1..=14), with a lever, and the threshold
    /// whose upward crossings go into the truth log.
    pub fn new(day: u8, lever: LeverSpec, threshold_mm: f64, seed: u64) -> Self {
        let b = Behaviour::for_day(day);
        let mut rng = Rng::new(seed);
        let next_spontaneous_us = rng.exponential(1e6 / b.spontaneous_rate_hz);
        let next_twitch_us = rng.exponential(1e6 / b.twitch_rate_hz);
        let next_spontaneous_lick_us = rng.exponential(1e6 / b.spontaneous_lick_rate_hz);
        Self {
            b,
            lever,
            threshold_mm,
            rng,
            t_us: 0.0,
            x_mm: 0.0,
            v_mm_s: 0.0,
            prev_x_mm: 0.0,
            press: None,
            queued: None,
            next_spontaneous_us,
            next_twitch_us,
            next_spontaneous_lick_us,
            busy_until_us: 0.0,
            licks: VecDeque::new(),
            licks_planned_until_us: 0.0,
            truth: Vec::new(),
            sated_after: None,
            drinks: 0,
            prior_rewards: None,
            learning_rewards: LEARNING_REWARDS,
            hold: None,
            jiggle: None,
        }
    }

    /// Fault injection: from true time `from_us` for `duration_us`, the
    /// lever is pushed [`JIGGLE_MM`] down every other 100 ms (a restless
    /// mouse fidgeting on it: never still).
    pub fn jiggle_lever(&mut self, from_us: f64, duration_us: f64) {
        self.jiggle = Some((from_us, from_us + duration_us));
    }

    /// Fault injection: from true time `from_us` for `duration_us`, the
    /// lever is held at least `mm` down (a mouse resting its paw on it); the
    /// encoder reads the held position, the mouse's own presses go on.
    pub fn hold_lever(&mut self, from_us: f64, duration_us: f64, mm: f64) {
        self.hold = Some((from_us, from_us + duration_us, mm));
    }

    pub fn behaviour(&self) -> &Behaviour {
        &self.b
    }

    /// The lever position, mm, at true time `t_us` (advancing to it).
    pub fn lever_mm(&mut self, t_us: f64) -> f64 {
        self.advance_to(t_us);
        let t_prev = self.t_us - DT_US;
        if t_us <= t_prev {
            return self.prev_x_mm;
        }
        let f = ((t_us - t_prev) / DT_US).clamp(0.0, 1.0);
        self.prev_x_mm + (self.x_mm - self.prev_x_mm) * f
    }

    /// The encoder reading at true time `t_us`.
    pub fn lever_counts(&mut self, t_us: f64) -> i32 {
        // A quadrature encoder reports count n once the lever has passed line
        // n: the floor of the position in counts, not the nearest count.
        let mut mm = match self.hold {
            Some((from, until, held)) if t_us >= from && t_us < until => {
                self.lever_mm(t_us).max(held)
            }
            _ => self.lever_mm(t_us),
        };
        if let Some((from, until)) = self.jiggle {
            if t_us >= from && t_us < until && ((t_us - from) / 100_000.0) as u64 % 2 == 0 {
                mm = mm.max(JIGGLE_MM);
            }
        }
        (mm * self.lever.counts_per_mm).floor() as i32
    }

    /// Run the world up to true time `t_us` (the physics grid may end up to
    /// one step beyond it).
    pub fn advance_to(&mut self, t_us: f64) {
        while self.t_us < t_us {
            if self.idle() {
                // Nothing moves until the next thing the mouse does: jump.
                let wake = self.next_action_us().min(t_us);
                let steps = ((wake - self.t_us) / DT_US).floor() - 1.0;
                if steps >= 1.0 {
                    self.t_us += steps * DT_US;
                    self.prev_x_mm = self.x_mm;
                    continue;
                }
            }
            self.step();
        }
    }

    /// The cue tone started at `t_us`.
    pub fn tone_on(&mut self, t_us: f64) {
        if self.queued.is_some() {
            return; // already about to answer a cue
        }
        if self.sated() {
            self.truth
                .push(TruthEvent::new(t_us, "cue_ignored", 0.0).with_detail("sated".to_string()));
            return;
        }
        if self.rng.chance(self.b.response_prob) {
            let rt_s = self
                .rng
                .lognormal(self.b.rt_median_s, self.b.rt_sigma)
                .max(0.1);
            let press = self.plan(PressKind::Cued { rt_ms: rt_s * 1e3 }, t_us + rt_s * 1e6);
            self.queued = Some(press);
        } else {
            self.truth
                .push(TruthEvent::new(t_us, "cue_ignored", 0.0).with_detail("cue".to_string()));
        }
    }

    /// Water came (the valve opened) at `t_us`: a lick bout follows.
    pub fn water(&mut self, t_us: f64) {
        self.drinks += 1;
        if let Some(prior) = self.prior_rewards {
            self.b = Behaviour::for_progress(
                experience_with(prior + u64::from(self.drinks), self.learning_rewards),
                self.b.day,
            );
        }
        if self.sated_after == Some(self.drinks) {
            self.truth
                .push(TruthEvent::new(t_us, "sated", f64::from(self.drinks)));
            // No more spontaneous presses either.
            self.next_spontaneous_us = f64::INFINITY;
        }
        let delay_ms = self
            .rng
            .lognormal(self.b.lick_delay_median_ms, 0.3)
            .max(60.0);
        let (lo, hi) = self.b.lick_bout;
        let n = lo + (self.rng.uniform() * f64::from(hi - lo + 1)).floor() as u32;
        let first = (t_us + delay_ms * 1e3).max(self.licks_planned_until_us + 60e3);
        self.plan_licks(first, n.min(hi));
        self.busy_until_us = self.busy_until_us.max(t_us + 2.0e6);
    }

    /// The next planned lick edge: (true µs, true for contact on).
    pub fn next_lick_edge(&self) -> Option<(f64, bool)> {
        self.licks.front().copied()
    }

    /// Take the next planned lick edge.
    pub fn pop_lick_edge(&mut self) -> Option<(f64, bool)> {
        self.licks.pop_front()
    }

    /// Truth rows produced since the last call.
    pub fn drain_truth(&mut self) -> std::vec::Drain<'_, TruthEvent> {
        self.truth.drain(..)
    }

    // ---- internals --------------------------------------------------------

    fn idle(&self) -> bool {
        self.press.is_none() && self.x_mm == 0.0 && self.v_mm_s == 0.0
    }

    /// When the idle mouse will next do something by itself.
    fn next_action_us(&self) -> f64 {
        let mut t = self
            .next_spontaneous_us
            .min(self.next_twitch_us)
            .min(self.next_spontaneous_lick_us);
        if let Some(q) = &self.queued {
            t = t.min(q.start_us);
        }
        t
    }

    fn plan(&mut self, kind: PressKind, start_us: f64) -> Press {
        let b = self.b;
        let max_mm = self.lever.travel_mm * 0.97;
        if kind == PressKind::Twitch {
            let amplitude_mm = (self.threshold_mm * self.rng.range(0.1, 0.6)).min(max_mm);
            return Press {
                kind,
                start_us,
                amplitude_mm,
                rise_us: self.rng.range(60e3, 150e3),
                hold_us: self.rng.range(0.0, 60e3),
                release_us: 60e3,
                dip: 0.0,
                peak_mm: 0.0,
            };
        }
        let amplitude_mm = self
            .rng
            .lognormal(b.amplitude_median_mm, b.amplitude_sigma)
            .clamp(0.3, max_mm);
        let rise_us = self
            .rng
            .lognormal(b.rise_median_ms, b.rise_sigma)
            .clamp(40.0, 1500.0)
            * 1e3;
        let mut hold_us = self
            .rng
            .lognormal(b.hold_median_ms, b.hold_sigma)
            .clamp(0.0, 2000.0)
            * 1e3;
        let release_us = self
            .rng
            .lognormal(b.release_median_ms, b.release_sigma)
            .clamp(20.0, 500.0)
            * 1e3;
        let mut dip = 0.0;
        if self.rng.chance(b.double_push_prob) {
            dip = self.rng.range(0.3, 0.6);
            hold_us += self.rng.range(100e3, 250e3);
        }
        Press {
            kind,
            start_us,
            amplitude_mm,
            rise_us,
            hold_us,
            release_us,
            dip,
            peak_mm: 0.0,
        }
    }

    fn plan_licks(&mut self, first_us: f64, n: u32) {
        let mut t = first_us;
        for _ in 0..n {
            let contact = self.rng.range(30e3, 55e3);
            self.licks.push_back((t, true));
            self.licks.push_back((t + contact, false));
            self.licks_planned_until_us = t + contact;
            t += self.rng.lognormal(140e3, 0.12).max(contact + 30e3);
        }
    }

    fn start(&mut self, mut press: Press, t_us: f64) {
        press.start_us = t_us;
        let detail = press.describe();
        self.truth
            .push(TruthEvent::new(t_us, "press_start", press.amplitude_mm).with_detail(detail));
        self.press = Some(press);
    }

    /// One physics step from `t_us` to `t_us + DT_US`, with the mouse's
    /// decisions at its start.
    fn step(&mut self) {
        let t = self.t_us;
        self.decide(t);
        let t_next = t + DT_US;
        let (paw_mm, pull) = self.press.as_ref().map_or((0.0, 0.0), |p| p.paw(t_next));
        let ws = 2.0 * PI * SPRING_HZ;
        let wp = 2.0 * PI * PAW_HZ;
        // The paw aims beyond its target by what the spring takes back.
        let aim = paw_mm * (wp * wp + ws * ws) / (wp * wp);
        let (x, v) = (self.x_mm, self.v_mm_s);
        let a = -ws * ws * x - 2.0 * SPRING_ZETA * ws * v
            + pull * (wp * wp * (aim - x) - 2.0 * PAW_ZETA * wp * v);
        let h = DT_US * 1e-6;
        let mut v = v + a * h;
        let mut x = x + v * h;
        if x <= 0.0 {
            x = 0.0;
            v = v.max(0.0);
            if pull == 0.0 {
                v = 0.0; // at rest against the stop
            }
        } else if x >= self.lever.travel_mm {
            x = self.lever.travel_mm;
            v = v.min(0.0);
        }
        self.prev_x_mm = self.x_mm;
        self.x_mm = x;
        self.v_mm_s = v;
        self.t_us = t_next;
        // Truth: upward threshold crossings, the peak, the end of a press.
        let thr = self.threshold_mm;
        if self.prev_x_mm < thr && x >= thr {
            let f = (thr - self.prev_x_mm) / (x - self.prev_x_mm);
            self.truth
                .push(TruthEvent::new(t + f * DT_US, "threshold_crossing", thr));
        }
        if let Some(p) = self.press.as_mut() {
            p.peak_mm = p.peak_mm.max(x);
            if t_next >= p.released_at() && x < REST_MM {
                let peak = p.peak_mm;
                let kind = p.kind;
                self.press = None;
                let detail = match kind {
                    PressKind::Twitch => "twitch",
                    PressKind::Spontaneous => "spontaneous",
                    PressKind::Cued { .. } => "cued",
                };
                self.truth.push(
                    TruthEvent::new(t_next, "press_end", peak).with_detail(detail.to_string()),
                );
                if kind != PressKind::Twitch {
                    self.busy_until_us = self.busy_until_us.max(t_next + 0.5e6);
                }
            }
        }
    }

    /// Start whatever movement is due at `t`.
    fn decide(&mut self, t: f64) {
        if self.press.is_none() {
            if let Some(q) = self.queued {
                if q.start_us <= t {
                    self.queued = None;
                    self.start(q, q.start_us.max(t - DT_US));
                }
            }
        }
        if t >= self.next_spontaneous_us {
            let at = self.next_spontaneous_us.max(t - DT_US);
            self.next_spontaneous_us = t + self.rng.exponential(1e6 / self.b.spontaneous_rate_hz);
            if self.press.is_none() && self.queued.is_none() && t >= self.busy_until_us {
                let p = self.plan(PressKind::Spontaneous, at);
                self.start(p, at);
            }
        }
        if t >= self.next_twitch_us {
            let at = self.next_twitch_us.max(t - DT_US);
            self.next_twitch_us = t + self.rng.exponential(1e6 / self.b.twitch_rate_hz);
            if self.press.is_none() && self.queued.is_none() {
                let p = self.plan(PressKind::Twitch, at);
                self.start(p, at);
            }
        }
        if t >= self.next_spontaneous_lick_us {
            self.next_spontaneous_lick_us =
                t + self.rng.exponential(1e6 / self.b.spontaneous_lick_rate_hz);
            if self.licks.is_empty() {
                self.plan_licks(t, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_curve_endpoints() {
        assert_eq!(learning(1), 0.0);
        assert!((learning(14) - 1.0).abs() < 1e-12);
        assert!(learning(4) > 0.4, "fast early learning: {}", learning(4));
        let naive = Behaviour::for_day(1);
        let expert = Behaviour::for_day(14);
        assert!((1.0..=3.0).contains(&naive.rt_median_s));
        assert!((0.4..=0.6).contains(&naive.response_prob));
        assert!((expert.rt_median_s - 0.3).abs() < 1e-9);
        assert!(expert.response_prob > 0.9);
    }

    struct Session {
        responded: usize,
        cues: usize,
        rts_s: Vec<f64>,
        cued_crossed: usize,
        cued_presses: usize,
        twitch_crossings: usize,
        peaks: Vec<f64>,
        max_mm: f64,
    }

    /// Cue every 8 s, look at what the mouse did in the 7 s after each cue.
    fn session(day: u8, cues: usize, seed: u64) -> Session {
        let mut m = Mouse::new(day, LeverSpec::default(), 1.5, seed);
        let mut s = Session {
            responded: 0,
            cues,
            rts_s: Vec::new(),
            cued_crossed: 0,
            cued_presses: 0,
            twitch_crossings: 0,
            peaks: Vec::new(),
            max_mm: 0.0,
        };
        let mut rows = Vec::new();
        for i in 0..cues {
            let cue = (i as f64 * 8.0 + 1.0) * 1e6;
            let mut t = i as f64 * 8e6;
            while t < cue {
                t += 1000.0;
                s.max_mm = s.max_mm.max(m.lever_mm(t));
            }
            m.tone_on(cue);
            while t < cue + 7e6 {
                t += 1000.0;
                s.max_mm = s.max_mm.max(m.lever_mm(t));
            }
            rows.extend(m.drain_truth());
        }
        // Pair each cued press_start with what followed it.
        let mut in_cued = false;
        let mut in_twitch = false;
        let mut crossed = false;
        for r in &rows {
            match r.kind {
                "press_start" if r.detail.starts_with("cued") => {
                    s.responded += 1;
                    s.cued_presses += 1;
                    let rt_ms: f64 = r.detail["cued rt_ms=".len()..]
                        .split(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .expect("rt in detail");
                    s.rts_s.push(rt_ms / 1e3);
                    in_cued = true;
                    crossed = false;
                }
                "press_start" => {
                    in_twitch = r.detail.starts_with("twitch");
                }
                "threshold_crossing" => {
                    crossed = true;
                    if in_twitch {
                        s.twitch_crossings += 1;
                    }
                }
                "press_end" => {
                    if in_cued {
                        s.cued_crossed += usize::from(crossed);
                        s.peaks.push(r.value);
                    }
                    in_cued = false;
                    in_twitch = false;
                    crossed = false;
                }
                _ => {}
            }
        }
        s
    }

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn cv(v: &[f64]) -> f64 {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean
    }

    #[test]
    fn naive_mouse_is_slow_unreliable_and_variable() {
        let mut s = session(1, 120, 11);
        let rate = s.responded as f64 / s.cues as f64;
        assert!((0.35..=0.65).contains(&rate), "response rate {rate}");
        let rt = median(&mut s.rts_s);
        assert!((1.0..=3.0).contains(&rt), "median RT {rt}");
        let crossed = s.cued_crossed as f64 / s.cued_presses as f64;
        assert!(crossed > 0.8, "meant presses crossing 1.5 mm: {crossed}");
        assert_eq!(s.twitch_crossings, 0);
        assert!(s.max_mm <= 6.0);
        assert!(cv(&s.peaks) > 0.12, "peak CV {}", cv(&s.peaks));
    }

    #[test]
    fn expert_mouse_is_fast_reliable_and_stereotyped() {
        let mut s = session(14, 120, 12);
        let rate = s.responded as f64 / s.cues as f64;
        assert!(rate > 0.9, "response rate {rate}");
        let rt = median(&mut s.rts_s);
        assert!((0.22..=0.4).contains(&rt), "median RT {rt}");
        let crossed = s.cued_crossed as f64 / s.cued_presses as f64;
        assert!(crossed > 0.97, "meant presses crossing 1.5 mm: {crossed}");
        assert!(cv(&s.peaks) < 0.1, "peak CV {}", cv(&s.peaks));
    }

    #[test]
    fn lever_returns_to_rest_and_stays_in_travel() {
        let mut m = Mouse::new(14, LeverSpec::default(), 1.5, 5);
        m.tone_on(0.0);
        let mut max: f64 = 0.0;
        let mut t = 0.0;
        while t < 3e6 {
            t += 100.0;
            let x = m.lever_mm(t);
            assert!((0.0..=6.0).contains(&x));
            max = max.max(x);
        }
        assert!(max > 1.5, "{max}");
        let rows: Vec<TruthEvent> = m.drain_truth().collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
        assert!(kinds.contains(&"press_start") && kinds.contains(&"press_end"));
        let start = rows
            .iter()
            .find(|r| r.detail.starts_with("cued"))
            .expect("cued press");
        let cross = rows
            .iter()
            .find(|r| r.kind == "threshold_crossing" && r.true_us > start.true_us)
            .expect("crossing");
        assert!(
            cross.true_us - start.true_us < 400e3,
            "{}",
            cross.true_us - start.true_us
        );
        // Sampling at a different rate reads the same trajectory.
        let mut a = Mouse::new(3, LeverSpec::default(), 1.5, 9);
        let mut b = Mouse::new(3, LeverSpec::default(), 1.5, 9);
        a.tone_on(0.0);
        b.tone_on(0.0);
        let mut t = 0.0;
        while t < 4e6 {
            t += 1000.0;
            let xa = a.lever_mm(t);
            for k in 1..=10 {
                b.lever_mm(t - 1000.0 + 100.0 * f64::from(k));
            }
            assert!((xa - b.lever_mm(t)).abs() < 1e-9);
        }
    }

    #[test]
    fn licks_follow_water() {
        let mut m = Mouse::new(14, LeverSpec::default(), 1.5, 2);
        m.water(1e6);
        let mut edges = Vec::new();
        while let Some(e) = m.pop_lick_edge() {
            edges.push(e);
        }
        let ons: Vec<f64> = edges.iter().filter(|e| e.1).map(|e| e.0).collect();
        assert!(ons.len() >= 5, "{edges:?}");
        assert!(ons[0] > 1.06e6 && ons[0] < 1.6e6, "{edges:?}");
        assert!(edges
            .windows(2)
            .all(|w| w[1].0 > w[0].0 && w[1].1 != w[0].1));
    }

    #[test]
    fn a_mouse_learning_from_experience_improves_with_every_reward() {
        let naive = Mouse::new(14, LeverSpec::default(), 1.5, 3).with_prior_rewards(Some(0));
        assert_eq!(
            naive.behaviour().response_prob,
            Behaviour::for_progress(0.0, 14).response_prob
        );
        let mut m = Mouse::new(14, LeverSpec::default(), 1.5, 3).with_prior_rewards(Some(100));
        let before = *m.behaviour();
        for i in 0..50 {
            m.water(1e6 * f64::from(i));
        }
        let after = *m.behaviour();
        assert!(after.response_prob > before.response_prob);
        assert!(after.rt_median_s < before.rt_median_s);
        // Deterministic: the same rewards give the same mouse.
        let again = Mouse::new(14, LeverSpec::default(), 1.5, 3).with_prior_rewards(Some(150));
        assert_eq!(*again.behaviour(), after);
        // Without it, the day decides, as before.
        let by_day = Mouse::new(3, LeverSpec::default(), 1.5, 3).with_prior_rewards(None);
        assert_eq!(*by_day.behaviour(), Behaviour::for_day(3));
        assert!(experience(1200) > 0.94 && experience(1200) < 0.96);
    }
}
