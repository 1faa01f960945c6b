//! Loading, defaults, validation rules and error locations.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use super::*;

const EXAMPLE: &str = include_str!("../../docs/examples/rig.toml");

fn parse(text: &str) -> Result<Loaded, ConfigError> {
    parse_str(text, Path::new("rig.toml"))
}

fn loaded(text: &str) -> Loaded {
    match parse(text) {
        Ok(l) => l,
        Err(e) => panic!("expected {text:?} to load, got:\n{e}"),
    }
}

/// Every problem, displayed, for a text that must fail.
fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected {text:?} to fail"),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

/// The single problem of a text that must fail with exactly one.
fn error(text: &str) -> String {
    let all = errors(text);
    assert_eq!(
        all.len(),
        1,
        "expected one error for {text:?}, got {all:#?}"
    );
    all.into_iter().next().unwrap_or_default()
}

#[test]
fn empty_file_is_the_defaults() {
    let l = loaded("");
    assert_eq!(l.config, RigConfig::default());
    assert_eq!(l.config.rig.sample_rate_hz, 1000);
    assert_eq!(l.config.control.mode, 0o660);
    assert_eq!(l.config.imaging.baseline.method, BaselineMethod::Maximin);
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(l.warnings[0].contains("EXAMPLE calibration"));
    assert!(l.warnings[0].starts_with("rig.toml: valve.calibration is not set"));
}

#[test]
fn empty_sections_are_the_defaults() {
    let text = "[rig]\n[task]\n[valve]\n[imaging]\n[imaging.baseline]\n[storage]\n\
                [control]\n[preview]\n[safety]\n";
    assert_eq!(loaded(text).config, RigConfig::default());
}

#[test]
fn example_file_loads_with_no_errors_and_no_warnings() {
    let l = loaded(EXAMPLE);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    // The example shows the defaults (optional keys are commented out).
    assert_eq!(l.config, RigConfig::default());
}

#[test]
fn example_file_sets_every_key() {
    let example = toml_edit::ImDocument::parse(EXAMPLE).expect("example parses");
    let mut full = RigConfig::default();
    full.task.max_trials = Some(1);
    full.imaging.roi_labels = Some("x".into());
    let defaults = toml_edit::ImDocument::parse(full.to_toml_string().expect("defaults serialize"))
        .expect("defaults reparse");
    fn keys(prefix: &str, t: &dyn toml_edit::TableLike, out: &mut Vec<String>) {
        for (k, item) in t.iter() {
            let path = if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            };
            match item.as_table_like() {
                Some(sub) => keys(&path, sub, out),
                None => out.push(path),
            }
        }
    }
    let (mut want, mut have) = (Vec::new(), Vec::new());
    keys("", defaults.as_table(), &mut want);
    keys("", example.as_table(), &mut have);
    for key in want {
        let optional = ["task.max_trials", "imaging.roi_labels"].contains(&key.as_str());
        if !optional {
            assert!(
                have.contains(&key),
                "docs/examples/rig.toml does not set {key}"
            );
        }
    }
    // Optional keys appear as comments.
    for key in [
        "max_trials",
        "max_rewards",
        "max_duration_min",
        "roi_labels",
        "roi_table",
        "reference_image",
        "group",
        "daily_water_target_ul",
        "calibration_file",
        "calibrated_utc",
        "pixel_size_um",
        "max_shift_um",
    ] {
        assert!(EXAMPLE.contains(&format!("# {key} = ")), "{key} not shown");
    }
}

#[test]
fn effective_toml_round_trips() {
    let mut c = RigConfig::default();
    c.task.max_rewards = Some(150);
    c.control.group = Some("rigusers".to_owned());
    c.control.mode = 0o640;
    c.safety.daily_water_target_ul = Some(1000.0);
    c.imaging.reference_image = Some("/data/ref.npy".into());
    let text = c.to_toml_string().expect("serializes");
    assert!(text.contains("mode = 0o640\n"), "{text}");
    assert!(text.contains("[[valve.calibration]]"), "{text}");
    assert_eq!(loaded(&text).config, c);
    assert!(loaded(&text).warnings.is_empty());
}

#[test]
fn values_override_defaults_and_octal_mode_parses() {
    let l = loaded(
        "[rig]\nname = \"rig-2_b\"\nsample_rate_hz = 2000\n[control]\nmode = 0o640\n\
         group = \"lab\"\n[imaging.baseline]\nmethod = \"percentile\"\n",
    );
    assert_eq!(l.config.rig.name, "rig-2_b");
    assert_eq!(l.config.rig.sample_rate_hz, 2000);
    assert_eq!(l.config.rig.sample_period_us(), Some(500));
    assert_eq!(l.config.control.mode, 0o640);
    assert_eq!(l.config.control.group.as_deref(), Some("lab"));
    assert_eq!(l.config.imaging.baseline.method, BaselineMethod::Percentile);
    assert_eq!(l.config.task.max_trials, None);
}

#[test]
fn units_convert() {
    let rig = RigSection::default();
    assert_eq!(rig.mm_to_counts(1.5), 60.0);
    assert_eq!(rig.counts_to_mm(60.0), 1.5);
    assert_eq!(
        PreviewSection::default().bind_addr(),
        Some([127, 0, 0, 1].into())
    );
}

// ---- cross-field checks -------------------------------------------------

#[test]
fn threshold_must_be_inside_the_lever_travel() {
    assert_eq!(
        error("[task]\nthreshold_mm = -2\n"),
        "rig.toml:2:16: task.threshold_mm = -2: must be > 0 and < rig.lever_travel_mm (6 mm)"
    );
    assert_eq!(
        error("[task]\nthreshold_mm = 6.0\n"),
        "rig.toml:2:16: task.threshold_mm = 6.0: must be > 0 and < rig.lever_travel_mm (6 mm)"
    );
    assert!(error("[task]\nthreshold_mm = 0\n").contains("must be > 0"));
    loaded("[task]\nthreshold_mm = 5.9\n");
    // A shorter lever makes the default threshold too far.
    assert_eq!(
        error("[rig]\nlever_travel_mm = 1.0\n"),
        "rig.toml:1:1: task.threshold_mm = 1.5 (default): must be > 0 and < \
         rig.lever_travel_mm (1 mm)"
    );
}

#[test]
fn baud_must_carry_the_lever_stream() {
    let e = error("[rig]\nbaud = 115200\nsample_rate_hz = 10000\n");
    assert!(e.starts_with("rig.toml:2:8: rig.baud = 115200: too slow for the lever stream"));
    // The fixes it names are each enough, and each is the least change.
    let needed = protocol::serial::lever_stream_bytes_per_s(10_000, 1) * 10.0 / 0.8;
    let min_baud = needed.ceil() as u32;
    assert!(
        e.contains(&format!("raise rig.baud to >= {min_baud}")),
        "{e}"
    );
    loaded(&format!(
        "[rig]\nbaud = {min_baud}\nsample_rate_hz = 10000\n"
    ));
    error(&format!(
        "[rig]\nbaud = {}\nsample_rate_hz = 10000\n",
        min_baud - 1
    ));
    let rate = number_after(&e, "lower rig.sample_rate_hz to <= ");
    loaded(&format!("[rig]\nbaud = 115200\nsample_rate_hz = {rate}\n"));
    // At 115200 baud no batch size carries 10 kHz; at 1 Mbaud one does.
    assert!(!e.contains("samples_per_batch to"), "{e}");
    let e = error("[rig]\nsample_rate_hz = 10000\n");
    let batch = number_after(&e, "raise rig.samples_per_batch to >= ");
    loaded(&format!(
        "[rig]\nsample_rate_hz = 10000\nsamples_per_batch = {batch}\n"
    ));
    error(&format!(
        "[rig]\nsample_rate_hz = 10000\nsamples_per_batch = {}\n",
        batch - 1
    ));
    // Batching more samples per frame needs fewer bits.
    loaded("[rig]\nsample_rate_hz = 10000\nsamples_per_batch = 50\n");
    // The default (1000 Hz, 1 per frame, 1 Mbaud) fits.
    loaded("");
}

fn number_after(text: &str, prefix: &str) -> u32 {
    let rest = text.split(prefix).nth(1).unwrap_or_default();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {text}"))
}

#[test]
fn sample_rate_must_divide_a_million() {
    let rig = "[rig]\nbaud = 2000000\nsamples_per_batch = 50\n";
    for rate in [1, 1000, 2000, 8000, 20_000] {
        loaded(&format!("{rig}sample_rate_hz = {rate}\n"));
    }
    for rate in [0, 3000, 999, 40_000] {
        let e = error(&format!("{rig}sample_rate_hz = {rate}\n"));
        assert!(e.contains("divide 1000000 exactly"), "{e}");
    }
    assert!(error("[rig]\nsamples_per_batch = 51\n").contains("must be 1..=50"));
    assert!(error("[rig]\nsamples_per_batch = 0\n").contains("must be 1..=50"));
}

#[test]
fn iti_min_must_not_exceed_max() {
    assert_eq!(
        error("[task]\niti_min_ms = 7000\n"),
        "rig.toml:2:14: task.iti_min_ms = 7000: must be <= task.iti_max_ms (6000 ms); \
         lower iti_min_ms or raise iti_max_ms"
    );
    loaded("[task]\niti_min_ms = 6000\n");
}

#[test]
fn reward_must_be_inside_the_calibration() {
    let e = error("[task]\nreward_ul = 9.0\n");
    assert!(e.starts_with("rig.toml:2:13: task.reward_ul = 9.0: must be inside the valve"));
    assert!(e.contains("(2..=8.6 µL)"), "{e}");
    assert!(error("[task]\nreward_ul = 1.0\n").contains("calibration's range"));
    assert!(error("[task]\nreward_ul = 0\n").contains("must be a finite number > 0"));
    loaded("[task]\nreward_ul = 8.6\n");
}

#[test]
fn reward_must_not_need_more_than_the_valve_cap() {
    let e = error("[task]\nreward_ul = 8.0\n[safety]\nmax_valve_open_ms = 50\n");
    assert!(
        e.contains("needs the valve open 74.5 ms")
            && e.contains("safety.max_valve_open_ms (50 ms)"),
        "{e}"
    );
    loaded("[task]\nreward_ul = 8.0\n[safety]\nmax_valve_open_ms = 75\n");
}

/// The device times the valve in whole microseconds: a reward the
/// calibration turns into less than 1 µs would be a pulse of 0 (a check the
/// task engine used to make on its own).
#[test]
fn reward_must_need_at_least_a_microsecond_of_valve() {
    let from_zero = "[[valve.calibration]]\nopen_ms = 0.0\nvolume_ul = 0.0\n\
                     [[valve.calibration]]\nopen_ms = 40.0\nvolume_ul = 4.0\n\
                     [task]\nreward_ul = ";
    let e = error(&format!("{from_zero}0.000001\n"));
    assert_eq!(
        e,
        "rig.toml:8:13: task.reward_ul = 0.000001: needs the valve open 0.01 µs by the \
         calibration, less than the 1 µs the device can time; raise the reward or check the \
         calibration's smallest point"
    );
    // 0.1 µL is 1 ms; 0.0001 µL is exactly 1 µs.
    loaded(&format!("{from_zero}0.1\n"));
    loaded(&format!("{from_zero}0.0001\n"));
}

#[test]
fn calibration_needs_two_increasing_points() {
    let one = "[[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 1.0\n";
    assert!(
        error(one).starts_with("rig.toml:1:1: valve.calibration = 1 point(s): needs at least 2")
    );
    let not_increasing = "[task]\nreward_ul = 1.5\n\
        [[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 1.0\n\
        [[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 2.0\n";
    assert_eq!(
        errors(not_increasing),
        [
            "rig.toml:7:11: valve.calibration[1].open_ms = 10.0: must be greater than the \
          previous point's open_ms (10 ms): list the points in strictly increasing order"
        ]
    );
    let volume_down = "[task]\nreward_ul = 1.5\n\
        [[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 2.0\n\
        [[valve.calibration]]\nopen_ms = 20.0\nvolume_ul = 1.0\n";
    assert!(error(volume_down).contains("valve.calibration[1].volume_ul = 1.0"));
    let negative = "[task]\nreward_ul = 1.5\n\
        [[valve.calibration]]\nopen_ms = -1.0\nvolume_ul = 1.0\n\
        [[valve.calibration]]\nopen_ms = 20.0\nvolume_ul = 2.0\n";
    assert!(error(negative).contains("valve.calibration[0].open_ms = -1.0: must be a finite"));
    // A custom calibration is used and no warning is given.
    let custom = "[task]\nreward_ul = 1.5\n\
        [[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 1.0\n\
        [[valve.calibration]]\nopen_ms = 20.0\nvolume_ul = 2.0\n";
    let l = loaded(custom);
    assert!(l.warnings.is_empty());
    assert_eq!(l.config.valve.open_ms_for_volume(1.5), Ok(15.0));
}

#[test]
fn heartbeat_timeout_must_be_twice_the_interval() {
    assert_eq!(
        error("[safety]\nheartbeat_interval_ms = 300\n"),
        "rig.toml:1:1: safety.heartbeat_timeout_ms = 500 (default): must be >= 2 x \
         safety.heartbeat_interval_ms (600 ms), so one late heartbeat does not stop the session"
    );
    loaded("[safety]\nheartbeat_interval_ms = 250\n");
}

#[test]
fn session_water_cap_must_not_exceed_the_daily_cap() {
    assert_eq!(
        error("[safety]\nmax_water_per_session_ul = 2000.0\n"),
        "rig.toml:2:28: safety.max_water_per_session_ul = 2000.0: must be <= \
         safety.max_water_per_day_ul (1500 µL)"
    );
    assert!(error("[safety]\ndaily_water_target_ul = 2000.0\n").contains("daily_water_target_ul"));
    loaded("[safety]\nmax_water_per_session_ul = 1500.0\ndaily_water_target_ul = 1000.0\n");
}

#[test]
fn non_loopback_preview_needs_allow_non_loopback() {
    let e = error("[preview]\nbind = \"0.0.0.0\"\n");
    assert!(e.starts_with("rig.toml:2:8: preview.bind = \"0.0.0.0\": is not a loopback address"));
    assert!(e.contains("allow_non_loopback = true"));
    loaded("[preview]\nbind = \"0.0.0.0\"\nallow_non_loopback = true\n");
    loaded("[preview]\nbind = \"::1\"\n");
    assert!(error("[preview]\nbind = \"localhost\"\n").contains("must be an IP address"));
    assert!(error("[preview]\nport = 0\n").contains("preview.port = 0"));
}

#[test]
fn single_key_rules() {
    let cases = [
        ("[rig]\nname = \"\"\n", "rig.name"),
        ("[rig]\nname = \"my rig\"\n", "rig.name"),
        ("[rig]\nbaud = 0\n", "rig.baud"),
        (
            "[rig]\nencoder_counts_per_mm = 0\n",
            "rig.encoder_counts_per_mm",
        ),
        ("[task]\ncue_tone_hz = 500\n", "task.cue_tone_hz"),
        ("[task]\ncue_level_pct = 101\n", "task.cue_level_pct"),
        ("[task]\nmax_trials = 0\n", "task.max_trials"),
        ("[task]\nmax_duration_min = 0\n", "task.max_duration_min"),
        ("[imaging]\nshm_name = \"frames\"\n", "imaging.shm_name"),
        ("[imaging]\nshm_name = \"/a/b\"\n", "imaging.shm_name"),
        ("[imaging]\nshm_name = \"/\"\n", "imaging.shm_name"),
        ("[imaging]\nwidth = 0\n", "imaging.width"),
        ("[imaging]\nchannels = 3\n", "imaging.channels"),
        ("[imaging]\nframe_rate_hz = 0.0\n", "imaging.frame_rate_hz"),
        (
            "[imaging]\nneuropil_coefficient = 1.5\n",
            "imaging.neuropil_coefficient",
        ),
        (
            "[imaging.baseline]\nwindow_s = 0.0\n",
            "imaging.baseline.window_s",
        ),
        (
            "[imaging.baseline]\npercentile = 100.0\n",
            "imaging.baseline.percentile",
        ),
        (
            "[imaging.baseline]\nsmoothing_sigma_frames = -1.0\n",
            "imaging.baseline.smoothing_sigma_frames",
        ),
        ("[storage]\ndata_root = \"sessions\"\n", "storage.data_root"),
        (
            "[storage]\nfsync_interval_ms = 2000\n",
            "storage.fsync_interval_ms",
        ),
        (
            "[storage]\nfsync_interval_ms = 0\n",
            "storage.fsync_interval_ms",
        ),
        ("[storage]\nchunk_minutes = 0\n", "storage.chunk_minutes"),
        ("[storage]\nchunk_minutes = 1441\n", "storage.chunk_minutes"),
        ("[control]\nmode = 0o1777\n", "control.mode"),
        ("[control]\nmode = 0o662\n", "control.mode"),
        ("[control]\nsocket = \"rigd.sock\"\n", "control.socket"),
        ("[safety]\nmax_session_min = 0\n", "safety.max_session_min"),
        (
            "[safety]\nmax_water_per_day_ul = -1.0\n",
            "safety.max_water_per_day_ul",
        ),
    ];
    for (text, key) in cases {
        let e = error(text);
        assert!(e.starts_with("rig.toml:2:"), "{text:?}: {e}");
        assert!(e.contains(&format!(": {key} = ")), "{text:?}: {e}");
    }
}

// ---- locations and messages ---------------------------------------------

#[test]
fn errors_point_at_the_value_of_the_right_key() {
    let text = "# a comment\n\n[rig]\nname = \"rig1\"\n\n[task]\ncue_tone_hz = 6000\n\
                threshold_mm   =   -2   # too small\nreward_ul = 4.0\n";
    assert_eq!(
        error(text),
        "rig.toml:8:20: task.threshold_mm = -2: must be > 0 and < rig.lever_travel_mm (6 mm)"
    );
    // Inline tables and dotted keys are found too.
    assert!(error("task = { reward_ul = 4.0, threshold_mm = 9 }\n").starts_with("rig.toml:1:42:"));
    assert!(error("task.threshold_mm = 9\n").starts_with("rig.toml:1:21:"));
    // Columns count characters, not bytes.
    assert!(
        error("[rig]\nserial_port = \"é\" # é\n[task]\nthreshold_mm = 9\n")
            .starts_with("rig.toml:4:16:")
    );
}

#[test]
fn absent_key_points_at_its_section_header() {
    let text = "[rig]\nlever_travel_mm = 1.0\n\n[task]\nreward_ul = 4.0\n";
    assert_eq!(
        error(text),
        "rig.toml:4:1: task.threshold_mm = 1.5 (default): must be > 0 and < \
         rig.lever_travel_mm (1 mm)"
    );
}

#[test]
fn all_errors_are_reported_in_file_order() {
    let text = "[safety]\nmax_session_min = 0\n\n[task]\nthreshold_mm = -1\n\
                cue_level_pct = 200\n\n[rig]\nname = \"a b\"\n";
    let all = errors(text);
    let keys: Vec<&str> = all
        .iter()
        .map(|e| e.split(": ").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "safety.max_session_min = 0",
            "task.threshold_mm = -1",
            "task.cue_level_pct = 200",
            "rig.name = \"a b\"",
        ]
    );
    match parse(text) {
        Err(e) => {
            assert_eq!(
                e.summary().as_deref(),
                Some("rig.toml: 4 errors, configuration not loaded")
            );
            let shown = e.to_string();
            assert_eq!(shown.lines().count(), 5);
            assert!(shown.ends_with("rig.toml: 4 errors, configuration not loaded"));
        }
        Ok(_) => panic!("must fail"),
    }
}

#[test]
fn unknown_key_in_a_nested_table_names_the_table_and_the_allowed_keys() {
    assert_eq!(
        error("[imaging]\nwidth = 512\n\n[imaging.baseline]\nmethd = \"maximin\"\n"),
        "rig.toml:5:1: imaging.baseline.methd = \"maximin\": unknown key in \
         [imaging.baseline] (did you mean `method`?); allowed keys: method, window_s, \
         percentile, smoothing_sigma_frames"
    );
    let e = error("[task]\nthreshhold_mm = 2\n");
    assert!(e.starts_with("rig.toml:2:1: task.threshhold_mm = 2: unknown key in [task] (did you mean `threshold_mm`?); allowed keys: cue_tone_hz,"), "{e}");
    let e = error("[[valve.calibration]]\nopen_ms = 1.0\nvolume = 1.0\n");
    assert!(e.starts_with("rig.toml:3:1: valve.calibration[0].volume = 1.0: unknown key in [[valve.calibration]] (did you mean `volume_ul`?); allowed keys: open_ms, volume_ul"), "{e}");
    let e = error("[sefety]\n");
    assert!(e.starts_with("rig.toml:1:2: sefety: unknown key at the top level (did you mean `safety`?); allowed keys: rig, task,"), "{e}");
    let e = error("[task]\nxyzzy = 1\n");
    assert!(!e.contains("did you mean"), "{e}");
}

#[test]
fn unknown_keys_and_type_errors_are_reported_together_with_the_rules() {
    let text = "[rig]\nbaud = \"fast\"\nsampel_rate_hz = 1000\n\n[task]\nthreshhold_mm = 2\n\
                iti_min_ms = 9000\niti_max_ms = 1000\n";
    let e = parse_str(text, Path::new("rig.toml"))
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = e
        .lines()
        .filter(|l| {
            l.strip_prefix("rig.toml:")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    assert_eq!(lines.len(), 4, "{e}");
    assert!(e.contains("4 errors"), "{e}");
    assert!(
        lines[0].starts_with("rig.toml:2:8: rig.baud = \"fast\""),
        "{e}"
    );
    assert!(
        lines[1].starts_with("rig.toml:3:1: rig.sampel_rate_hz"),
        "{e}"
    );
    assert!(
        lines[2].starts_with("rig.toml:6:1: task.threshhold_mm"),
        "{e}"
    );
    assert!(lines[3].contains("iti_m"), "{e}");
}

#[test]
fn likely_slips_load_with_a_warning() {
    let cal = "[[valve.calibration]]\nopen_ms = 10.0\nvolume_ul = 2.0\n[[valve.calibration]]\nopen_ms = 80.0\nvolume_ul = 10.0\n";
    let l = loaded(&format!(
        "[task]\nresponse_window_ms = 10\ncue_level_pct = 0\nthreshold_mm = 0.01\n{cal}"
    ));
    assert_eq!(l.warnings.len(), 3, "{:?}", l.warnings);
    assert!(
        l.warnings[0].starts_with("rig.toml:2:22: task.response_window_ms = 10: "),
        "{:?}",
        l.warnings
    );
    assert!(l.warnings[0].contains("milliseconds"), "{:?}", l.warnings);
    assert!(
        l.warnings[1].contains("task.cue_level_pct = 0: the cue tone is silent"),
        "{:?}",
        l.warnings
    );
    assert!(
        l.warnings[2].contains("task.threshold_mm = 0.01: below one encoder count (0.0250 mm"),
        "{:?}",
        l.warnings
    );
    // None for ordinary values.
    let l = loaded(&format!("[task]\nresponse_window_ms = 2000\n{cal}"));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn type_errors_name_the_key_and_the_expected_type() {
    assert_eq!(
        error("[rig]\nbaud = \"fast\"\n"),
        "rig.toml:2:8: rig.baud = \"fast\": invalid type: string \"fast\", expected a whole \
         number from 0 to 4294967295"
    );
    assert!(error("[imaging]\nenabled = 1\n")
        .contains("imaging.enabled = 1: invalid type: integer `1`, expected true or false"));
    assert!(error("[imaging.baseline]\nmethod = \"median\"\n")
        .contains("expected `maximin` or `percentile`"));
    assert!(error("[preview]\nport = 70000\n").contains("preview.port = 70000"));
    assert!(error("task = 3\n").starts_with("rig.toml:1:8: task = 3: invalid type"));
}

#[test]
fn syntax_errors_say_it_is_not_toml() {
    let e = error("hello world\n");
    assert!(e.starts_with("rig.toml:1:7: not valid TOML: "), "{e}");
    let e = error("[rig]\nname = \"unterminated\n");
    assert!(e.starts_with("rig.toml:2:"), "{e}");
    assert!(error("[rig]\n[rig]\n").contains("not valid TOML"));
}

#[test]
fn load_reports_unreadable_and_non_utf8_files() {
    let dir = std::env::temp_dir().join(format!("rig-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let missing = dir.join("missing.toml");
    match load(&missing) {
        Err(e @ ConfigError::Read { .. }) => {
            let s = e.to_string();
            assert!(
                s.starts_with(&format!("cannot read {}: ", missing.display())),
                "{s}"
            );
            assert!(s.contains("os error 2"), "{s}");
        }
        other => panic!("{other:?}"),
    }
    let binary = dir.join("binary.toml");
    std::fs::write(&binary, b"[rig]\nname = \"\xff\xfe\"\n").expect("write");
    match load(&binary) {
        Err(e @ ConfigError::NotUtf8 { .. }) => {
            assert!(e.to_string().contains(":2:9: not UTF-8 text"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let good = dir.join("good.toml");
    std::fs::write(&good, EXAMPLE).expect("write");
    assert!(load(&good).is_ok());
    // Not files: refused before anything is opened (a FIFO would block the
    // read, /dev/zero would never end).
    match load(&dir) {
        Err(
            e @ ConfigError::NotAFile {
                kind: "a folder", ..
            },
        ) => {
            assert!(e.to_string().contains("not a configuration file"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let fifo = dir.join("fifo.toml");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    assert!(matches!(
        load(&fifo),
        Err(ConfigError::NotAFile {
            kind: "a named pipe",
            ..
        })
    ));
    assert!(matches!(
        load(std::path::Path::new("/dev/zero")),
        Err(ConfigError::NotAFile {
            kind: "a device",
            ..
        })
    ));
    let huge = dir.join("huge.toml");
    std::fs::write(&huge, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).expect("write");
    match load(&huge) {
        Err(e @ ConfigError::TooLarge { .. }) => {
            assert!(e.to_string().contains("is this the right file"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn odd_inputs_never_panic() {
    let deep_header = format!("[{}]\n", vec!["a"; 5000].join("."));
    let deep_task = format!("[task.{}]\n", vec!["a"; 5000].join("."));
    let deep_array = format!("x = {}{}\n", "[".repeat(200), "]".repeat(200));
    let long_line = "#".repeat(100_000);
    let inputs: Vec<String> = [
        "\u{feff}",
        "\0",
        "=",
        "[",
        "[[",
        "[]",
        "a.b.c = 1\na = 1",
        "rig = []",
        "rig = [1, 2]",
        "valve = { calibration = 3 }",
        "valve.calibration = []",
        "valve.calibration = [{ open_ms = 1.0, volume_ul = 1.0 }, 7]",
        "[[valve.calibration]]\n[[valve.calibration]]\n",
        "[task]\nreward_ul = inf\nthreshold_mm = nan\n",
        "[task]\nreward_ul = -inf\n[rig]\nlever_travel_mm = nan\n",
        "[rig]\nbaud = 99999999999999999999\n",
        "[rig]\nbaud = 4294967295\nsample_rate_hz = 4294967295\nsamples_per_batch = 4294967295\n",
        "[rig]\nsample_rate_hz = 20000\nsamples_per_batch = 1\nbaud = 4294967295\n",
        "[safety]\nheartbeat_interval_ms = 4294967295\nheartbeat_timeout_ms = 4294967295\n",
        "[rig]\nbaud = 1979-05-27T07:32:00Z\n",
        "[imaging]\nshm_name = \"/é\"\n",
        "[imaging]\nshm_name = \"\"\n",
        "[control]\nmode = -0o1\n",
        "[preview]\nbind = \"\"\n",
        "\r\n\r\n[task]\r\nthreshold_mm = -1\r\n",
        "\"\\u0000\" = 1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([deep_header, deep_task, deep_array, long_line])
    .collect();
    for text in inputs {
        // Any outcome but a panic is fine; errors must be located.
        if let Err(e) = parse(&text) {
            for p in e.problems() {
                assert!(p.line >= 1 && p.column >= 1);
                assert!(!p.message.is_empty());
            }
        }
    }
}

#[test]
fn edit_distance_and_suggestions() {
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("threshhold_mm", "threshold_mm"), 1);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    let allowed = vec!["method".to_owned(), "window_s".to_owned()];
    assert_eq!(closest("methd", &allowed), Some("method"));
    assert_eq!(closest("zzz", &allowed), None);
    assert_eq!(closest("window", &allowed), Some("window_s"));
    assert_eq!(closest("win", &allowed), None);
}

#[test]
fn fov_check_limits_are_checked_and_a_limit_in_um_needs_the_pixel_size() {
    let e = error("[imaging.fov_check]\nmax_shift_um = 5.0\n");
    assert!(
        e.contains("imaging.fov_check.max_shift_um") && e.contains("pixel_size_um"),
        "{e}"
    );
    let l = loaded("[imaging]\npixel_size_um = 0.8\n[imaging.fov_check]\nmax_shift_um = 5.0\n");
    assert_eq!(l.config.imaging.fov_check.max_shift_um, Some(5.0));
    for (bad, key) in [
        ("frames = 0", "imaging.fov_check.frames"),
        ("min_correlation = 1.5", "imaging.fov_check.min_correlation"),
        ("max_shift_px = 0.0", "imaging.fov_check.max_shift_px"),
        ("on_fail = \"ignore\"", "on_fail"),
    ] {
        let e = error(&format!("[imaging.fov_check]\n{bad}\n"));
        assert!(e.contains(key), "{bad}: {e}");
    }
    let e = error("[imaging]\npixel_size_um = -1.0\n");
    assert!(e.contains("imaging.pixel_size_um"), "{e}");
}

#[test]
fn motion_correction_needs_frames_of_32_pixels() {
    let e = error("[imaging]\nwidth = 32\nheight = 24\n");
    assert!(e.contains("imaging.motion_correction"), "{e}");
    assert!(e.contains("32 x 24"), "{e}");
    loaded("[imaging]\nwidth = 32\nheight = 24\nmotion_correction = false\n");
    loaded("[imaging]\nwidth = 32\nheight = 32\n");
    loaded("[imaging]\nenabled = false\nwidth = 8\nheight = 8\n");
}

#[test]
fn alerts_and_sated_keys_are_checked() {
    assert!(error("[alerts]\ncommand = \"  \"\n").contains("alerts.command"));
    assert!(error("[alerts]\ndevice_lost_s = 0\n").contains("alerts.device_lost_s"));
    assert!(error("[alerts]\ndisk_free_min_mb = 0\n").contains("alerts.disk_free_min_mb"));
    assert!(error("[task]\nsated_after_min = 0\n").contains("task.sated_after_min"));
    let c = loaded("[alerts]\ncommand = \"cat >> /tmp/a\"\n[task]\nsated_after_min = 10\n").config;
    assert_eq!(c.alerts.command.as_deref(), Some("cat >> /tmp/a"));
    assert_eq!(c.task.sated_after_min, Some(10));
}

#[test]
fn chunk_minutes_error_names_the_key_the_value_and_the_range() {
    let e = error("[storage]\nchunk_minutes = 0\n");
    assert!(e.starts_with("rig.toml:2:"), "{e}");
    assert!(
        e.contains("storage.chunk_minutes = 0: must be 1..=1440 minutes"),
        "{e}"
    );
    assert_eq!(
        loaded("[storage]\nchunk_minutes = 1\n")
            .config
            .storage
            .chunk_minutes,
        1
    );
    assert_eq!(RigConfig::default().storage.chunk_minutes, 60);
}

#[test]
fn realtime_keys_are_checked() {
    let e = error("[realtime]\nreader_priority = 99\n");
    assert!(
        e.contains("realtime.reader_priority") && e.contains("0..=98"),
        "{e}"
    );
    let c = loaded("[realtime]\nreader_priority = 0\nhold_cpus_awake = false\n").config;
    assert_eq!(c.realtime.reader_priority, 0);
    assert!(!c.realtime.hold_cpus_awake && !c.realtime.boost_tty_workers && c.realtime.lock_memory);
    assert!(error("[realtime]\nspin = true\n").contains("spin"));
}

#[test]
fn a_long_value_is_elided_in_its_message() {
    let long = "x".repeat(100_000);
    let e = error(&format!("[rig]\nname = \"{long}\"\n"));
    assert!(e.len() < 1000, "{} bytes of message", e.len());
    assert!(e.contains("bytes in all"), "{e}");
}

#[test]
fn the_lab_zone_and_the_training_table_are_checked() {
    let p = Path::new("/etc/rigd/rig.toml");
    let ok = crate::parse_str(
        "[lab]\ntimezone = \"America/Los_Angeles\"\n\n[training]\nprotocol = \"/etc/rigd/protocol.toml\"\nlow_weight = \"warn\"\n",
        p,
    )
    .expect("valid");
    let t = ok.config.training.expect("[training]");
    assert_eq!(t.low_weight, crate::LowWeightAction::Warn);
    assert!(t.require_subject);
    assert_eq!(t.min_weight_pct, 80.0);
    assert!(crate::parse_str("", p)
        .expect("empty")
        .config
        .training
        .is_none());
    for (text, want) in [
        ("[lab]\ntimezone = \"America/Los_Angles\"\n", "lab.timezone"),
        (
            "[training]\nmin_weight_pct = 40.0\n",
            "training.min_weight_pct",
        ),
        ("[training]\nlow_weight = \"ignore\"\n", "low_weight"),
        ("[training]\nprotocl = \"x\"\n", "protocl"),
    ] {
        let e = crate::parse_str(text, p).expect_err(want).to_string();
        assert!(e.contains(want) && e.contains("rig.toml"), "{want}: {e}");
    }
}

#[test]
fn the_calibration_file_replaces_the_inline_points() {
    let dir = std::env::temp_dir().join(format!("rig-config-cal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("valid");
    let cfg = dir.join("rig.toml");
    std::fs::write(
        &cfg,
        "[task]\nreward_ul = 1.0\n[valve]\ncalibration_file = \"valve.toml\"\n",
    )
    .expect("valid");
    // Missing: a warning, the inline (example) points, and 1 µL is outside them.
    let e = crate::load(&cfg).expect_err("refused").to_string();
    assert!(e.contains("task.reward_ul = 1.0"), "{e}");
    std::fs::write(
        &cfg,
        "[valve]\ncalibration_file = \"valve.toml\"\nmax_calibration_age_days = 10\n",
    )
    .expect("valid");
    let l = crate::load(&cfg).expect("valid");
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("valve.toml does not exist")),
        "{:?}",
        l.warnings
    );
    let file = crate::CalibrationFile {
        calibrated_utc: "2026-12-01T10:00:00Z".into(),
        fit: None,
        point: crate::fit_calibration(&[
            crate::Measurement {
                open_ms: 10.0,
                pulses: 10,
                weight_mg: 5.0,
            },
            crate::Measurement {
                open_ms: 50.0,
                pulses: 10,
                weight_mg: 45.0,
            },
        ])
        .expect("valid"),
    };
    std::fs::write(dir.join("valve.toml"), file.to_toml_string()).expect("valid");
    std::fs::write(
        &cfg,
        "[task]\nreward_ul = 1.0\n[valve]\ncalibration_file = \"valve.toml\"\nmax_calibration_age_days = 10\n",
    )
    .expect("valid");
    let l = crate::load(&cfg).expect("valid");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let v = &l.config.valve;
    assert_eq!(v.calibration.len(), 2);
    assert_eq!(v.calibrated_utc.as_deref(), Some("2026-12-01T10:00:00Z"));
    let day = crate::days_from_date("2026-12-01").expect("valid");
    assert_eq!(v.calibration_age_warning(day + 10), None);
    let w = v.calibration_age_warning(day + 11).expect("valid");
    assert!(
        w.contains("11 days old") && w.contains("max_calibration_age_days = 10"),
        "{w}"
    );
    // A broken file is an error naming it.
    std::fs::write(
        dir.join("valve.toml"),
        "calibrated_utc = \"yesterday\"\n[[point]]\nopen_ms = 1.0\nvolume_ul = 1.0\n",
    )
    .expect("valid");
    let e = crate::load(&cfg).expect_err("refused").to_string();
    assert!(
        e.contains("valve.toml") && e.contains("calibrated_utc"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn calibration_dates_and_ages_are_checked() {
    let e = error("[valve]\ncalibrated_utc = \"last week\"\n");
    assert!(
        e.contains("valve.calibrated_utc = \"last week\": must start with a date"),
        "{e}"
    );
    assert!(error("[valve]\nmax_calibration_age_days = 0\n").contains("max_calibration_age_days"));
}
