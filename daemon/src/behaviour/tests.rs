use std::f64::consts::PI;

use rig_sim::rng::SplitMix64;

use super::filter::Butterworth4;
use super::*;

/// One synthetic press: raised-cosine rise to `amp_mm`, a hold (with an
/// optional dip of `dip` x amplitude in its middle), raised-cosine release.
#[derive(Debug, Clone, Copy)]
struct Press {
    onset_ms: f64,
    amp_mm: f64,
    rise_ms: f64,
    hold_ms: f64,
    release_ms: f64,
    dip: f64,
}

impl Press {
    fn standard(onset_ms: f64) -> Self {
        Self {
            onset_ms,
            amp_mm: 2.5,
            rise_ms: 150.0,
            hold_ms: 200.0,
            release_ms: 100.0,
            dip: 0.0,
        }
    }

    fn at(&self, t_ms: f64) -> f64 {
        let tau = t_ms - self.onset_ms;
        let a = self.amp_mm;
        if tau <= 0.0 {
            0.0
        } else if tau < self.rise_ms {
            a * (1.0 - (PI * tau / self.rise_ms).cos()) / 2.0
        } else if tau < self.rise_ms + self.hold_ms {
            let u = (tau - self.rise_ms) / self.hold_ms;
            a * (1.0 - self.dip * (1.0 - (2.0 * PI * u).cos()) / 2.0)
        } else if tau < self.rise_ms + self.hold_ms + self.release_ms {
            let u = (tau - self.rise_ms - self.hold_ms) / self.release_ms;
            a * (1.0 + (PI * u).cos()) / 2.0
        } else {
            0.0
        }
    }

    /// When the position first reaches `mm` (on a 0.1 ms grid).
    fn crossing_ms(&self, mm: f64) -> f64 {
        let mut t = self.onset_ms;
        while self.at(t) < mm {
            t += 0.1;
        }
        t
    }
}

/// Deterministic, roughly Gaussian noise: the sum of 12 uniforms minus 6.
fn gauss(noise: &mut SplitMix64) -> f64 {
    (0..12).map(|_| noise.uniform()).sum::<f64>() - 6.0
}

/// A trace of `len_ms` at `rate_hz` with the presses, Gaussian noise of
/// `noise_mm` and, if `quantum_mm > 0`, encoder quantisation; the rig time
/// starts at `t0_us`.
fn synth(
    len_ms: u64,
    rate_hz: u64,
    presses: &[Press],
    noise_mm: f64,
    quantum_mm: f64,
    t0_us: u64,
) -> Vec<(u64, f64)> {
    let mut noise = SplitMix64::new(99);
    let period_us = 1_000_000 / rate_hz;
    let n = len_ms * 1000 / period_us;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t_ms = (i * period_us) as f64 / 1000.0;
        let mut x = presses.iter().map(|p| p.at(t_ms)).fold(0.0, f64::max);
        x += noise_mm * gauss(&mut noise);
        if quantum_mm > 0.0 {
            x = (x / quantum_mm).round() * quantum_mm;
        }
        out.push((t0_us + i * period_us, x));
    }
    out
}

fn rewarded(trial: u32, cue_us: u64, cross_us: u64) -> TrialRecord {
    TrialRecord {
        trial,
        t_start_us: cue_us,
        t_cue_us: cue_us,
        t_response_us: Some(cross_us),
        outcome: Outcome::Rewarded,
        t_reward_us: Some(cross_us + 500),
        reward_ul: 4.0,
        valve_open_us: 38_182,
        lever_mm_at_cue: 0.0,
        iti_presses: 0,
        capped: false,
    }
}

fn miss(trial: u32, cue_us: u64) -> TrialRecord {
    TrialRecord {
        trial,
        t_start_us: cue_us,
        t_cue_us: cue_us,
        t_response_us: None,
        outcome: Outcome::Miss,
        t_reward_us: None,
        reward_ul: 0.0,
        valve_open_us: 0,
        lever_mm_at_cue: 0.0,
        iti_presses: 1,
        capped: false,
    }
}

/// Cues every 5 s from 3 s, a press after each with the given reaction
/// time; records for them (times in µs relative to `t0_us`).
fn session(rts_s: &[f64], t0_us: u64) -> (Vec<Press>, Vec<TrialRecord>, u64) {
    let mut presses = Vec::new();
    let mut trials = Vec::new();
    for (i, rt) in rts_s.iter().enumerate() {
        let cue_ms = 3000.0 + 5000.0 * i as f64;
        let p = Press::standard(cue_ms + rt * 1000.0);
        let cross_us = t0_us + (p.crossing_ms(1.5) * 1000.0).round() as u64;
        trials.push(rewarded(
            i as u32 + 1,
            t0_us + cue_ms as u64 * 1000,
            cross_us,
        ));
        presses.push(p);
    }
    let len_ms = 3000 + 5000 * rts_s.len() as u64 + 2000;
    (presses, trials, len_ms)
}

const RTS: [f64; 9] = [0.25, 0.4, 0.6, 0.8, 1.0, 1.3, 0.35, 0.5, 0.7];

#[test]
fn butterworth_has_its_corner_at_5_hz() {
    let f = Butterworth4::lowpass(5.0, 1000.0);
    assert!(
        (f.gain(5.0) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9,
        "{}",
        f.gain(5.0)
    );
    assert!((f.gain(0.0) - 1.0).abs() < 1e-12);
    assert!(f.gain(2.0) > 0.99);
    assert!(
        f.gain(50.0) < 2e-4,
        "4th order: -80 dB a decade: {}",
        f.gain(50.0)
    );

    // The same on a signal: a 5 Hz sine, one pass -> 0.707, both -> 0.5.
    let x: Vec<f64> = (0..20_000)
        .map(|i| (2.0 * PI * 5.0 * i as f64 / 1000.0).sin())
        .collect();
    let mut once = x.clone();
    f.filter_in_place(&mut once);
    let peak_once = once[15_000..].iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        (peak_once - std::f64::consts::FRAC_1_SQRT_2).abs() < 0.003,
        "{peak_once}"
    );
    let both = f.filtfilt(&x);
    let peak_both = both[5_000..15_000]
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!((peak_both - 0.5).abs() < 0.003, "{peak_both}");
    // Zero phase: the filtered sine peaks where the input peaks.
    let i_peak = (10_000..10_200)
        .max_by(|a, b| both[*a].total_cmp(&both[*b]))
        .expect("non-empty");
    assert!(i_peak.abs_diff(10_050) <= 1, "peak at {i_peak}");
    // A constant passes unchanged, ends included (steady-state start).
    let c = f.filtfilt(&[3.0; 500]);
    assert!(c.iter().all(|v| (v - 3.0).abs() < 1e-9));
}

#[test]
fn reaction_times_match_known_onsets() {
    let t0 = 7_000_000;
    let (presses, trials, len_ms) = session(&RTS, t0);
    // 1 kHz, encoder quantisation (40 counts/mm) and a little noise.
    let lever = synth(len_ms, 1000, &presses, 0.004, 0.025, t0);
    let params = SummaryParams::new(10_000_000);
    let parsed = parse_lever(&lever, &params.movement);
    assert_eq!(
        parsed.movements.len(),
        presses.len(),
        "{:?}",
        parsed.movements
    );
    for (m, p) in parsed.movements.iter().zip(&presses) {
        let true_on = t0 as f64 + p.onset_ms * 1000.0;
        let err_ms = (m.onset_us as f64 - true_on) / 1000.0;
        assert!((-10.0..=20.0).contains(&err_ms), "onset off by {err_ms} ms");
        let true_off = true_on + (p.rise_ms + p.hold_ms + p.release_ms) * 1000.0;
        let err_ms = (m.offset_us as f64 - true_off) / 1000.0;
        assert!(
            (-20.0..=10.0).contains(&err_ms),
            "offset off by {err_ms} ms"
        );
    }
    let s = summarize_parsed(&trials, &parsed, &params);
    assert_eq!(s.reaction_time_n, RTS.len() as u64);
    let mut sorted = RTS.to_vec();
    sorted.sort_by(f64::total_cmp);
    let true_median = sorted[sorted.len() / 2];
    let got = s.reaction_time_median_s.expect("reaction times");
    assert!((got - true_median).abs() <= 0.02, "{got} vs {true_median}");
    assert_eq!(s.trials, 9);
    assert_eq!(s.rewards, 9);
    assert_eq!(s.success_rate, Some(1.0));
    assert_eq!(s.water_ul, 36.0);
    assert_eq!(s.movements, 9);
    assert_eq!(s.cued_fraction, Some(1.0));
    let c2r = s.cue_to_reward_median_s.expect("cue to reward");
    assert!((c2r - (true_median + 0.0846)).abs() < 0.002, "{c2r}");
}

#[test]
fn a_10_khz_trace_gives_the_same_onsets() {
    let (presses, trials, len_ms) = session(&RTS[..5], 0);
    let lever = synth(len_ms, 10_000, &presses, 0.004, 0.0, 0);
    let params = SummaryParams::new(10_000_000);
    let parsed = parse_lever(&lever, &params.movement);
    // Bins centred on whole ms: the last 10 kHz samples fall in bin len_ms.
    assert_eq!(parsed.len(), len_ms as usize + 1);
    assert_eq!(parsed.movements.len(), 5);
    for (m, p) in parsed.movements.iter().zip(&presses) {
        let err_ms = (m.onset_us as f64 / 1000.0) - p.onset_ms;
        assert!((-10.0..=20.0).contains(&err_ms), "onset off by {err_ms} ms");
    }
    let s = summarize_parsed(&trials, &parsed, &params);
    let got = s.reaction_time_median_s.expect("reaction times");
    assert!((got - 0.6).abs() <= 0.02, "{got}");
}

#[test]
fn reaction_time_needs_an_onset_inside_the_window() {
    // A press 3 s after a cue with a 2 s window is no reaction (miss); a
    // movement that began before the cue is not one either.
    let cue1 = 2_000_000;
    let cue2 = 10_000_000;
    let presses = [Press::standard(5000.0), Press::standard(9900.0)];
    let lever = synth(14_000, 1000, &presses, 0.002, 0.0, 0);
    let params = SummaryParams::new(2_000_000);
    let trials = [miss(1, cue1), miss(2, cue2)];
    let s = summarize(&trials, &lever, &params);
    assert_eq!(s.reaction_time_n, 0);
    assert_eq!(s.reaction_time_median_s, None);
    assert_eq!(s.success_rate, Some(0.0));
    assert_eq!(s.misses, 2);
    assert_eq!(s.iti_presses_total, 2);
    // Cue 2 came 100 ms into a movement: not cued.
    assert_eq!(s.cued_fraction, Some(0.5));
}

#[test]
fn stereotyped_presses_correlate_and_variable_ones_less() {
    let rts = [0.3; 8];
    let (presses, trials, len_ms) = session(&rts, 0);
    let lever = synth(len_ms, 1000, &presses, 0.004, 0.025, 0);
    let params = SummaryParams::new(10_000_000);
    let same = summarize(&trials, &lever, &params);
    assert_eq!(same.trajectory_n, 8);
    let r_same = same.trajectory_corr_median.expect("correlation");
    assert!(r_same > 0.99, "{r_same}");

    // Variable amplitude, speed, hold and double pushes.
    let mut noise = SplitMix64::new(5);
    let mut presses = Vec::new();
    let mut trials = Vec::new();
    for i in 0..8 {
        let cue_ms = 3000.0 + 5000.0 * i as f64;
        let p = Press {
            onset_ms: cue_ms + 300.0,
            amp_mm: 1.7 + 1.8 * noise.uniform(),
            rise_ms: 80.0 + 400.0 * noise.uniform(),
            hold_ms: 50.0 + 1200.0 * noise.uniform(),
            release_ms: 40.0 + 300.0 * noise.uniform(),
            dip: if i % 2 == 0 { 0.5 } else { 0.0 },
        };
        let cross = (p.crossing_ms(1.5) * 1000.0) as u64;
        trials.push(rewarded(i + 1, cue_ms as u64 * 1000, cross));
        presses.push(p);
    }
    let lever = synth(len_ms, 1000, &presses, 0.004, 0.025, 0);
    let varied = summarize(&trials, &lever, &params);
    let r_varied = varied.trajectory_corr_median.expect("correlation");
    assert!(
        r_varied < 0.95 && r_varied < r_same - 0.05,
        "{r_varied} vs {r_same}"
    );

    // Fewer than 3 trajectories: no correlation.
    let few = summarize(&trials[..2], &lever, &params);
    assert_eq!(few.trajectory_n, 2);
    assert_eq!(few.trajectory_corr_median, None);
}

#[test]
fn pairwise_correlation_basics() {
    let a = vec![0.0, 1.0, 2.0, 3.0];
    let b = vec![1.0, 3.0, 5.0, 7.0];
    let c = vec![3.0, 2.0, 1.0, 0.0];
    let r = median_pairwise_correlation(&[a.clone(), b.clone()]).expect("r");
    assert!((r - 1.0).abs() < 1e-12);
    // pairs: (a,b)=1, (a,c)=-1, (b,c)=-1 -> median -1
    let r = median_pairwise_correlation(&[a.clone(), b, c]).expect("r");
    assert!((r + 1.0).abs() < 1e-12);
    // A flat trajectory is left out.
    assert_eq!(median_pairwise_correlation(&[a, vec![1.0; 4]]), None);
    assert_eq!(median_pairwise_correlation(&[]), None);
}

#[test]
fn empty_short_and_odd_inputs_do_not_panic() {
    let params = SummaryParams::new(10_000_000);
    let s = summarize(&[], &[], &params);
    assert_eq!(s.trials, 0);
    assert_eq!(s.success_rate, None);
    assert_eq!(s.movements, 0);
    assert_eq!(s.lever_duration_s, 0.0);

    let trials = [rewarded(1, 1_000, 2_000), miss(2, 5_000_000)];
    let s = summarize(&trials, &[], &params);
    assert_eq!(s.trials, 2);
    assert_eq!(s.reaction_time_median_s, None);
    assert_eq!(s.cued_fraction, None);
    assert_eq!(s.trajectory_corr_median, None);
    assert!(s.cue_to_reward_median_s.is_some());

    for n in 1..30u64 {
        let lever: Vec<(u64, f64)> = (0..n).map(|i| (1_000 + i * 1000, (i % 7) as f64)).collect();
        let _ = summarize(&trials, &lever, &params);
    }
    // NaN and infinite positions, times going backwards, a corrupt time far
    // in the future.
    let lever = [
        (5_000u64, 0.0),
        (6_000, f64::NAN),
        (4_000, 1.0),
        (7_000, 2.0),
        (u64::MAX / 2, 3.0),
        (8_000, f64::INFINITY),
    ];
    let s = summarize(&trials, &lever, &params);
    assert!(s.lever_duration_s < 4.0 * 3600.0);
    // A constant lever.
    let flat: Vec<(u64, f64)> = (0..5000).map(|i| (i * 1000, 1.25)).collect();
    let s = summarize(&trials, &flat, &params);
    assert_eq!(s.movements, 0);
    assert_eq!(s.cued_fraction, Some(1.0));
    // All-NaN lever.
    let nan: Vec<(u64, f64)> = (0..5000).map(|i| (i * 1000, f64::NAN)).collect();
    let s = summarize(&trials, &nan, &params);
    assert_eq!(s.movements, 0);
    assert_eq!(s.lever_duration_s, 0.0);
}

#[test]
fn gaps_are_interpolated_and_the_grid_is_1_khz() {
    // 1 kHz with a 200 ms hole: the grid covers it with a straight line.
    let lever: Vec<(u64, f64)> = (0..1000u64)
        .filter(|i| !(400..600).contains(i))
        .map(|i| (i * 1000, if i < 500 { 0.0 } else { 2.0 }))
        .collect();
    let (t0, grid) = resample_1khz(&lever);
    assert_eq!(t0, 0);
    assert_eq!(grid.len(), 1000);
    assert_eq!(grid[399], 0.0);
    // filled bins 399 (0 mm) and 600 (2 mm)
    assert!((grid[500] - 2.0 * 101.0 / 201.0).abs() < 1e-12);
    assert_eq!(grid[600], 2.0);
}

#[test]
fn summary_serialises_to_the_documented_keys() {
    let params = SummaryParams::new(10_000_000);
    let s = summarize(&[miss(1, 0)], &[], &params);
    let v = serde_json::to_value(&s).expect("serialises");
    for key in [
        "trials",
        "rewards",
        "misses",
        "water_ul",
        "success_rate",
        "reaction_time_median_s",
        "cue_to_reward_median_s",
        "trajectory_corr_median",
        "iti_presses_total",
        "cued_fraction",
        "movements",
        "method",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert!(v["reaction_time_median_s"].is_null());
    let back: Summary = serde_json::from_value(v).expect("round trip");
    assert_eq!(back, s);
}

/// The task engine and the simulated mouse of the virtual rig, in device
/// time, without the serial link: `minutes` of a session on training `day`.
fn simulated_session(day: u8, minutes: u64, seed: u64) -> Summary {
    use crate::task::{TaskEngine, TaskInput, TaskOutput, TaskParams};
    use protocol::serial::{EventKind, HostCommand};
    use rig_sim::{LeverSpec, Mouse};

    let cfg = rig_config::RigConfig::default();
    let mut params = TaskParams::from_config(&cfg).with_seed(seed);
    // The host decides here (no device to arm).
    params.reward_decision = crate::task::RewardDecision::Host;
    let summary_params = SummaryParams::from_task(&params);
    let mut engine = TaskEngine::new(params);
    let mut mouse = Mouse::new(day, LeverSpec::default(), cfg.task.threshold_mm, seed);
    let mut trials = Vec::new();
    let mut lever = Vec::new();
    let (mut tone_at, mut valve_at): (Option<u64>, Option<(u64, u32)>) = (None, None);
    for ms in 0..minutes * 60_000 {
        let t = ms * 1000;
        let counts = mouse.lever_counts(t as f64);
        lever.push((t, f64::from(counts) / cfg.rig.encoder_counts_per_mm));
        let mut outs = Vec::new();
        engine.step(&TaskInput::Lever { t_us: t, counts }, &mut |o| outs.push(o));
        // The device acts 300 µs after the sample that caused a command.
        if let Some(at) = tone_at.take() {
            mouse.tone_on(at as f64);
            let ev = TaskInput::Device {
                t_us: at,
                kind: EventKind::ToneOn,
                aux: 80,
                value: 6000,
            };
            engine.step(&ev, &mut |o| outs.push(o));
        }
        if let Some((at, us)) = valve_at.take() {
            mouse.water(at as f64);
            let ev = TaskInput::Device {
                t_us: at,
                kind: EventKind::ValveOpen,
                aux: 0,
                value: us,
            };
            engine.step(&ev, &mut |o| outs.push(o));
        }
        for o in outs {
            match o {
                TaskOutput::Command(HostCommand::Tone(_)) => tone_at = Some(t + 300),
                TaskOutput::Command(HostCommand::ValvePulse(v)) => {
                    valve_at = Some((t + 300, v.duration_us))
                }
                TaskOutput::Trial(r) => trials.push(r),
                _ => {}
            }
        }
    }
    engine.step(
        &TaskInput::Stop {
            t_us: minutes * 60_000_000,
        },
        &mut |o| {
            if let TaskOutput::Trial(r) = o {
                trials.push(r)
            }
        },
    );
    summarize(&trials, &lever, &summary_params)
}

#[test]
fn simulated_learning_moves_the_summary_as_in_the_paper() {
    let naive = simulated_session(1, 12, 11);
    let expert = simulated_session(14, 12, 11);
    eprintln!(
        "day 1: {}",
        serde_json::to_string(&naive).unwrap_or_default()
    );
    eprintln!(
        "day 14: {}",
        serde_json::to_string(&expert).unwrap_or_default()
    );
    let get = |s: &Summary, f: fn(&Summary) -> Option<f64>| f(s).expect("a value");
    assert!(get(&expert, |s| s.success_rate) > get(&naive, |s| s.success_rate));
    assert!(get(&expert, |s| s.reaction_time_median_s) < get(&naive, |s| s.reaction_time_median_s));
    assert!(get(&expert, |s| s.trajectory_corr_median) > get(&naive, |s| s.trajectory_corr_median));
}

/// The summary the storage thread now computes from the lever chunks on
/// disk (and recovery from the whole folder) is the summary of the trace
/// that was written, to the last bit.
#[test]
#[allow(clippy::unwrap_used)]
fn summary_from_the_chunk_files_is_the_summary_of_the_written_trace() {
    use session_format::{read_lever_trace, SessionDir, SessionInfo, SessionWriter};
    use std::time::{Duration, SystemTime};
    let t0 = 7_000_123_457;
    let (presses, mut trials, len_ms) = session(&RTS, t0);
    trials.push(miss(10, t0 + 49_000_000));
    let lever = synth(len_ms, 1000, &presses, 0.01, 0.0125, t0 + 250);
    let root = std::env::temp_dir().join(format!("rigd-summary-chunks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let cfg = rig_config::RigConfig::default();
    let info = SessionInfo {
        training: None,
        imaging_reference: None,
        fov_check: None,
        rig: "rig1".into(),
        notes: String::new(),
        config_toml: cfg.to_toml_string().unwrap(),
        t0_rig_us: t0,
        host_monotonic_start_ns: 0,
        clock_sync: None,
        realtime: None,
    };
    let dir = SessionDir::create(&root, "M1", SystemTime::now()).unwrap();
    // 7-second chunks: the 50 s trace spans eight files.
    let mut w =
        SessionWriter::create(dir, info, Duration::from_secs(1), Duration::from_secs(7)).unwrap();
    for &(t, mm) in &lever {
        w.write_lever(t - t0, mm, (mm * 80.0).round() as i64)
            .unwrap();
    }
    for r in &trials {
        let rel = |t: u64| t - t0;
        w.write_trial(&TrialRecord {
            t_start_us: rel(r.t_start_us),
            t_cue_us: rel(r.t_cue_us),
            t_response_us: r.t_response_us.map(rel),
            t_reward_us: r.t_reward_us.map(rel),
            ..r.clone()
        })
        .unwrap();
    }
    w.sync().unwrap();
    assert_eq!(w.lever_files().len(), 8);
    let back = read_lever_trace(w.path(), t0).unwrap();
    assert_eq!(back, lever, "the trace reads back exactly");
    let params = SummaryParams::from_config(&cfg);
    let want = summarize(&trials, &lever, &params);
    assert!(want.reaction_time_n >= 8 && want.movements >= 9, "{want:?}");
    assert_eq!(summarize(&trials, &back, &params), want);
    let dir = w.path().to_owned();
    drop(w);
    let mut from_folder = crate::storage_thread::summarize_folder(&dir).unwrap();
    assert_eq!(from_folder["source"], "recovery");
    from_folder.as_object_mut().unwrap().remove("source");
    // Recovery adds the qc record of the files: all 50,000 rows, none lost.
    let qc = from_folder.as_object_mut().unwrap().remove("qc").unwrap();
    assert_eq!(qc["lever"]["samples"], 50_000, "{qc}");
    assert_eq!(qc["clean"], true, "{qc}");
    assert_eq!(from_folder, serde_json::to_value(&want).unwrap());
    let _ = std::fs::remove_dir_all(&root);
}
