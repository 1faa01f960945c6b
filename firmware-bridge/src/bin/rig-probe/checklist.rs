//! The bring-up checklist: what rig-probe saw, item by item, as pass, fail
//! or skip with a sentence saying why and what to do.
//!
//! | item | passes when |
//! |---|---|
//! | `lever` | the lever moved at least `--lever-min-mm` from its rest during the probe, and further in the positive direction than the negative (a press counts up) |
//! | `valve` | the device acknowledged the test pulse and reported the valve open and closed after the commanded time (within 1 ms) |
//! | `tone` | the device acknowledged the test tone and reported it on and off after its duration (within 5 ms) |
//! | `lick` | at least one lick was reported |
//! | `frame_clock` | at least 3 frame-clock edges, at `--frame-rate-hz` within 1 % when given |
//! | `sync_out` | with `--sync-loopback lick\|ttl`: an edge on that input within 2 ms of the sync-out pulse's start; skipped otherwise (not wired) |

/// An item's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Skip => "skip",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub item: &'static str,
    pub status: Status,
    pub detail: String,
}

/// The checklist's items, in the order they are shown.
pub const ITEMS: [&str; 6] = ["lever", "valve", "tone", "lick", "frame_clock", "sync_out"];

/// The input a sync-out loopback wire goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Loopback {
    Lick,
    Ttl,
}

/// What the checks expect.
#[derive(Debug, Clone)]
pub struct Expect {
    pub counts_per_mm: f64,
    pub lever_min_mm: f64,
    pub valve_us: u32,
    pub tone_ms: u16,
    pub frame_rate_hz: Option<f64>,
    pub loopback: Option<Loopback>,
    pub skip: Vec<String>,
}

/// An output command's fate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// The command was sent (its sequence number).
    pub seq: Option<u16>,
    /// The device's Ack status, as text (`Ok`, `Refused`, ...).
    pub acked: Option<String>,
    /// Device times of the on and off events.
    pub on_us: Option<u64>,
    pub off_us: Option<u64>,
    /// The off event's value (the valve's open time, µs).
    pub off_value: Option<u32>,
}

/// What the probe saw.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    pub lever_rest: Option<i32>,
    pub lever_min: Option<i32>,
    pub lever_max: Option<i32>,
    pub valve: Output,
    pub tone: Output,
    pub sync: Output,
    pub licks: u64,
    pub lick_times_us: Vec<u64>,
    pub ttl_times_us: Vec<u64>,
}

impl Observations {
    /// A lever sample; the first one is the rest.
    pub fn lever(&mut self, counts: i32) {
        self.lever_rest.get_or_insert(counts);
        self.lever_min = Some(self.lever_min.map_or(counts, |m| m.min(counts)));
        self.lever_max = Some(self.lever_max.map_or(counts, |m| m.max(counts)));
    }
}

/// The checklist for `o` under `e`.
pub fn evaluate(o: &Observations, e: &Expect) -> Vec<Item> {
    ITEMS
        .iter()
        .map(|&item| {
            if e.skip.iter().any(|s| s == item) {
                return Item {
                    item,
                    status: Status::Skip,
                    detail: "skipped (--skip)".into(),
                };
            }
            let (status, detail) = match item {
                "lever" => lever(o, e),
                "valve" => valve(&o.valve, e.valve_us),
                "tone" => tone(&o.tone, e.tone_ms),
                "lick" => lick(o),
                "frame_clock" => frame_clock(&o.ttl_times_us, e.frame_rate_hz),
                _ => sync_out(o, e.loopback),
            };
            Item {
                item,
                status,
                detail,
            }
        })
        .collect()
}

fn lever(o: &Observations, e: &Expect) -> (Status, String) {
    let (Some(rest), Some(min), Some(max)) = (o.lever_rest, o.lever_min, o.lever_max) else {
        return (
            Status::Fail,
            "no lever sample came: is the encoder wired and the stream configured?".into(),
        );
    };
    let mm = |c: i64| c as f64 / e.counts_per_mm;
    let up = mm(i64::from(max) - i64::from(rest));
    let down = mm(i64::from(rest) - i64::from(min));
    let range = format!(
        "range {:.2} mm ({min}..{max} counts, rest {rest}), +{up:.2} / -{down:.2} mm from rest",
        up + down
    );
    if up.max(down) < e.lever_min_mm {
        return (
            Status::Fail,
            format!(
                "{range}: the lever moved less than {} mm: press it fully and release it during \
                 the probe (or check the encoder wiring and rig.encoder_counts_per_mm)",
                e.lever_min_mm
            ),
        );
    }
    if down > up {
        return (
            Status::Fail,
            format!(
                "{range}: pressing moves the lever negative: swap the encoder's A and B wires \
                 so a press counts up"
            ),
        );
    }
    (Status::Pass, format!("{range}; a press counts up"))
}

fn acked(out: &Output, what: &str) -> Result<(), String> {
    match (out.seq, out.acked.as_deref()) {
        (None, _) => Err(format!("the {what} command could not be sent")),
        (Some(_), None) => Err(format!("the device did not acknowledge the {what} command")),
        (Some(_), Some("Ok")) => Ok(()),
        (Some(_), Some(s)) => Err(format!("the device answered the {what} command {s}")),
    }
}

fn valve(out: &Output, want_us: u32) -> (Status, String) {
    if let Err(why) = acked(out, "valve pulse") {
        return (Status::Fail, why);
    }
    match (out.on_us, out.off_value) {
        (Some(_), Some(open_us)) if open_us.abs_diff(want_us) <= 1_000 => (
            Status::Pass,
            format!(
                "open {open_us} µs for a {want_us} µs pulse: listen for the click and see a drop"
            ),
        ),
        (Some(_), Some(open_us)) => (
            Status::Fail,
            format!("the valve was open {open_us} µs for a {want_us} µs pulse"),
        ),
        _ => (
            Status::Fail,
            "the device did not report the valve opening and closing".into(),
        ),
    }
}

fn tone(out: &Output, want_ms: u16) -> (Status, String) {
    if let Err(why) = acked(out, "tone") {
        return (Status::Fail, why);
    }
    match (out.on_us, out.off_us) {
        (Some(on), Some(off)) => {
            let ms = off.saturating_sub(on) as f64 / 1000.0;
            if (ms - f64::from(want_ms)).abs() <= 5.0 {
                (
                    Status::Pass,
                    format!("on for {ms:.1} ms ({want_ms} ms asked): listen for it"),
                )
            } else {
                (
                    Status::Fail,
                    format!("on for {ms:.1} ms, {want_ms} ms asked"),
                )
            }
        }
        _ => (
            Status::Fail,
            "the device did not report the tone on and off".into(),
        ),
    }
}

fn lick(o: &Observations) -> (Status, String) {
    if o.licks > 0 {
        (Status::Pass, format!("{} licks", o.licks))
    } else {
        (
            Status::Fail,
            "no lick: touch the lick spout during the probe (or check the sensor's wiring)".into(),
        )
    }
}

fn frame_clock(edges: &[u64], want_hz: Option<f64>) -> (Status, String) {
    if edges.len() < 3 {
        return (
            Status::Fail,
            format!(
                "{} frame-clock edges: start the microscope scanning during the probe, check the \
                 TTL wire, or --skip frame_clock on a rig without imaging",
                edges.len()
            ),
        );
    }
    let (first, last) = (edges[0], edges[edges.len() - 1]);
    let span_s = last.saturating_sub(first) as f64 / 1e6;
    let hz = (edges.len() - 1) as f64 / span_s;
    match want_hz {
        Some(w) if (hz - w).abs() > 0.01 * w => (
            Status::Fail,
            format!(
                "{hz:.3} Hz ({} edges), expected {w} Hz within 1 %: check the microscope's frame rate",
                edges.len()
            ),
        ),
        _ => (Status::Pass, format!("{hz:.3} Hz ({} edges)", edges.len())),
    }
}

fn sync_out(o: &Observations, loopback: Option<Loopback>) -> (Status, String) {
    let Some(input) = loopback else {
        return (
            Status::Skip,
            "not wired (--sync-loopback lick|ttl with the sync-out wired into that input)".into(),
        );
    };
    if let Err(why) = acked(&o.sync, "sync-out") {
        return (Status::Fail, why);
    }
    let Some(start) = o.sync.on_us else {
        return (
            Status::Fail,
            "the device did not report the sync-out pulse".into(),
        );
    };
    let (edges, name) = match input {
        Loopback::Lick => (&o.lick_times_us, "lick"),
        Loopback::Ttl => (&o.ttl_times_us, "frame-clock"),
    };
    match edges.iter().map(|&t| t.abs_diff(start)).min() {
        Some(d) if d <= 2_000 => (
            Status::Pass,
            format!("the pulse came back on the {name} input {d} µs from its start"),
        ),
        nearest => (
            Status::Fail,
            format!(
                "no {name} edge within 2 ms of the sync-out pulse (nearest {}): check the \
                 loopback wire",
                nearest.map_or("none".into(), |d| format!("{d} µs"))
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            counts_per_mm: 40.0,
            lever_min_mm: 1.0,
            valve_us: 20_000,
            tone_ms: 100,
            frame_rate_hz: Some(30.0),
            loopback: Some(Loopback::Lick),
            skip: vec![],
        }
    }

    fn ok(on: u64, off: u64, value: u32) -> Output {
        Output {
            seq: Some(1),
            acked: Some("Ok".into()),
            on_us: Some(on),
            off_us: Some(off),
            off_value: Some(value),
        }
    }

    fn good() -> Observations {
        let mut o = Observations::default();
        for c in [0, 10, 96, 40, 0] {
            o.lever(c);
        }
        o.valve = ok(1_000, 21_000, 20_000);
        o.tone = ok(5_000, 105_000, 0);
        o.sync = ok(50_000, 60_000, 0);
        o.licks = 2;
        o.lick_times_us = vec![50_300, 400_000];
        o.ttl_times_us = (0..31).map(|i| i * 33_333).collect();
        o
    }

    fn status(items: &[Item], name: &str) -> Status {
        items
            .iter()
            .find(|i| i.item == name)
            .map(|i| i.status)
            .expect("every item is in the checklist")
    }

    #[test]
    fn a_good_rig_passes_every_item() {
        let items = evaluate(&good(), &expect());
        assert!(items.iter().all(|i| i.status == Status::Pass), "{items:?}");
    }

    #[test]
    fn each_fault_fails_its_item_only() {
        let e = expect();
        let mut o = good();
        o.lever_rest = Some(0);
        o.lever_min = Some(-96);
        o.lever_max = Some(4);
        let items = evaluate(&o, &e);
        assert_eq!(status(&items, "lever"), Status::Fail);
        assert!(items[0].detail.contains("swap the encoder's A and B"));
        assert_eq!(items.iter().filter(|i| i.status == Status::Fail).count(), 1);

        let mut o = good();
        o.lever_max = Some(20);
        assert!(evaluate(&o, &e)[0].detail.contains("press it fully"));

        let mut o = good();
        o.valve.acked = Some("Refused".into());
        assert_eq!(status(&evaluate(&o, &e), "valve"), Status::Fail);
        let mut o = good();
        o.valve.off_value = Some(25_000);
        assert_eq!(status(&evaluate(&o, &e), "valve"), Status::Fail);
        let mut o = good();
        o.tone.off_us = None;
        assert_eq!(status(&evaluate(&o, &e), "tone"), Status::Fail);
        let mut o = good();
        o.licks = 0;
        assert_eq!(status(&evaluate(&o, &e), "lick"), Status::Fail);
        let mut o = good();
        o.ttl_times_us.truncate(2);
        assert_eq!(status(&evaluate(&o, &e), "frame_clock"), Status::Fail);
        let mut o = good();
        o.ttl_times_us = (0..31).map(|i| i * 40_000).collect();
        assert!(evaluate(&o, &e)[4].detail.contains("expected 30 Hz"));
        let mut o = good();
        o.lick_times_us = vec![55_000];
        assert_eq!(status(&evaluate(&o, &e), "sync_out"), Status::Fail);
    }

    #[test]
    fn unwired_and_skipped_items_are_skips_not_passes() {
        let mut e = expect();
        e.loopback = None;
        e.skip = vec!["frame_clock".into()];
        let items = evaluate(&Observations::default(), &e);
        assert_eq!(status(&items, "sync_out"), Status::Skip);
        assert_eq!(status(&items, "frame_clock"), Status::Skip);
        assert_eq!(status(&items, "lever"), Status::Fail);
    }
}
