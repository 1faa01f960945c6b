//! Semantic validation: the rules a well-typed configuration must still obey,
//! each key on its own and across keys. Every broken rule becomes one
//! [`Issue`]; all of them are collected, not just the first.

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;

use protocol::serial::{lever_stream_bytes_per_s, MAX_SAMPLES_PER_BATCH};

use crate::schema::RigConfig;

/// Bits on the wire per byte with 8N1 framing (start, 8 data, stop).
pub const BITS_PER_BYTE_8N1: f64 = 10.0;
/// Share of the baud rate the lever stream may use; the rest is left for
/// events, acknowledgements and heartbeats.
pub const MAX_LEVER_LINK_SHARE: f64 = 0.8;
/// Longest Unix socket path (`sun_path` is 108 bytes with the trailing NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// One step of a dotted key path: a table key or an index into an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A key in a table.
    Key(String),
    /// An element of an array (of tables), counted from 0.
    Index(usize),
}

/// A dotted key path such as `task.threshold_mm` or
/// `valve.calibration[1].open_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<Segment>);

impl KeyPath {
    /// A path of plain keys, from a dotted string (`"task.threshold_mm"`).
    pub fn dotted(path: &str) -> Self {
        Self(
            path.split('.')
                .map(|k| Segment::Key(k.to_owned()))
                .collect(),
        )
    }

    /// This path with an array index appended.
    pub fn index(mut self, i: usize) -> Self {
        self.0.push(Segment::Index(i));
        self
    }

    /// This path with a key appended.
    pub fn key(mut self, k: &str) -> Self {
        self.0.push(Segment::Key(k.to_owned()));
        self
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A broken rule: which key, its effective value, and the rule with its fix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub key: KeyPath,
    /// The effective value, formatted as TOML would write it.
    pub value: String,
    pub rule: String,
    /// For a cross-key rule reported on `key`, the other keys it reads: a
    /// per-session override of one of them is what broke it.
    pub also: Vec<KeyPath>,
}

/// Formats a float the way TOML writes it (always with a decimal point).
pub(crate) fn fmt_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        format!("{x:?}")
    }
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

#[derive(Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn push(&mut self, key: &str, value: String, rule: impl Into<String>) {
        self.push_path(KeyPath::dotted(key), value, rule);
    }

    fn push_path(&mut self, key: KeyPath, value: String, rule: impl Into<String>) {
        self.0.push(Issue {
            key,
            value,
            rule: rule.into(),
            also: Vec::new(),
        });
    }

    /// A cross-key rule on `key` that also reads the keys in `also`.
    fn push_cross(&mut self, key: &str, also: &[&str], value: String, rule: impl Into<String>) {
        self.0.push(Issue {
            key: KeyPath::dotted(key),
            value,
            rule: rule.into(),
            also: also.iter().map(|k| KeyPath::dotted(k)).collect(),
        });
    }

    /// `lo <= v <= hi` for an integer key.
    fn int_range(&mut self, key: &str, v: u64, lo: u64, hi: u64, unit: &str) {
        if v < lo || v > hi {
            self.push(key, v.to_string(), format!("must be {lo}..={hi}{unit}"));
        }
    }

    /// `v > 0`, finite, for a float key.
    fn positive(&mut self, key: &str, v: f64, unit: &str) {
        if !(v > 0.0 && v.is_finite()) {
            self.push(
                key,
                fmt_f64(v),
                format!("must be a finite number > 0{unit}"),
            );
        }
    }

    /// `lo <= v <= hi` for a float key.
    fn float_range(&mut self, key: &str, v: f64, lo: f64, hi: f64, unit: &str) {
        if !(lo <= v && v <= hi) {
            self.push(key, fmt_f64(v), format!("must be {lo}..={hi}{unit}"));
        }
    }

    fn non_empty(&mut self, key: &str, v: &str) {
        if v.trim().is_empty() {
            self.push(key, quoted(v), "must not be empty");
        }
    }
}

/// Checks every rule; returns the broken ones in the order checked.
pub(crate) fn validate(c: &RigConfig) -> Vec<Issue> {
    let mut out = Issues::default();
    rig(c, &mut out);
    task(c, &mut out);
    valve(c, &mut out);
    valve_record(c, &mut out);
    imaging(c, &mut out);
    storage(c, &mut out);
    control(c, &mut out);
    preview(c, &mut out);
    safety(c, &mut out);
    alerts(c, &mut out);
    realtime(c, &mut out);
    lab_and_training(c, &mut out);
    out.0
}

fn rig(c: &RigConfig, out: &mut Issues) {
    let r = &c.rig;
    let name_ok = (1..=64).contains(&r.name.len())
        && r.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        out.push(
            "rig.name",
            quoted(&r.name),
            "must be 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'",
        );
    }
    out.non_empty("rig.serial_port", &r.serial_port);
    if r.baud == 0 {
        out.push("rig.baud", "0".to_owned(), "must be > 0");
    }
    if !(1..=20_000).contains(&r.sample_rate_hz) || 1_000_000 % r.sample_rate_hz != 0 {
        out.push(
            "rig.sample_rate_hz",
            r.sample_rate_hz.to_string(),
            "must be 1..=20000 Hz and divide 1000000 exactly (the device samples on a \
             microsecond timer), e.g. 500, 1000, 2000, 5000, 10000 or 20000",
        );
    }
    let max_batch = u32::try_from(MAX_SAMPLES_PER_BATCH).unwrap_or(u32::MAX);
    out.int_range(
        "rig.samples_per_batch",
        r.samples_per_batch.into(),
        1,
        max_batch.into(),
        "",
    );
    out.positive("rig.encoder_counts_per_mm", r.encoder_counts_per_mm, "");
    out.positive("rig.lever_travel_mm", r.lever_travel_mm, " mm");

    // Only judge the link once the rate and batch are themselves valid.
    let rate_ok = (1..=20_000).contains(&r.sample_rate_hz) && 1_000_000 % r.sample_rate_hz == 0;
    let batch_ok = (1..=max_batch).contains(&r.samples_per_batch);
    if r.baud > 0 && rate_ok && batch_ok {
        let fits = |rate: u32, batch: u32| {
            lever_bits_per_s(rate, batch) <= f64::from(r.baud) * MAX_LEVER_LINK_SHARE
        };
        if !fits(r.sample_rate_hz, r.samples_per_batch) {
            let needed = lever_bits_per_s(r.sample_rate_hz, r.samples_per_batch);
            let min_baud = (needed / MAX_LEVER_LINK_SHARE).ceil();
            let mut fixes = vec![format!("raise rig.baud to >= {min_baud:.0}")];
            // The fastest rate the device can run that this baud carries.
            if let Some(rate) = (1..r.sample_rate_hz)
                .rev()
                .find(|&rate| 1_000_000 % rate == 0 && fits(rate, r.samples_per_batch))
            {
                fixes.push(format!("lower rig.sample_rate_hz to <= {rate} Hz"));
            }
            // The smallest batch that makes this rate fit.
            let batch = (r.samples_per_batch + 1..=max_batch).find(|&b| fits(r.sample_rate_hz, b));
            if let Some(batch) = batch {
                fixes.push(format!("raise rig.samples_per_batch to >= {batch}"));
            }
            let mut fixes = match fixes.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => fixes.join(""),
            };
            if batch.is_none() {
                fixes.push_str(&format!(
                    " (more samples per frame would not be enough: rig.samples_per_batch \
                     is at most {max_batch})"
                ));
            }
            out.push(
                "rig.baud",
                r.baud.to_string(),
                format!(
                    "too slow for the lever stream: {} Hz with {} sample(s) per frame needs \
                     {needed:.0} bit/s (8N1), more than the 80 % of the baud it may use; {fixes}",
                    r.sample_rate_hz, r.samples_per_batch
                ),
            );
        }
    }
}

/// Bits per second the lever stream puts on the serial line (8N1).
fn lever_bits_per_s(sample_rate_hz: u32, samples_per_batch: u32) -> f64 {
    lever_stream_bytes_per_s(sample_rate_hz, samples_per_batch) * BITS_PER_BYTE_8N1
}

fn task(c: &RigConfig, out: &mut Issues) {
    let t = &c.task;
    out.int_range(
        "task.cue_tone_hz",
        t.cue_tone_hz.into(),
        1000,
        40_000,
        " Hz",
    );
    out.int_range(
        "task.cue_duration_ms",
        t.cue_duration_ms.into(),
        1,
        60_000,
        " ms",
    );
    out.int_range("task.cue_level_pct", t.cue_level_pct.into(), 0, 100, " %");
    out.int_range(
        "task.response_window_ms",
        t.response_window_ms.into(),
        1,
        600_000,
        " ms",
    );
    let travel = c.rig.lever_travel_mm;
    // An invalid lever travel is reported on its own; only check > 0 then.
    let travel_ok = travel > 0.0 && travel.is_finite();
    if !(t.threshold_mm > 0.0 && (t.threshold_mm < travel || !travel_ok)) {
        out.push_cross(
            "task.threshold_mm",
            &["rig.lever_travel_mm"],
            fmt_f64(t.threshold_mm),
            format!("must be > 0 and < rig.lever_travel_mm ({travel} mm)"),
        );
    }
    out.int_range("task.iti_max_ms", t.iti_max_ms.into(), 0, 600_000, " ms");
    if t.iti_min_ms > t.iti_max_ms {
        out.push_cross(
            "task.iti_min_ms",
            &["task.iti_max_ms"],
            t.iti_min_ms.to_string(),
            format!(
                "must be <= task.iti_max_ms ({} ms); lower iti_min_ms or raise iti_max_ms",
                t.iti_max_ms
            ),
        );
    }
    out.int_range(
        "task.quiescence_ms",
        t.quiescence_ms.into(),
        0,
        60_000,
        " ms (0 = off)",
    );
    out.int_range(
        "task.miss_timeout_ms",
        t.miss_timeout_ms.into(),
        0,
        600_000,
        " ms",
    );
    for (key, v) in [
        ("task.max_trials", t.max_trials),
        ("task.max_rewards", t.max_rewards),
        ("task.max_duration_min", t.max_duration_min),
        ("task.sated_after_min", t.sated_after_min),
    ] {
        if v == Some(0) {
            out.push(
                key,
                "0".to_owned(),
                "must be > 0; remove the key for no limit",
            );
        }
    }

    // The reward against the valve calibration and the device's valve cap.
    if !(t.reward_ul > 0.0 && t.reward_ul.is_finite()) {
        out.push(
            "task.reward_ul",
            fmt_f64(t.reward_ul),
            "must be a finite number > 0 µL",
        );
    } else if calibration_is_valid(c) {
        let cap_ms = c.safety.max_valve_open_ms;
        match c.valve.open_ms_for_volume(t.reward_ul) {
            Err(_) => {
                let (lo, hi) = c.valve.volume_range_ul().unwrap_or((f64::NAN, f64::NAN));
                out.push_cross(
                    "task.reward_ul",
                    &["valve.calibration"],
                    fmt_f64(t.reward_ul),
                    format!(
                        "must be inside the valve calibration's range ({lo}..={hi} µL); \
                         change the reward or add a [[valve.calibration]] point that covers it"
                    ),
                );
            }
            // The device times the valve in whole microseconds.
            Ok(open_ms) if (open_ms * 1000.0).round() < 1.0 => {
                out.push_cross(
                    "task.reward_ul",
                    &["valve.calibration"],
                    fmt_f64(t.reward_ul),
                    format!(
                        "needs the valve open {:.2} µs by the calibration, less than the \
                         1 µs the device can time; raise the reward or check the calibration's \
                         smallest point",
                        open_ms * 1000.0
                    ),
                );
            }
            Ok(open_ms) if open_ms > f64::from(cap_ms) => {
                out.push_cross(
                    "task.reward_ul",
                    &["valve.calibration", "safety.max_valve_open_ms"],
                    fmt_f64(t.reward_ul),
                    format!(
                        "needs the valve open {open_ms:.1} ms by the calibration, more than \
                         safety.max_valve_open_ms ({cap_ms} ms); lower the reward or raise the cap"
                    ),
                );
            }
            Ok(_) => {}
        }
    }
}

fn calibration_is_valid(c: &RigConfig) -> bool {
    let mut probe = Issues::default();
    valve(c, &mut probe);
    probe.0.is_empty()
}

/// The calibration's date, its age limit and its file name.
fn valve_record(c: &RigConfig, out: &mut Issues) {
    let v = &c.valve;
    if let Some(d) = &v.calibrated_utc {
        if crate::date::days_from_date(d).is_none() {
            out.push(
                "valve.calibrated_utc",
                quoted(d),
                "must start with a date YYYY-MM-DD (e.g. \"2026-12-06\" or \"2026-12-06T23:10:00Z\")",
            );
        }
    }
    out.int_range(
        "valve.max_calibration_age_days",
        u64::from(v.max_calibration_age_days),
        1,
        3650,
        "days",
    );
    if let Some(f) = &v.calibration_file {
        if f.trim().is_empty() {
            out.push(
                "valve.calibration_file",
                quoted(f),
                "must name a file (e.g. \"valve-calibration.toml\", next to this file) or be left out",
            );
        }
    }
}

fn valve(c: &RigConfig, out: &mut Issues) {
    let points = &c.valve.calibration;
    let base = KeyPath::dotted("valve.calibration");
    if points.len() < 2 {
        out.push_path(
            base.clone(),
            format!("{} point(s)", points.len()),
            "needs at least 2 [[valve.calibration]] points (open_ms, volume_ul) measured on this rig",
        );
    }
    for (i, p) in points.iter().enumerate() {
        if !(p.open_ms >= 0.0 && p.open_ms.is_finite()) {
            out.push_path(
                base.clone().index(i).key("open_ms"),
                fmt_f64(p.open_ms),
                "must be a finite number >= 0 ms",
            );
        }
        if !(p.volume_ul >= 0.0 && p.volume_ul.is_finite()) {
            out.push_path(
                base.clone().index(i).key("volume_ul"),
                fmt_f64(p.volume_ul),
                "must be a finite number >= 0 µL",
            );
        }
    }
    for (i, pair) in points.windows(2).enumerate() {
        let [a, b] = pair else { continue };
        if b.open_ms.partial_cmp(&a.open_ms) != Some(Ordering::Greater) {
            out.push_path(
                base.clone().index(i + 1).key("open_ms"),
                fmt_f64(b.open_ms),
                format!(
                    "must be greater than the previous point's open_ms ({} ms): list the \
                     points in strictly increasing order",
                    a.open_ms
                ),
            );
        }
        if b.volume_ul.partial_cmp(&a.volume_ul) != Some(Ordering::Greater) {
            out.push_path(
                base.clone().index(i + 1).key("volume_ul"),
                fmt_f64(b.volume_ul),
                format!(
                    "must be greater than the previous point's volume_ul ({} µL): a longer \
                     opening must deliver more water; re-measure",
                    a.volume_ul
                ),
            );
        }
    }
}

fn imaging(c: &RigConfig, out: &mut Issues) {
    let im = &c.imaging;
    // Motion correction registers 2x2-binned frames and needs at least
    // 16 x 16 binned pixels.
    let sized = im.width >= 1 && im.height >= 1;
    if im.enabled && im.motion_correction && sized && (im.width < 32 || im.height < 32) {
        out.push(
            "imaging.motion_correction",
            "true".to_owned(),
            format!(
                "needs frames of at least 32 x 32 pixels (these are {} x {}); set \
                 imaging.motion_correction = false",
                im.width, im.height
            ),
        );
    }
    let name = &im.shm_name;
    let shm_ok = name.starts_with('/')
        && !name[1..].contains('/')
        && (2..=255).contains(&name.len())
        && !name.contains('\0');
    if !shm_ok {
        out.push(
            "imaging.shm_name",
            quoted(name),
            "must be a POSIX shared-memory name: '/' then 1 to 254 characters with no \
             further '/', e.g. \"/rigd-frames\"",
        );
    }
    out.int_range("imaging.width", im.width.into(), 1, 8192, " pixels");
    out.int_range("imaging.height", im.height.into(), 1, 8192, " pixels");
    if !(1..=2).contains(&im.channels) {
        out.push(
            "imaging.channels",
            im.channels.to_string(),
            "must be 1 or 2",
        );
    }
    if !(im.frame_rate_hz > 0.0 && im.frame_rate_hz <= 1000.0) {
        out.push(
            "imaging.frame_rate_hz",
            fmt_f64(im.frame_rate_hz),
            "must be > 0 and <= 1000 Hz",
        );
    }
    for (key, path) in [
        ("imaging.roi_labels", &im.roi_labels),
        ("imaging.roi_table", &im.roi_table),
        ("imaging.reference_image", &im.reference_image),
    ] {
        if let Some(p) = path {
            if p.as_os_str().is_empty() {
                out.push(
                    key,
                    "\"\"".to_owned(),
                    "must not be empty; remove the key instead",
                );
            }
        }
    }
    if let Some(px) = im.pixel_size_um {
        if !(px > 0.0 && px <= 100.0) {
            out.push(
                "imaging.pixel_size_um",
                fmt_f64(px),
                "must be > 0 and <= 100 µm (the size of one pixel in the sample)",
            );
        }
    }
    let fc = &im.fov_check;
    out.int_range(
        "imaging.fov_check.frames",
        fc.frames.into(),
        1,
        1000,
        " frames",
    );
    out.float_range(
        "imaging.fov_check.timeout_s",
        fc.timeout_s,
        1.0,
        120.0,
        " s",
    );
    if !(fc.max_shift_px > 0.0 && fc.max_shift_px.is_finite()) {
        out.push(
            "imaging.fov_check.max_shift_px",
            fmt_f64(fc.max_shift_px),
            "must be a finite number > 0 pixels",
        );
    }
    if let Some(um) = fc.max_shift_um {
        if !(um > 0.0 && um.is_finite()) {
            out.push(
                "imaging.fov_check.max_shift_um",
                fmt_f64(um),
                "must be a finite number > 0 µm",
            );
        } else if im.pixel_size_um.is_none() {
            out.push(
                "imaging.fov_check.max_shift_um",
                fmt_f64(um),
                "needs [imaging].pixel_size_um (µm per pixel) to convert it: set \
                 pixel_size_um, or give the limit in pixels with max_shift_px",
            );
        }
    }
    out.float_range(
        "imaging.fov_check.max_rotation_deg",
        fc.max_rotation_deg,
        0.0,
        10.0,
        " degrees",
    );
    out.float_range(
        "imaging.fov_check.min_correlation",
        fc.min_correlation,
        0.0,
        1.0,
        "",
    );
    out.float_range(
        "imaging.neuropil_coefficient",
        im.neuropil_coefficient,
        0.0,
        1.0,
        "",
    );
    let b = &im.baseline;
    out.positive("imaging.baseline.window_s", b.window_s, " s");
    if !(b.percentile >= 0.0 && b.percentile < 100.0) {
        out.push(
            "imaging.baseline.percentile",
            fmt_f64(b.percentile),
            "must be >= 0 and < 100",
        );
    }
    if !(b.smoothing_sigma_frames >= 0.0 && b.smoothing_sigma_frames.is_finite()) {
        out.push(
            "imaging.baseline.smoothing_sigma_frames",
            fmt_f64(b.smoothing_sigma_frames),
            "must be a finite number >= 0 frames (0 = no smoothing)",
        );
    }
}

fn storage(c: &RigConfig, out: &mut Issues) {
    let s = &c.storage;
    if !s.data_root.is_absolute() {
        out.push(
            "storage.data_root",
            quoted(&s.data_root.to_string_lossy()),
            "must be an absolute path (the daemon's working directory is not yours)",
        );
    }
    out.int_range(
        "storage.fsync_interval_ms",
        s.fsync_interval_ms.into(),
        1,
        1000,
        " ms (a crash may lose at most one second)",
    );
    out.int_range(
        "storage.chunk_minutes",
        s.chunk_minutes.into(),
        1,
        1440,
        " minutes (the session's .npy files start a new chunk file this often; \
         60 keeps a 12-hour session at 12 files per stream)",
    );
}

fn control(c: &RigConfig, out: &mut Issues) {
    let ctl = &c.control;
    let socket = ctl.socket.to_string_lossy();
    if !ctl.socket.is_absolute() || socket.len() > MAX_SOCKET_PATH_BYTES {
        out.push(
            "control.socket",
            quoted(&socket),
            format!("must be an absolute path of at most {MAX_SOCKET_PATH_BYTES} bytes"),
        );
    }
    if ctl.mode > 0o777 {
        out.push(
            "control.mode",
            format!("0o{:o}", ctl.mode),
            "must be a permission mode <= 0o777, e.g. 0o660",
        );
    } else if ctl.mode & 0o002 != 0 {
        out.push(
            "control.mode",
            format!("0o{:o}", ctl.mode),
            "must not be world-writable (anyone could start sessions or open the valve); \
             use 0o660 and control.group",
        );
    }
    if let Some(group) = &ctl.group {
        out.non_empty("control.group", group);
    }
}

fn preview(c: &RigConfig, out: &mut Issues) {
    let p = &c.preview;
    match p.bind.parse::<IpAddr>() {
        Err(_) => out.push(
            "preview.bind",
            quoted(&p.bind),
            "must be an IP address, e.g. \"127.0.0.1\" or \"::1\"",
        ),
        Ok(ip) if !ip.is_loopback() && !p.allow_non_loopback => out.push(
            "preview.bind",
            quoted(&p.bind),
            "is not a loopback address: anyone on the network could watch the rig; bind \
             \"127.0.0.1\" or set preview.allow_non_loopback = true",
        ),
        Ok(_) => {}
    }
    if p.port == 0 {
        out.push("preview.port", "0".to_owned(), "must be 1..=65535");
    }
}

fn safety(c: &RigConfig, out: &mut Issues) {
    let s = &c.safety;
    out.int_range(
        "safety.max_valve_open_ms",
        s.max_valve_open_ms.into(),
        1,
        5000,
        " ms",
    );
    out.int_range(
        "safety.max_flush_ms",
        s.max_flush_ms.into(),
        1,
        60_000,
        " ms",
    );
    out.int_range(
        "safety.heartbeat_interval_ms",
        s.heartbeat_interval_ms.into(),
        1,
        10_000,
        " ms",
    );
    let min_timeout = u64::from(s.heartbeat_interval_ms) * 2;
    if u64::from(s.heartbeat_timeout_ms) < min_timeout {
        out.push(
            "safety.heartbeat_timeout_ms",
            s.heartbeat_timeout_ms.to_string(),
            format!(
                "must be >= 2 x safety.heartbeat_interval_ms ({min_timeout} ms), so one late \
                 heartbeat does not stop the session"
            ),
        );
    }
    out.positive("safety.max_water_per_day_ul", s.max_water_per_day_ul, " µL");
    out.positive(
        "safety.max_water_per_session_ul",
        s.max_water_per_session_ul,
        " µL",
    );
    let day_ok = s.max_water_per_day_ul > 0.0 && s.max_water_per_day_ul.is_finite();
    if day_ok && s.max_water_per_session_ul > s.max_water_per_day_ul {
        out.push(
            "safety.max_water_per_session_ul",
            fmt_f64(s.max_water_per_session_ul),
            format!(
                "must be <= safety.max_water_per_day_ul ({} µL)",
                s.max_water_per_day_ul
            ),
        );
    }
    out.int_range(
        "safety.max_session_min",
        s.max_session_min.into(),
        1,
        1440,
        " min",
    );
    if let Some(target) = s.daily_water_target_ul {
        if !(target > 0.0 && (target <= s.max_water_per_day_ul || !day_ok)) {
            out.push(
                "safety.daily_water_target_ul",
                fmt_f64(target),
                format!(
                    "must be > 0 and <= safety.max_water_per_day_ul ({} µL); remove the key \
                     to not track a target",
                    s.max_water_per_day_ul
                ),
            );
        }
    }
}

fn alerts(c: &RigConfig, out: &mut Issues) {
    let a = &c.alerts;
    if let Some(cmd) = &a.command {
        if cmd.trim().is_empty() {
            out.push(
                "alerts.command",
                quoted(cmd),
                "must be a shell command; remove the key to only log alerts",
            );
        }
    }
    out.int_range(
        "alerts.device_lost_s",
        a.device_lost_s.into(),
        1,
        86_400,
        " s",
    );
    if a.disk_free_min_mb == 0 {
        out.push("alerts.disk_free_min_mb", "0".to_owned(), "must be >= 1");
    }
    out.int_range(
        "alerts.command_timeout_s",
        a.command_timeout_s.into(),
        1,
        600,
        " s",
    );
}

fn realtime(c: &RigConfig, out: &mut Issues) {
    out.int_range(
        "realtime.reader_priority",
        c.realtime.reader_priority.into(),
        0,
        98,
        "",
    );
}

fn lab_and_training(c: &RigConfig, out: &mut Issues) {
    let tz = &c.lab.timezone;
    if jiff::tz::TimeZone::get(tz).is_err() {
        out.push(
            "lab.timezone",
            quoted(tz),
            "must be a time zone of the tz database: an IANA name like \"America/Los_Angeles\", \
             \"Europe/Berlin\" or \"UTC\"",
        );
    }
    let Some(t) = &c.training else { return };
    if !(t.min_weight_pct.is_finite() && (50.0..=100.0).contains(&t.min_weight_pct)) {
        out.push(
            "training.min_weight_pct",
            fmt_f64(t.min_weight_pct),
            "must be a percentage of the baseline weight, 50..=100 (80 is the usual rule)",
        );
    }
    if let Some(p) = &t.protocol {
        if p.as_os_str().is_empty() {
            out.push(
                "training.protocol",
                "\"\"".to_owned(),
                "must name a protocol file (or leave the key out)",
            );
        }
    }
}
