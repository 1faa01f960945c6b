use super::*;

use rig_config::RigConfig;

/// Default configuration (40 counts/mm, threshold 1.5 mm = 60 counts, 4 µL =
/// 38.182 ms by the example calibration), with a fixed 1 s ITI, a 2 s
/// response window and a 0.5 s miss timeout so times are exact.
fn params() -> TaskParams {
    let mut p = TaskParams::from_config(&RigConfig::default());
    p.iti_min_us = 1_000_000;
    p.iti_max_us = 1_000_000;
    p.response_window_us = 2_000_000;
    p.miss_timeout_us = 500_000;
    // The first sample is the rest position and no cue is held for an
    // off-rest lever, so times here are exact; the rest search and the
    // hold are tested below with the configured defaults (`rest_params`).
    p.rest_still_us = 0;
    p.cue_rest_tolerance_mm = None;
    // No quiet wait before the cue (the default's, 100 ms, is tested
    // below), so a cue follows the ITI on the same sample.
    p.quiescence_us = 0;
    // The host-decided path; device mode has its own tests (`device_params`).
    p.reward_decision = RewardDecision::Host;
    p
}

const VALVE_US: u32 = 38_182;

fn lever(t_us: u64, counts: i32) -> TaskInput {
    TaskInput::Lever { t_us, counts }
}

fn device(t_us: u64, kind: EventKind, aux: u16, value: u32) -> TaskInput {
    TaskInput::Device {
        t_us,
        kind,
        aux,
        value,
    }
}

fn time_of(input: &TaskInput) -> u64 {
    match *input {
        TaskInput::Lever { t_us, .. }
        | TaskInput::Device { t_us, .. }
        | TaskInput::CommandRefused { t_us, .. }
        | TaskInput::LinkLost { t_us }
        | TaskInput::LinkRestored { t_us }
        | TaskInput::Stop { t_us }
        | TaskInput::RewardFired { t_us, .. }
        | TaskInput::RewardEnded { t_us, .. } => t_us,
    }
}

/// 1 kHz lever samples for `from_ms..to_ms`, position given per ms.
fn trace(from_ms: u64, to_ms: u64, counts: impl Fn(u64) -> i32) -> Vec<TaskInput> {
    (from_ms..to_ms)
        .map(|ms| lever(ms * 1000, counts(ms)))
        .collect()
}

/// Merge other inputs into a sample stream by time; at equal times the
/// sample comes first (the device sends the sample before it can react).
fn merge(mut samples: Vec<TaskInput>, others: &[TaskInput]) -> Vec<TaskInput> {
    for o in others {
        let t = time_of(o);
        let at = samples.partition_point(|s| time_of(s) <= t);
        samples.insert(at, *o);
    }
    samples
}

fn run(engine: &mut TaskEngine, inputs: &[TaskInput]) -> Vec<TaskOutput> {
    let mut outs = Vec::new();
    for i in inputs {
        engine.step(i, &mut |o| outs.push(o));
    }
    outs
}

/// The outputs without the rest position's (taken at the first sample with
/// `params()`; the rest is tested on its own below).
fn no_rest(outs: Vec<TaskOutput>) -> Vec<TaskOutput> {
    outs.into_iter()
        .filter(|o| !matches!(o, TaskOutput::Rest(_)))
        .collect()
}

fn cue_commands(trial: u32) -> [TaskOutput; 2] {
    [
        TaskOutput::Command(HostCommand::SyncOut(SyncOut {
            mode: sync_mode::BITCODE,
            nbits: 12,
            unit_us: 5000,
            value: trial,
        })),
        TaskOutput::Command(HostCommand::Tone(Tone {
            frequency_hz: 6000,
            duration_ms: 1000,
            level_pct: 80,
        })),
    ]
}

fn state(t_us: u64, state: TaskState) -> TaskOutput {
    TaskOutput::State { t_us, state }
}

fn trials(outs: &[TaskOutput]) -> Vec<TrialRecord> {
    outs.iter()
        .filter_map(|o| match o {
            TaskOutput::Trial(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn pulses(outs: &[TaskOutput]) -> usize {
    outs.iter()
        .filter(|o| matches!(o, TaskOutput::Command(HostCommand::ValvePulse(_))))
        .count()
}

fn finished(outs: &[TaskOutput]) -> Option<FinishReason> {
    outs.iter().find_map(|o| match o {
        TaskOutput::Finished { reason, .. } => Some(*reason),
        _ => None,
    })
}

/// A press ramping 1 count per ms from `start_ms` to 100 counts, held 200
/// ms, then released at 1 count per ms: it crosses 60 counts at start + 60.
fn press_at(start_ms: u64) -> impl Fn(u64) -> i32 {
    move |ms| {
        if ms < start_ms {
            return 0;
        }
        let d = (ms - start_ms) as i32;
        if d <= 100 {
            d
        } else if d <= 300 {
            100
        } else {
            (400 - d).max(0)
        }
    }
}

#[test]
fn from_config_converts_units() {
    let p = TaskParams::from_config(&RigConfig::default());
    assert_eq!(p.valve_open_us, VALVE_US); // 20 + 2/2.2 * 20 ms
    assert_eq!(p.response_window_us, 10_000_000);
    assert_eq!(p.iti_min_us, 3_000_000);
    assert_eq!(p.iti_max_us, 6_000_000);
    assert_eq!(
        p.quiescence_us, 100_000,
        "still for the 100 ms before the cue"
    );
    assert_eq!(p.max_duration_us, Some(120 * 60_000_000));
    assert_eq!(p.max_water_session_ul, 1000.0);
    let e = TaskEngine::new(p);
    assert_eq!(e.threshold_counts, 60.0);
    assert_eq!(e.state(), TaskState::Waiting);

    let mut cfg = RigConfig::default();
    cfg.task.max_duration_min = Some(30);
    let p = TaskParams::from_config(&cfg);
    assert_eq!(p.max_duration_us, Some(30 * 60_000_000));
}

/// What rig-config lets through converts exactly: the checks this
/// conversion used to make itself (the reward against the calibration and
/// the valve cap, the cue's ranges) are rig-config's rules, tested there.
#[test]
fn the_extremes_rig_config_allows_convert_exactly() {
    let text = "[task]\ncue_duration_ms = 60000\ncue_level_pct = 100\nreward_ul = 8.6\n\
                [safety]\nmax_valve_open_ms = 80\n";
    let cfg = rig_config::parse_str(text, std::path::Path::new("rig.toml"))
        .expect("valid")
        .config;
    let p = TaskParams::from_config(&cfg);
    assert_eq!(p.cue_duration_ms, 60_000);
    assert_eq!(p.cue_level_pct, 100);
    assert_eq!(p.valve_open_us, 80_000, "8.6 µL is the last point, 80 ms");
}

#[test]
fn a_sessions_overrides_reach_the_parameters() {
    let overrides = protocol::control::TaskOverrides {
        threshold_mm: Some(2.0),
        response_window_ms: Some(5000),
        max_trials: Some(7),
        ..Default::default()
    };
    let cfg = RigConfig::default()
        .with_task_overrides(&overrides)
        .expect("valid overrides");
    let p = TaskParams::from_config(&cfg);
    assert_eq!(p.threshold_mm, 2.0);
    assert_eq!(p.response_window_us, 5_000_000);
    assert_eq!(p.max_trials, Some(7));
    let unchanged = TaskParams::from_config(&RigConfig::default());
    assert_eq!(
        TaskParams {
            threshold_mm: unchanged.threshold_mm,
            response_window_us: unchanged.response_window_us,
            max_trials: unchanged.max_trials,
            ..p
        },
        unchanged,
        "nothing else changes"
    );
}

#[test]
fn scripted_rewarded_trial_gives_exact_commands_and_record() {
    let mut e = TaskEngine::new(params());
    let samples = trace(0, 3000, press_at(1300));
    let inputs = merge(
        samples,
        &[
            device(1_000_250, EventKind::ToneOn, 80, 6000),
            device(1_360_300, EventKind::ValveOpen, 0, VALVE_US),
            device(
                1_360_300 + u64::from(VALVE_US),
                EventKind::ValveClose,
                0,
                VALVE_US,
            ),
            TaskInput::Stop { t_us: 2_999_500 },
        ],
    );
    let outs = run(&mut e, &inputs);
    let outs = no_rest(outs);
    let [sync1, tone1] = cue_commands(1);
    let [sync2, tone2] = cue_commands(2);
    let expected = vec![
        state(0, TaskState::Iti),
        sync1,
        tone1,
        state(1_000_000, TaskState::Response),
        // The crossing sample: 60 counts at 1300 + 60 ms.
        TaskOutput::Command(HostCommand::ValvePulse(ValvePulse {
            duration_us: VALVE_US,
        })),
        TaskOutput::Command(HostCommand::ToneOff),
        state(1_360_000, TaskState::Iti),
        TaskOutput::Trial(TrialRecord {
            trial: 1,
            t_start_us: 1_000_000,
            t_cue_us: 1_000_250,
            t_response_us: Some(1_360_000),
            outcome: Outcome::Rewarded,
            t_reward_us: Some(1_360_300),
            reward_ul: 4.0,
            valve_open_us: VALVE_US,
            lever_mm_at_cue: 0.0,
            iti_presses: 0,
            capped: false,
        }),
        // The next ITI runs from the reward; the lever is still up then but
        // not re-armed, so it is no ITI press.
        sync2,
        tone2,
        state(2_360_000, TaskState::Response),
        // Stop in the response window: tone off, the trial written as aborted.
        TaskOutput::Command(HostCommand::ToneOff),
        TaskOutput::Trial(TrialRecord {
            trial: 2,
            t_start_us: 2_360_000,
            t_cue_us: 2_360_000,
            t_response_us: None,
            outcome: Outcome::Aborted,
            t_reward_us: None,
            reward_ul: 0.0,
            valve_open_us: 0,
            lever_mm_at_cue: 0.0,
            iti_presses: 0,
            capped: false,
        }),
        state(2_999_500, TaskState::Finished),
        TaskOutput::Finished {
            t_us: 2_999_500,
            reason: FinishReason::Stopped,
        },
    ];
    assert_eq!(outs, expected);
    assert_eq!(e.trials(), 2);
    assert_eq!(e.rewards(), 1);
    assert_eq!(e.water_ul(), 4.0);
    assert_eq!(e.state(), TaskState::Finished);
    assert_eq!(e.lever_mm(), 0.0);
    // Finished: nothing more, whatever comes.
    let more = run(&mut e, &trace(3000, 6000, press_at(3500)));
    assert!(more.is_empty());
}

#[test]
fn rewarded_record_waits_for_valve_open_at_most_until_the_next_trial() {
    let mut e = TaskEngine::new(params());
    let outs = run(&mut e, &trace(0, 2500, press_at(1300)));
    let recs = trials(&outs);
    assert_eq!(recs.len(), 1, "flushed when trial 2 started");
    assert_eq!(recs[0].outcome, Outcome::Rewarded);
    assert_eq!(recs[0].t_reward_us, None);
    assert_eq!(
        recs[0].t_cue_us, 1_000_000,
        "no ToneOn: the commanding sample"
    );
    let at = outs
        .iter()
        .position(|o| matches!(o, TaskOutput::Trial(_)))
        .expect("a record");
    assert_eq!(
        outs[at + 1],
        cue_commands(2)[0],
        "record before the next cue"
    );
}

#[test]
fn miss_times_out_and_adds_the_miss_timeout() {
    let mut p = params();
    p.cue_duration_ms = 3000; // longer than the window: the miss stops it
    let mut e = TaskEngine::new(p);
    let outs = run(&mut e, &trace(0, 5000, |_| 3));
    let outs = no_rest(outs);
    let expected_start = [
        state(0, TaskState::Iti),
        cue_commands(1)[0].clone(),
        TaskOutput::Command(HostCommand::Tone(Tone {
            frequency_hz: 6000,
            duration_ms: 3000,
            level_pct: 80,
        })),
        state(1_000_000, TaskState::Response),
        TaskOutput::Command(HostCommand::ToneOff),
        TaskOutput::Trial(TrialRecord {
            trial: 1,
            t_start_us: 1_000_000,
            t_cue_us: 1_000_000,
            t_response_us: None,
            outcome: Outcome::Miss,
            t_reward_us: None,
            reward_ul: 0.0,
            valve_open_us: 0,
            lever_mm_at_cue: 0.0,
            iti_presses: 0,
            capped: false,
        }),
        state(3_000_000, TaskState::Iti),
        cue_commands(2)[0].clone(),
    ];
    assert_eq!(outs[..expected_start.len()], expected_start[..]);
    // ITI 1 s + miss timeout 0.5 s after the miss at 3.0 s.
    assert_eq!(
        outs[expected_start.len() + 1],
        state(4_500_000, TaskState::Response)
    );
    assert_eq!(pulses(&outs), 0);

    // With the default 1 s tone the tone has ended by itself: no ToneOff.
    let mut e = TaskEngine::new(params());
    let outs = run(&mut e, &trace(0, 3500, |_| 0));
    let outs = no_rest(outs);
    assert!(!outs.contains(&TaskOutput::Command(HostCommand::ToneOff)));
    assert_eq!(trials(&outs).len(), 1);
}

#[test]
fn tone_off_event_means_no_tone_off_command() {
    let mut e = TaskEngine::new(params());
    let inputs = merge(
        trace(0, 2000, press_at(1300)),
        &[device(1_300_000, EventKind::ToneOff, 0, 0)],
    );
    let outs = run(&mut e, &inputs);
    assert_eq!(pulses(&outs), 1);
    assert!(!outs.contains(&TaskOutput::Command(HostCommand::ToneOff)));
}

#[test]
fn press_before_the_cue_is_an_iti_press_and_held_lever_earns_nothing() {
    // A press at 500 ms crosses at 560 ms; the ITI is not restarted.
    let mut e = TaskEngine::new(params());
    let outs = run(&mut e, &trace(0, 3100, press_at(500)));
    let recs = trials(&outs);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].t_cue_us, 1_000_000);
    assert_eq!(recs[0].iti_presses, 1);
    assert_eq!(recs[0].outcome, Outcome::Miss);

    // Lever held past threshold through the cue: no crossing, no reward.
    let mut e = TaskEngine::new(params());
    let outs = run(&mut e, &trace(0, 3100, |ms| if ms < 900 { 0 } else { 80 }));
    assert_eq!(pulses(&outs), 0);
    let recs = trials(&outs);
    assert_eq!(recs[0].iti_presses, 1);
    assert_eq!(recs[0].lever_mm_at_cue, 2.0);
}

#[test]
fn iti_press_restarts_the_iti_when_configured() {
    let mut p = params();
    p.iti_press_restarts = true;
    let mut e = TaskEngine::new(p);
    // Crossings at 560 ms and 1460 ms (the second press starts before the
    // restarted ITI ends at 1560 ms).
    let lever_at = |ms: u64| press_at(500)(ms).max(press_at(1400)(ms));
    let outs = run(&mut e, &trace(0, 3000, lever_at));
    let cue_at = outs
        .iter()
        .find_map(|o| match o {
            TaskOutput::State {
                t_us,
                state: TaskState::Response,
            } => Some(*t_us),
            _ => None,
        })
        .expect("a cue");
    assert_eq!(cue_at, 2_460_000, "restarted at the second crossing");
    let recs = run(&mut e, &[TaskInput::Stop { t_us: 3_000_000 }]);
    let rec = trials(&recs);
    assert_eq!(rec[0].iti_presses, 2);
    assert_eq!(rec[0].t_start_us, 2_460_000);
}

#[test]
fn quiescence_waits_for_a_still_lever() {
    let mut p = params();
    p.quiescence_us = 500_000;
    let mut e = TaskEngine::new(p);
    // Jitter of ±5 counts (0.125 mm) is still; a step to 20 counts (0.5 mm)
    // at 1200 ms is movement and restarts the wait.
    let lever_at = |ms: u64| {
        let jitter = if ms % 7 == 0 {
            5
        } else {
            -5 * i32::from(ms % 3 == 0)
        };
        if ms < 1200 {
            jitter
        } else {
            20 + jitter.signum() * 3
        }
    };
    let outs = run(&mut e, &trace(0, 2500, lever_at));
    let outs = no_rest(outs);
    assert_eq!(outs[1], state(1_000_000, TaskState::Quiescence));
    assert_eq!(outs[2], cue_commands(1)[0]);
    // 1200 ms moved to 20 counts (anchor), then stays within 3 counts.
    assert_eq!(outs[4], state(1_700_000, TaskState::Response));
    let recs = run(&mut e, &[TaskInput::Stop { t_us: 2_500_000 }]);
    let rec = &trials(&recs)[0];
    assert_eq!(rec.t_start_us, 1_000_000);
    assert_eq!(rec.t_cue_us, 1_700_000);
    // From rest, which is the first sample's position.
    let expected = f64::from(lever_at(1700) - lever_at(0)) / 40.0;
    assert!((rec.lever_mm_at_cue - expected).abs() < 1e-12);
}

#[test]
fn tone_on_event_sets_the_cue_time() {
    let mut e = TaskEngine::new(params());
    let inputs = merge(
        trace(0, 3100, |_| 0),
        &[
            device(900_000, EventKind::ToneOn, 80, 6000), // not ours: before the cue
            device(1_000_410, EventKind::ToneOn, 80, 6000),
        ],
    );
    let recs = trials(&run(&mut e, &inputs));
    assert_eq!(recs[0].t_cue_us, 1_000_410);
}

/// A mouse that presses 300 ms after every cue and a device that confirms
/// every pulse 200 µs later; `secs` seconds of it.
fn eager_mouse(p: TaskParams, secs: u64) -> (TaskEngine, Vec<TaskOutput>) {
    let mut e = TaskEngine::new(p);
    let mut outs = Vec::new();
    let mut press_from: Option<u64> = None;
    let mut valve_at: Option<u64> = None;
    for ms in 0..secs * 1000 {
        let t = ms * 1000;
        let counts = press_from.map_or(0, |s| press_at(s)(ms));
        let mut step_outs = Vec::new();
        e.step(&lever(t, counts), &mut |o| step_outs.push(o));
        if let Some(tv) = valve_at.filter(|tv| *tv <= t + 500) {
            e.step(&device(tv, EventKind::ValveOpen, 0, VALVE_US), &mut |o| {
                step_outs.push(o)
            });
            valve_at = None;
        }
        for o in &step_outs {
            match o {
                TaskOutput::State {
                    state: TaskState::Response,
                    ..
                } => press_from = Some(ms + 240),
                TaskOutput::Command(HostCommand::ValvePulse(_)) => valve_at = Some(t + 200),
                _ => {}
            }
        }
        outs.extend(step_outs);
    }
    (e, outs)
}

#[test]
fn water_cap_stops_rewards_and_cues() {
    let mut p = params();
    p.max_water_session_ul = 10.0; // 4 µL each: 2 fit, the 3rd would not
    let (e, outs) = eager_mouse(p, 20);
    assert_eq!(pulses(&outs), 2);
    assert_eq!(finished(&outs), Some(FinishReason::WaterCap));
    assert_eq!(e.trials(), 2, "no cue once no reward can follow");
    let recs = trials(&outs);
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.t_reward_us.is_some() && !r.capped));
    assert_eq!(
        outs.last()
            .map(|o| matches!(o, TaskOutput::Finished { .. })),
        Some(true)
    );

    // A cap that is an exact multiple of the reward is reached.
    let mut p = params();
    p.max_water_session_ul = 8.0;
    let (_, outs) = eager_mouse(p, 20);
    assert_eq!(pulses(&outs), 2);

    // The day's remaining water.
    let p = params().with_water_remaining_today_ul(Some(5.0));
    let (e, outs) = eager_mouse(p, 20);
    assert_eq!(pulses(&outs), 1);
    assert_eq!(e.water_ul(), 4.0);
    assert_eq!(finished(&outs), Some(FinishReason::WaterCap));
}

#[test]
fn reward_and_trial_caps_finish_the_session() {
    let mut p = params();
    p.max_rewards = Some(3);
    let (e, outs) = eager_mouse(p, 30);
    assert_eq!(pulses(&outs), 3);
    assert_eq!(e.rewards(), 3);
    assert_eq!(finished(&outs), Some(FinishReason::RewardCap));
    assert_eq!(trials(&outs).len(), 3);

    let mut p = params();
    p.max_trials = Some(2);
    let mut e = TaskEngine::new(p);
    let outs = run(&mut e, &trace(0, 20_000, |_| 0));
    assert_eq!(trials(&outs).len(), 2);
    assert_eq!(finished(&outs), Some(FinishReason::MaxTrials));
}

#[test]
fn lowering_the_day_cap_mid_trial_records_a_capped_reward() {
    let mut e = TaskEngine::new(params());
    let mut outs = run(&mut e, &trace(0, 1200, |_| 0));
    e.set_water_remaining_today_ul(Some(1.0));
    outs.extend(run(&mut e, &trace(1200, 2000, press_at(1300))));
    assert_eq!(pulses(&outs), 0);
    let recs = trials(&outs);
    assert_eq!(recs.len(), 1);
    assert!(recs[0].capped);
    assert_eq!(recs[0].outcome, Outcome::Rewarded);
    assert_eq!(recs[0].reward_ul, 0.0);
    assert_eq!(recs[0].t_response_us, Some(1_360_000));
    assert_eq!(finished(&outs), Some(FinishReason::WaterCap));
    // The tone is stopped on the way out.
    assert!(outs.contains(&TaskOutput::Command(HostCommand::ToneOff)));
}

#[test]
fn duration_cap_finishes_between_trials() {
    let mut p = params();
    p.max_duration_us = Some(5_000_000);
    let mut e = TaskEngine::new(p);
    let outs = run(&mut e, &trace(0, 10_000, |_| 0));
    // Trial 1 cue 1 s, miss 3 s, ITI 1.5 s -> trial 2 cue 4.5 s, miss 6.5 s:
    // the response window is not cut; the next ITI sample ends the session.
    assert_eq!(trials(&outs).len(), 2);
    assert_eq!(
        outs.last(),
        Some(&TaskOutput::Finished {
            t_us: 6_501_000,
            reason: FinishReason::Duration
        })
    );
}

#[test]
fn link_loss_mid_response_records_an_aborted_trial_and_waits() {
    let mut e = TaskEngine::new(params());
    let inputs = merge(
        trace(0, 5000, |ms| {
            // presses while the link is down, and after it is back
            press_at(1600)(ms).max(press_at(4300)(ms))
        }),
        &[
            TaskInput::LinkLost { t_us: 1_500_000 },
            TaskInput::LinkRestored { t_us: 3_000_000 },
        ],
    );
    let outs = run(&mut e, &inputs);
    let recs = trials(&outs);
    assert_eq!(recs[0].outcome, Outcome::Aborted);
    assert!(outs.contains(&state(1_500_000, TaskState::LinkDown)));
    assert!(outs.contains(&state(3_000_000, TaskState::Iti)));
    // No command at all while the link was down.
    let down = outs
        .iter()
        .position(|o| *o == state(1_500_000, TaskState::LinkDown))
        .expect("link down");
    let up = outs
        .iter()
        .position(|o| *o == state(3_000_000, TaskState::Iti))
        .expect("link up");
    assert!(outs[down..up]
        .iter()
        .all(|o| !matches!(o, TaskOutput::Command(_))));
    // Trial 2 cues 1 s after the link is back and is rewarded at 4.36 s.
    assert!(outs.contains(&state(4_000_000, TaskState::Response)));
    assert_eq!(pulses(&outs), 1);
    assert!(outs.contains(&state(4_360_000, TaskState::Iti)));
    let out2 = run(&mut e, &[TaskInput::Stop { t_us: 5_000_000 }]);
    let rec2 = &trials(&out2)[0];
    assert_eq!(rec2.trial, 2);
    assert_eq!(
        rec2.iti_presses, 1,
        "the press made while the link was down"
    );
}

#[test]
fn refused_pulse_is_written_without_water() {
    let mut e = TaskEngine::new(params());
    let inputs = merge(
        trace(0, 1500, press_at(1300)),
        &[TaskInput::CommandRefused {
            t_us: 1_360_500,
            cmd_type: ValvePulse::TYPE,
        }],
    );
    let outs = run(&mut e, &inputs);
    let recs = trials(&outs);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, Outcome::Rewarded);
    assert_eq!(recs[0].reward_ul, 0.0);
    assert_eq!(recs[0].t_reward_us, None);
    assert_eq!(e.water_ul(), 4.0, "still counted against the caps");
    assert_eq!(e.refused_commands(), 1);
}

#[test]
fn stop_before_any_sample_and_link_loss_before_any_sample() {
    let mut e = TaskEngine::new(params());
    let outs = run(&mut e, &[TaskInput::Stop { t_us: 5 }]);
    let outs = no_rest(outs);
    assert_eq!(
        outs,
        vec![
            state(5, TaskState::Finished),
            TaskOutput::Finished {
                t_us: 5,
                reason: FinishReason::Stopped
            }
        ]
    );
    let mut e = TaskEngine::new(params());
    let outs = run(
        &mut e,
        &[
            TaskInput::LinkLost { t_us: 1 },
            TaskInput::LinkRestored { t_us: 2 },
            lever(3, 7),
        ],
    );
    let outs = no_rest(outs);
    assert_eq!(
        outs,
        vec![
            state(1, TaskState::LinkDown),
            state(2, TaskState::Waiting),
            state(3, TaskState::Iti)
        ]
    );
    assert_eq!(e.rest_counts(), Some(7));
}

/// A deterministic pseudo-random session: lever moves of random size and
/// speed, some device events.
fn random_session(seed: u64, secs: u64) -> Vec<TaskInput> {
    let mut rng = SplitMix64(seed);
    let mut inputs = Vec::new();
    let mut pos = 0i32;
    let mut target = 0i32;
    for ms in 0..secs * 1000 {
        if rng.next_u64() % 700 == 0 {
            target = rng.range_inclusive(0, 120) as i32;
        }
        if rng.next_u64() % 300 == 0 {
            target = 0;
        }
        pos += (target - pos).signum() * rng.range_inclusive(0, 3) as i32;
        inputs.push(lever(ms * 1000, pos));
        if rng.next_u64() % 2000 == 0 {
            inputs.push(device(ms * 1000 + 10, EventKind::LickOn, 0, 1));
        }
    }
    inputs
}

#[test]
fn replay_gives_identical_outputs() {
    let mut p = params();
    p.iti_min_us = 1_000_000;
    p.iti_max_us = 3_000_000;
    p.quiescence_us = 200_000;
    let inputs = random_session(42, 120);
    let a = run(&mut TaskEngine::new(p.clone().with_seed(7)), &inputs);
    let b = run(&mut TaskEngine::new(p.clone().with_seed(7)), &inputs);
    assert!(
        trials(&a).len() > 10,
        "a real session: {}",
        trials(&a).len()
    );
    assert!(pulses(&a) > 3);
    assert_eq!(a, b);
    // Another seed draws other ITIs.
    let c = run(&mut TaskEngine::new(p.with_seed(8)), &inputs);
    assert_ne!(a, c);
}

#[test]
fn iti_draws_cover_the_range() {
    let mut rng = SplitMix64(1);
    let (lo, hi) = (3_000_000, 6_000_000);
    let draws: Vec<u64> = (0..10_000).map(|_| rng.range_inclusive(lo, hi)).collect();
    assert!(draws.iter().all(|d| (lo..=hi).contains(d)));
    let mean = draws.iter().sum::<u64>() as f64 / draws.len() as f64;
    assert!((mean - 4.5e6).abs() < 0.05e6, "{mean}");
    assert_eq!(SplitMix64(3).range_inclusive(5, 5), 5);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Move the lever towards `target` counts over `ms` ms.
        Move {
            target: i32,
            ms: u16,
        },
        ValveOpenEvent,
        ToneEvent {
            on: bool,
        },
        RefusePulse,
        LinkLost,
        LinkRestored,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (-30i32..160, 1u16..600).prop_map(|(target, ms)| Op::Move { target, ms }),
            2 => Just(Op::ValveOpenEvent),
            1 => any::<bool>().prop_map(|on| Op::ToneEvent { on }),
            1 => Just(Op::RefusePulse),
            1 => Just(Op::LinkLost),
            1 => Just(Op::LinkRestored),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn never_two_pulses_per_trial_and_never_past_the_caps(
            ops in proptest::collection::vec(op(), 1..120),
            max_rewards in proptest::option::of(1u32..6),
            water_cap in 3.0f64..30.0,
            day_left in proptest::option::of(0.0f64..20.0),
            quiescence_ms in prop_oneof![Just(0u64), 20u64..300],
            window_ms in 50u64..1500,
            iti in (0u64..400, 0u64..400),
            restarts in any::<bool>(),
            seed in any::<u64>(),
        ) {
            // Half the cases with the configured rest search and cue hold.
            let mut p = if seed % 2 == 0 { rest_params() } else { params() }
                .with_seed(seed)
                .with_water_remaining_today_ul(day_left);
            p.max_rewards = max_rewards;
            p.max_water_session_ul = water_cap;
            p.quiescence_us = quiescence_ms * 1000;
            p.response_window_us = window_ms * 1000;
            p.iti_min_us = iti.0.min(iti.1) * 1000;
            p.iti_max_us = iti.0.max(iti.1) * 1000;
            p.iti_press_restarts = restarts;
            p.miss_timeout_us = 100_000;
            p.max_duration_us = None;
            let reward = p.reward_ul;
            let mut e = TaskEngine::new(p);

            let mut outs: Vec<(bool, TaskOutput)> = Vec::new();
            let mut link_up = true;
            let mut t = 0u64;
            let mut pos = 0i32;
            let feed = |e: &mut TaskEngine, input: TaskInput, up: bool, outs: &mut Vec<(bool, TaskOutput)>| {
                let before = outs.len();
                e.step(&input, &mut |o| outs.push((up, o)));
                let n = outs.len() - before;
                assert!(n <= MAX_OUTPUTS_PER_STEP, "{n} outputs for {input:?}");
                if let Some(i) = outs[before..].iter().position(|(_, o)| {
                    matches!(o, TaskOutput::Command(HostCommand::ValvePulse(_)))
                }) {
                    assert_eq!(i, 0, "the valve pulse goes out first");
                }
            };
            for op in &ops {
                match *op {
                    Op::Move { target, ms } => {
                        for k in 0..u64::from(ms) {
                            let f = (k + 1) as f64 / f64::from(ms);
                            let c = pos + ((target - pos) as f64 * f).round() as i32;
                            t += 1000;
                            feed(&mut e, lever(t, c), link_up, &mut outs);
                        }
                        pos = target;
                    }
                    Op::ValveOpenEvent => feed(&mut e, device(t + 1, EventKind::ValveOpen, 0, VALVE_US), link_up, &mut outs),
                    Op::ToneEvent { on } => {
                        let kind = if on { EventKind::ToneOn } else { EventKind::ToneOff };
                        feed(&mut e, device(t + 1, kind, 0, 6000), link_up, &mut outs);
                    }
                    Op::RefusePulse => feed(&mut e, TaskInput::CommandRefused { t_us: t + 1, cmd_type: ValvePulse::TYPE }, link_up, &mut outs),
                    Op::LinkLost => { link_up = false; feed(&mut e, TaskInput::LinkLost { t_us: t + 1 }, false, &mut outs) }
                    Op::LinkRestored => { feed(&mut e, TaskInput::LinkRestored { t_us: t + 1 }, true, &mut outs); link_up = true; }
                }
            }
            feed(&mut e, TaskInput::Stop { t_us: t + 2 }, link_up, &mut outs);

            let mut cued = 0u32;
            let mut pulses_this_trial = 0u32;
            let mut pulses_total = 0u32;
            let mut last_record = 0u32;
            let mut done = false;
            for (up, o) in &outs {
                prop_assert!(!done, "output after Finished: {:?}", o);
                match o {
                    TaskOutput::Command(HostCommand::SyncOut(s)) => {
                        cued += 1;
                        prop_assert_eq!(s.value, cued % 4096);
                        pulses_this_trial = 0;
                    }
                    TaskOutput::Command(HostCommand::ValvePulse(v)) => {
                        prop_assert_eq!(v.duration_us, VALVE_US);
                        prop_assert!(cued > 0, "a pulse before any cue");
                        pulses_this_trial += 1;
                        pulses_total += 1;
                        prop_assert!(pulses_this_trial <= 1, "two pulses in trial {}", cued);
                    }
                    TaskOutput::Command(_) => {}
                    TaskOutput::Trial(r) => {
                        prop_assert_eq!(r.trial, last_record + 1, "records in order, once each");
                        last_record = r.trial;
                    }
                    TaskOutput::Finished { .. } => done = true,
                    TaskOutput::State { .. }
                    | TaskOutput::Rest(_)
                    | TaskOutput::LeverNotAtRest { .. }
                    | TaskOutput::CueHeld { .. }
                    | TaskOutput::DecisionMismatch { .. } => {}
                }
                if let TaskOutput::Command(c) = o {
                    prop_assert!(*up, "command {:?} while the link was down", c);
                }
            }
            prop_assert!(done, "Stop always finishes");
            prop_assert_eq!(last_record, cued, "every cued trial has a record");
            if let Some(m) = max_rewards {
                prop_assert!(pulses_total <= m);
            }
            let water = f64::from(pulses_total) * reward;
            prop_assert!(water <= water_cap + 1e-9);
            if let Some(left) = day_left {
                prop_assert!(water <= left + 1e-9);
            }
            prop_assert_eq!(e.rewards(), pulses_total);
        }
    }
}

#[test]
fn a_mouse_that_stops_pressing_is_sated_and_the_session_ends_between_trials() {
    let mut p = params();
    p.sated_after_us = Some(10_000_000);
    p.max_duration_us = None;
    let mut e = TaskEngine::new(p);
    // One press at 1.5 s (trial 1, rewarded), then nothing.
    let outs = run(&mut e, &trace(0, 30_000, press_at(1_500)));
    assert_eq!(finished(&outs), Some(FinishReason::Sated));
    let Some(TaskOutput::Finished { t_us, .. }) = outs.last() else {
        panic!("not finished: {outs:?}");
    };
    // The press crossed at 1.56 s; sated 10 s later, at the first sample
    // outside a response window from then on.
    assert!(*t_us >= 11_560_000 && *t_us < 16_000_000, "{t_us}");
    // No trial was cut short by it.
    assert!(trials(&outs).iter().all(|r| r.outcome != Outcome::Aborted));
}

#[test]
fn time_with_the_link_down_does_not_make_a_mouse_sated() {
    let mut p = params();
    p.sated_after_us = Some(5_000_000);
    p.max_duration_us = None;
    let mut e = TaskEngine::new(p);
    let inputs = merge(
        trace(0, 9_000, |_| 0),
        &[
            TaskInput::LinkLost { t_us: 500_000 },
            TaskInput::LinkRestored { t_us: 8_000_000 },
        ],
    );
    let outs = run(&mut e, &inputs);
    assert_eq!(finished(&outs), None, "sated over an unplugged cable");
    // It still counts from the link's return.
    let outs = run(&mut e, &trace(9_001, 20_000, |_| 0));
    assert_eq!(finished(&outs), Some(FinishReason::Sated));
}

// ---- lever rest ----

/// The configured rest search and cue hold (`params()` turns them off).
fn rest_params() -> TaskParams {
    let d = TaskParams::from_config(&RigConfig::default());
    let mut p = params();
    p.rest_still_us = d.rest_still_us;
    p.cue_rest_tolerance_mm = d.cue_rest_tolerance_mm;
    p
}

fn rests(outs: &[TaskOutput]) -> Vec<LeverRest> {
    outs.iter()
        .filter_map(|o| match o {
            TaskOutput::Rest(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn cues(outs: &[TaskOutput]) -> usize {
    outs.iter()
        .filter(|o| matches!(o, TaskOutput::Command(HostCommand::Tone(_))))
        .count()
}

#[test]
fn configured_rest_search_is_a_half_second_window_of_a_tenth_mm() {
    let p = TaskParams::from_config(&RigConfig::default());
    assert_eq!(p.rest_still_us, 500_000);
    assert_eq!(p.rest_tolerance_mm, 0.1);
    // 0.5 mm, at most half the 1.5 mm threshold.
    assert_eq!(p.cue_rest_tolerance_mm, Some(0.5));
}

#[test]
fn a_lever_held_still_at_the_start_is_re_zeroed_when_let_go() {
    // The issue: the mouse holds the lever 2.4 mm down (96 counts), still,
    // when the session starts, and lets go at 3 s.
    let mut e = TaskEngine::new(rest_params());
    let outs = run(
        &mut e,
        &trace(0, 4_000, |ms| if ms < 3_000 { 96 } else { 0 }),
    );
    let r = rests(&outs);
    assert_eq!(r.len(), 2, "{outs:?}");
    // Held still for 500 ms: taken as rest at first (nothing can tell a
    // lever held still from one at rest)...
    assert_eq!(
        (r[0].rest_counts, r[0].t_us, r[0].rezero),
        (96, 500_000, false)
    );
    // ...so the first trial (cue at 1.5 s) is a miss; but a lever resting
    // 2.4 mm *below* rest is on its stop: re-zeroed after half a second
    // there (the first sample of the ITI after the miss), and measured from
    // the true rest from then on.
    assert_eq!(
        (r[1].rest_counts, r[1].t_us, r[1].rezero),
        (0, 3_501_000, true)
    );
    assert_eq!(r[1].first_counts, 96);
    assert!((r[1].offset_mm(40.0) + 2.4).abs() < 1e-12);
    assert_eq!(e.lever_mm(), 0.0);
    assert_eq!(trials(&outs).len(), 1);
    // The next press from the true rest is rewarded (cue at 5 s: the ITI
    // after a miss is 1 s + 0.5 s).
    let outs = run(
        &mut e,
        &trace(4_000, 6_000, |ms| if ms >= 5_200 { 70 } else { 0 }),
    );
    assert_eq!(cues(&outs), 1);
    assert_eq!(pulses(&outs), 1);
}

#[test]
fn a_twitching_lever_gives_no_rest_until_it_is_still() {
    let mut e = TaskEngine::new(rest_params());
    let twitchy = trace(0, 3_000, |ms| if (ms / 50) % 2 == 0 { 96 } else { 80 });
    let outs = run(&mut e, &twitchy);
    assert_eq!(rests(&outs), []);
    assert_eq!(e.state(), TaskState::Waiting);
    assert_eq!(e.rest_counts(), None);
    // Let go: still at 0 from 3 s; rest after 500 ms of stillness.
    let outs = run(&mut e, &trace(3_000, 3_600, |_| 0));
    let r = rests(&outs);
    assert_eq!(r.len(), 1, "{outs:?}");
    assert_eq!(r[0].rest_counts, 0);
    assert_eq!(r[0].first_counts, 96);
    assert_eq!(r[0].t_us, 3_500_000);
    assert_eq!(r[0].window_us, 500_000);
    assert!(!r[0].rezero);
    assert!(outs.contains(&state(3_500_000, TaskState::Iti)));
}

#[test]
fn rest_is_the_median_of_the_still_window_so_a_twitch_does_not_move_it() {
    // First sample mid-twitch at 3 counts (0.075 mm), then the lever at 0
    // with the odd count of jitter: rest is 0, not the first sample.
    let mut e = TaskEngine::new(rest_params());
    let outs = run(
        &mut e,
        &trace(0, 600, |ms| match ms {
            0..=20 => 3,
            _ if ms % 7 == 0 => 1,
            _ => 0,
        }),
    );
    let r = rests(&outs);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].rest_counts, 0);
    assert_eq!(r[0].first_counts, 3);
    assert_eq!(r[0].range_counts, 3);
    assert_eq!(r[0].t_us, 500_000);
}

#[test]
fn a_lever_never_still_is_reported_once_and_starts_no_trial_until_still() {
    let mut p = rest_params();
    p.max_duration_us = Some(60_000_000);
    let mut e = TaskEngine::new(p);
    // Moving 2 mm back and forth every 100 ms for 8 s.
    let moving = trace(0, 8_000, |ms| if (ms / 100) % 2 == 0 { 80 } else { 0 });
    let outs = run(&mut e, &moving);
    let warned: Vec<_> = outs
        .iter()
        .filter(|o| matches!(o, TaskOutput::LeverNotAtRest { .. }))
        .collect();
    assert_eq!(
        warned,
        [&TaskOutput::LeverNotAtRest {
            t_us: 5_000_000,
            range_counts: 80
        }]
    );
    assert_eq!(cues(&outs), 0);
    assert_eq!(pulses(&outs), 0);
    assert_eq!(e.state(), TaskState::Waiting);
    // Still at last: trials start.
    let outs = run(&mut e, &trace(8_000, 11_000, |_| 0));
    assert_eq!(rests(&outs).len(), 1);
    assert_eq!(cues(&outs), 1, "ITI of 1 s after the rest at 8.5 s");
}

#[test]
fn the_session_time_cap_counts_from_the_first_sample_while_waiting_for_rest() {
    let mut p = rest_params();
    p.max_duration_us = Some(2_000_000);
    let mut e = TaskEngine::new(p);
    let outs = run(
        &mut e,
        &trace(0, 3_000, |ms| if (ms / 100) % 2 == 0 { 80 } else { 0 }),
    );
    assert_eq!(finished(&outs), Some(FinishReason::Duration));
    assert_eq!(cues(&outs), 0);
}

#[test]
fn a_cue_waits_for_the_lever_to_come_back_to_rest() {
    let mut e = TaskEngine::new(rest_params());
    // Rest at 0 (found at 0.5 s), ITI 1 s: the cue is due at 1.5 s. The
    // mouse holds the lever at 1 mm (40 counts, below the 60-count
    // threshold) from 1.2 s to 2.5 s.
    let outs = run(
        &mut e,
        &trace(
            0,
            3_000,
            |ms| if (1_200..2_500).contains(&ms) { 40 } else { 0 },
        ),
    );
    let held: Vec<_> = outs
        .iter()
        .filter(|o| matches!(o, TaskOutput::CueHeld { .. }))
        .collect();
    assert_eq!(
        held,
        [&TaskOutput::CueHeld {
            t_us: 1_500_000,
            lever_mm: 1.0
        }]
    );
    assert!(outs.contains(&state(1_500_000, TaskState::Quiescence)));
    assert_eq!(cues(&outs), 1);
    let rec_cue = outs
        .iter()
        .position(|o| matches!(o, TaskOutput::Command(HostCommand::Tone(_))));
    assert!(rec_cue.is_some());
    // The cue came on the first sample back at rest.
    assert!(outs.contains(&state(2_500_000, TaskState::Response)));
}

#[test]
fn a_lever_still_away_from_rest_for_ten_seconds_becomes_the_new_rest() {
    let mut e = TaskEngine::new(rest_params());
    // Rest 0; from 1 s the lever sits at 30 counts (0.75 mm, past the 0.5
    // mm cue tolerance) and stays there.
    let outs = run(
        &mut e,
        &trace(0, 12_500, |ms| if ms >= 1_000 { 30 } else { 0 }),
    );
    let r = rests(&outs);
    assert_eq!(r.len(), 2, "{outs:?}");
    assert!(r[1].rezero);
    assert_eq!(r[1].rest_counts, 30);
    assert_eq!(r[1].first_counts, 0);
    // Still since 1 s: re-zeroed at 11 s, and the cue on the next sample.
    assert_eq!(r[1].t_us, 11_000_000);
    assert!(outs.contains(&state(11_001_000, TaskState::Response)));
    assert_eq!(cues(&outs), 1);
    // Presses are measured from the new rest.
    assert!((e.lever_mm()).abs() < 1e-12);
}

// ---- device-armed reward (reward_decision = "device") ----

fn device_params() -> TaskParams {
    let mut p = params();
    p.reward_decision = RewardDecision::Device;
    p
}

fn arms(outs: &[TaskOutput]) -> Vec<ArmReward> {
    outs.iter()
        .filter_map(|o| match o {
            TaskOutput::Command(HostCommand::ArmReward(a)) => Some(*a),
            _ => None,
        })
        .collect()
}

fn mismatches(outs: &[TaskOutput]) -> Vec<(u32, Option<u64>, Option<u64>, &'static str)> {
    outs.iter()
        .filter_map(|o| match o {
            TaskOutput::DecisionMismatch {
                trial,
                device_cross_us,
                host_cross_us,
                device,
                ..
            } => Some((*trial, *device_cross_us, *host_cross_us, *device)),
            _ => None,
        })
        .collect()
}

fn fired(t_us: u64, trial_tag: u32, t_cross_us: u64) -> TaskInput {
    TaskInput::RewardFired {
        t_us,
        trial_tag,
        t_cross_us,
        pulse_us: VALVE_US,
    }
}

fn ended(t_us: u64, trial_tag: u32, reason: u8) -> TaskInput {
    TaskInput::RewardEnded {
        t_us,
        trial_tag,
        reason,
    }
}

#[test]
fn device_mode_arms_at_the_cue_and_the_device_decides_at_the_crossing_sample() {
    let mut e = TaskEngine::new(device_params());
    // Cue at 1 s (1 s ITI from the first sample); the press crosses 60
    // counts at 1.360 s. The device's report arrives before that sample.
    let inputs = merge(
        trace(0, 3000, press_at(1300)),
        &[fired(1_359_999, 1, 1_360_000)],
    );
    let outs = run(&mut e, &inputs);
    let a = arms(&outs);
    assert_eq!(a.len(), 2, "trial 2 is cued at 2.36 s");
    assert_eq!(
        a[..1],
        [ArmReward {
            trial_tag: 1,
            rest_counts: 0,
            threshold_counts: 60,
            rearm_counts: 56,
            direction: direction::UP,
            window_end_us: 3_000_000,
            pulse_us: VALVE_US,
        }]
    );
    // The arm goes out with the cue, after the tone.
    let cue_at = outs
        .iter()
        .position(|o| matches!(o, TaskOutput::Command(HostCommand::Tone(_))))
        .expect("a cue");
    assert!(matches!(
        outs[cue_at + 1],
        TaskOutput::Command(HostCommand::ArmReward(_))
    ));
    assert_eq!(pulses(&outs), 0, "the host never pulses in device mode");
    assert!(mismatches(&outs).is_empty(), "{:?}", mismatches(&outs));
    let t = trials(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].outcome, Outcome::Rewarded);
    assert_eq!(t[0].t_response_us, Some(1_360_000));
    assert_eq!(t[0].t_reward_us, Some(1_359_999));
    assert_eq!(t[0].valve_open_us, VALVE_US);
    assert_eq!(e.rewards(), 1);
    assert!((e.water_ul() - 4.0).abs() < 1e-9);
    // Trial 2's arm (cued at 2.36 s) is water committed, not yet given.
    assert!((e.committed_ul() - 4.0).abs() < 1e-9);
    // ITI from the crossing sample, as in host mode.
    assert!(outs.contains(&state(1_360_000, TaskState::Iti)));
}

#[test]
fn device_mode_report_after_the_sample_still_rewards_at_its_sample() {
    let mut e = TaskEngine::new(device_params());
    let inputs = merge(
        trace(0, 3000, press_at(1300)),
        &[fired(1_365_000, 1, 1_360_000)],
    );
    let outs = run(&mut e, &inputs);
    let t = trials(&outs);
    assert_eq!(t[0].outcome, Outcome::Rewarded);
    assert_eq!(t[0].t_response_us, Some(1_360_000));
    assert!(mismatches(&outs).is_empty());
    // The trial ends at the first sample after the report.
    assert!(outs.contains(&state(1_366_000, TaskState::Iti)));
}

#[test]
fn device_mode_disagreements_are_reported() {
    // The device fires on a sample where the host's samples do not cross.
    let mut e = TaskEngine::new(device_params());
    let inputs = merge(
        trace(0, 3000, press_at(1300)),
        &[fired(1_320_100, 1, 1_320_000)],
    );
    let outs = run(&mut e, &inputs);
    assert_eq!(mismatches(&outs), vec![(1, Some(1_320_000), None, "fired")]);
    assert_eq!(
        trials(&outs)[0].outcome,
        Outcome::Rewarded,
        "the device's decision stands"
    );

    // The window expires at the device, but the samples crossed.
    let mut e = TaskEngine::new(device_params());
    let inputs = merge(
        trace(0, 3200, press_at(1300)),
        &[ended(3_000_000, 1, disarm_reason::EXPIRED)],
    );
    let outs = run(&mut e, &inputs);
    assert_eq!(
        mismatches(&outs),
        vec![(1, None, Some(1_360_000), "expired")]
    );
    let t = trials(&outs);
    assert_eq!(t[0].outcome, Outcome::Miss);
    assert_eq!(e.rewards(), 0);
    assert_eq!(e.committed_ul(), 0.0, "an ended arm releases its water");
}

#[test]
fn device_mode_miss_and_silent_device() {
    // No press, the device reports the expiry: a plain miss.
    let mut e = TaskEngine::new(device_params());
    let inputs = merge(
        trace(0, 3200, |_| 0),
        &[ended(3_000_000, 1, disarm_reason::EXPIRED)],
    );
    let outs = run(&mut e, &inputs);
    assert!(mismatches(&outs).is_empty());
    assert_eq!(trials(&outs)[0].outcome, Outcome::Miss);
    // The report came after the 3.0 s sample: the miss is at the next one.
    assert!(outs.contains(&state(3_001_000, TaskState::Iti)));

    // No report at all: after the grace the engine asks the device to
    // repeat it; after another grace without one, a miss, the water still
    // committed.
    let mut e = TaskEngine::new(device_params());
    let outs = run(&mut e, &trace(0, 4600, |_| 0));
    let ask = TaskOutput::Command(HostCommand::Disarm(Disarm { trial_tag: 1 }));
    assert_eq!(outs.iter().filter(|o| **o == ask).count(), 1, "asked once");
    assert_eq!(mismatches(&outs), vec![(1, None, None, "silent")]);
    assert_eq!(trials(&outs)[0].outcome, Outcome::Miss);
    assert!(outs.contains(&state(
        3_000_000 + 2 * DEVICE_VERDICT_GRACE_US,
        TaskState::Iti
    )));
    assert!((e.committed_ul() - 4.0).abs() < 1e-9);
    // A late report settles it: fired counts as water given.
    e.step(&fired(4_600_000, 1, 2_000_000), &mut |_| {});
    assert_eq!(e.committed_ul(), 0.0);
    assert_eq!(e.rewards(), 1);
}

#[test]
fn device_mode_a_lost_report_is_asked_for_and_the_trial_written_from_the_answer() {
    // The device fired at the press, but its RewardFired never arrived (a
    // dropped message): the engine asks after the window's grace, the
    // device repeats it, and the trial is written rewarded, not a miss.
    let mut e = TaskEngine::new(device_params());
    let mut outs = run(&mut e, &trace(0, 3600, press_at(1300)));
    let ask = TaskOutput::Command(HostCommand::Disarm(Disarm { trial_tag: 1 }));
    assert!(outs.contains(&ask), "asked for the report");
    assert!(
        trials(&outs).is_empty(),
        "nothing written before the answer"
    );
    outs.extend(run(
        &mut e,
        &merge(
            trace(3601, 4600, press_at(1300)),
            &[fired(3_610_000, 1, 1_360_000)],
        ),
    ));
    let t = trials(&outs);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].outcome, Outcome::Rewarded);
    assert!(
        mismatches(&outs).is_empty(),
        "the host saw the same crossing"
    );
    assert_eq!(e.rewards(), 1);
    assert_eq!(e.committed_ul(), 0.0);
}

#[test]
fn device_mode_an_armed_reward_counts_against_the_caps_and_stop_disarms() {
    let mut p = device_params();
    p.max_water_session_ul = 4.0; // one reward
    let mut e = TaskEngine::new(p);
    // Trial 1 armed, never reported; stop mid-window: the engine disarms.
    let mut outs = run(&mut e, &trace(0, 1500, |_| 0));
    assert_eq!(arms(&outs).len(), 1);
    e.step(&TaskInput::Stop { t_us: 1_500_000 }, &mut |o| outs.push(o));
    assert!(
        outs.contains(&TaskOutput::Command(HostCommand::Disarm(Disarm {
            trial_tag: 1
        })))
    );
    assert_eq!(finished(&outs), Some(FinishReason::Stopped));
    assert!((e.committed_ul() - 4.0).abs() < 1e-9, "still committed");

    // With the cap reached by the armed water, no next trial starts.
    let mut p = device_params();
    p.max_water_session_ul = 4.0;
    let mut e = TaskEngine::new(p);
    let outs = run(&mut e, &trace(0, 6000, |_| 0)); // trial 1 silent: a miss
    assert_eq!(arms(&outs).len(), 1);
    assert_eq!(finished(&outs), Some(FinishReason::WaterCap));
    assert_eq!(e.trials(), 1);
}

#[test]
fn device_mode_replay_is_deterministic() {
    let inputs = merge(
        trace(0, 20_000, press_at(1300)),
        &[
            fired(1_359_999, 1, 1_360_000),
            ended(5_000_000, 2, disarm_reason::EXPIRED),
        ],
    );
    let a = run(&mut TaskEngine::new(device_params().with_seed(7)), &inputs);
    let b = run(&mut TaskEngine::new(device_params().with_seed(7)), &inputs);
    assert_eq!(a, b);
}

mod device_prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Move the lever towards `target` counts over `ms` ms.
        Move {
            target: i32,
            ms: u16,
        },
        LinkLost,
        LinkRestored,
        /// From now on the device ignores arms (refused or never arrived).
        DeviceDeaf(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            10 => (-30i32..160, 1u16..600).prop_map(|(target, ms)| Op::Move { target, ms }),
            1 => Just(Op::LinkLost),
            1 => Just(Op::LinkRestored),
            1 => any::<bool>().prop_map(Op::DeviceDeaf),
        ]
    }

    /// The device's side of the arm, as docs/protocol.md 1.10 says.
    #[derive(Debug, Default)]
    struct FakeDevice {
        arm: Option<(ArmReward, bool)>,
        last_counts: Option<i32>,
        deaf: bool,
        fired: u32,
    }

    impl FakeDevice {
        fn command(&mut self, t: u64, cmd: &HostCommand, reports: &mut Vec<TaskInput>) {
            match cmd {
                HostCommand::ArmReward(a) if !self.deaf && self.arm.is_none() => {
                    let d = |c: i32| i64::from(c) - i64::from(a.rest_counts);
                    let ready = self
                        .last_counts
                        .is_some_and(|c| d(c) < i64::from(a.rearm_counts));
                    self.arm = Some((*a, ready));
                }
                HostCommand::Disarm(d)
                    if self.arm.is_some_and(|(a, _)| a.trial_tag == d.trial_tag) =>
                {
                    self.arm = None;
                    reports.push(TaskInput::RewardEnded {
                        t_us: t,
                        trial_tag: d.trial_tag,
                        reason: disarm_reason::HOST,
                    });
                }
                _ => {}
            }
        }

        fn sample(&mut self, t: u64, counts: i32, reports: &mut Vec<TaskInput>) {
            self.last_counts = Some(counts);
            let Some((a, ready)) = self.arm else { return };
            if t >= u64::from(a.window_end_us) {
                self.arm = None;
                reports.push(TaskInput::RewardEnded {
                    t_us: u64::from(a.window_end_us),
                    trial_tag: a.trial_tag,
                    reason: disarm_reason::EXPIRED,
                });
                return;
            }
            let d = i64::from(counts) - i64::from(a.rest_counts);
            if ready && d >= i64::from(a.threshold_counts) {
                self.arm = None;
                self.fired += 1;
                reports.push(TaskInput::RewardFired {
                    t_us: t + 30,
                    trial_tag: a.trial_tag,
                    t_cross_us: t,
                    pulse_us: a.pulse_us,
                });
            } else if d < i64::from(a.rearm_counts) {
                self.arm = Some((a, true));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn device_mode_never_passes_the_caps_and_counts_every_firing(
            ops in proptest::collection::vec(op(), 1..120),
            max_rewards in proptest::option::of(1u32..6),
            water_cap in 3.0f64..30.0,
            day_left in proptest::option::of(0.0f64..20.0),
            window_ms in 50u64..1500,
            seed in any::<u64>(),
        ) {
            let mut p = device_params()
                .with_seed(seed)
                .with_water_remaining_today_ul(day_left);
            p.max_rewards = max_rewards;
            p.max_water_session_ul = water_cap;
            p.response_window_us = window_ms * 1000;
            p.iti_min_us = 100_000;
            p.iti_max_us = 300_000;
            p.miss_timeout_us = 100_000;
            p.max_duration_us = None;
            let reward = p.reward_ul;
            let mut e = TaskEngine::new(p);
            let mut dev = FakeDevice::default();
            let mut link_up = true;
            let mut t = 0u64;
            let mut pos = 0i32;
            let mut outs: Vec<TaskOutput> = Vec::new();
            let mut cued = 0u32;
            let mut arms_sent: Vec<u32> = Vec::new();
            let mut step = |e: &mut TaskEngine,
                            dev: &mut FakeDevice,
                            input: TaskInput,
                            up: bool,
                            outs: &mut Vec<TaskOutput>|
             -> Result<(), TestCaseError> {
                let mut reports = Vec::new();
                let mut mine = Vec::new();
                e.step(&input, &mut |o| mine.push(o));
                prop_assert!(mine.len() <= MAX_OUTPUTS_PER_STEP);
                for o in &mine {
                    if let TaskOutput::Command(c) = o {
                        prop_assert!(up, "command {:?} with the link down", c);
                        prop_assert!(!matches!(c, HostCommand::ValvePulse(_)), "a host pulse in device mode");
                        if let HostCommand::SyncOut(_) = c {
                            cued += 1;
                        }
                        if let HostCommand::ArmReward(a) = c {
                            prop_assert_eq!(a.trial_tag, cued, "the arm is the cued trial's");
                            prop_assert!(!arms_sent.contains(&a.trial_tag), "two arms for one trial");
                            arms_sent.push(a.trial_tag);
                        }
                        dev.command(time_of(&input), c, &mut reports);
                    }
                }
                outs.extend(mine);
                let committed = e.water_ul() + e.committed_ul();
                prop_assert!(committed <= water_cap + 1e-9, "{} µL committed, cap {}", committed, water_cap);
                if let Some(left) = day_left {
                    prop_assert!(committed <= left + 1e-9);
                }
                if let TaskInput::Lever { t_us, counts } = input {
                    if up {
                        dev.sample(t_us, counts, &mut reports);
                    }
                }
                if up {
                    for r in reports {
                        let mut more = Vec::new();
                        e.step(&r, &mut |o| more.push(o));
                        prop_assert!(more.is_empty(), "a report's outputs come on samples: {:?}", more);
                    }
                }
                Ok(())
            };
            for op in &ops {
                match *op {
                    Op::Move { target, ms } => {
                        for k in 0..u64::from(ms) {
                            let f = (k + 1) as f64 / f64::from(ms);
                            let c = pos + ((target - pos) as f64 * f).round() as i32;
                            t += 1000;
                            step(&mut e, &mut dev, lever(t, c), link_up, &mut outs)?;
                        }
                        pos = target;
                    }
                    Op::LinkLost => {
                        link_up = false;
                        dev.arm = None; // the watchdog disarms; its report is lost
                        step(&mut e, &mut dev, TaskInput::LinkLost { t_us: t + 1 }, false, &mut outs)?;
                    }
                    Op::LinkRestored => {
                        step(&mut e, &mut dev, TaskInput::LinkRestored { t_us: t + 1 }, true, &mut outs)?;
                        link_up = true;
                    }
                    Op::DeviceDeaf(deaf) => dev.deaf = deaf,
                }
            }
            step(&mut e, &mut dev, TaskInput::Stop { t_us: t + 2 }, link_up, &mut outs)?;
            prop_assert!(finished(&outs).is_some());
            // The engine counted every firing the device made, and no other.
            prop_assert_eq!(e.rewards(), dev.fired);
            prop_assert!((e.water_ul() - f64::from(dev.fired) * reward).abs() < 1e-6);
            if let Some(m) = max_rewards {
                prop_assert!(dev.fired <= m);
            }
            // Records: in order, once each; rewarded ones are the device's firings.
            let recs = trials(&outs);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.trial, i as u32 + 1);
            }
            prop_assert_eq!(recs.len() as u32, cued);
            let rewarded = recs.iter().filter(|r| r.outcome == Outcome::Rewarded && !r.capped).count() as u32;
            prop_assert!(rewarded <= dev.fired);
        }
    }
}

#[test]
fn device_mode_a_link_lost_mid_window_asks_the_device_when_it_is_back() {
    // Trial 1 cued at 1 s; the device fires at 1.36 s but the report is lost
    // with the link at 1.361 s.
    let mut e = TaskEngine::new(device_params());
    let mut outs = run(
        &mut e,
        &merge(
            trace(0, 1361, press_at(1300)),
            &[TaskInput::LinkLost { t_us: 1_361_000 }],
        ),
    );
    assert!(trials(&outs).is_empty(), "not written while unknown");
    e.step(&TaskInput::LinkRestored { t_us: 3_000_000 }, &mut |o| {
        outs.push(o)
    });
    assert!(
        outs.contains(&TaskOutput::Command(HostCommand::Disarm(Disarm {
            trial_tag: 1
        })))
    );
    // The device repeats its report: the trial is rewarded, as given.
    e.step(&fired(1_360_030, 1, 1_360_000), &mut |o| outs.push(o));
    let t = trials(&outs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].outcome, Outcome::Rewarded);
    assert_eq!(t[0].t_response_us, Some(1_360_000));
    assert_eq!(e.rewards(), 1);
    assert_eq!(e.committed_ul(), 0.0);

    // No answer before the next trial: aborted, the water still committed.
    let mut e = TaskEngine::new(device_params());
    let mut outs = run(
        &mut e,
        &merge(
            trace(0, 1200, |_| 0),
            &[TaskInput::LinkLost { t_us: 1_200_000 }],
        ),
    );
    e.step(&TaskInput::LinkRestored { t_us: 1_300_000 }, &mut |o| {
        outs.push(o)
    });
    outs.extend(run(&mut e, &trace(1300, 2500, |_| 0)));
    let t = trials(&outs);
    assert_eq!(t[0].trial, 1);
    assert_eq!(t[0].outcome, Outcome::Aborted);
    assert!(
        (e.committed_ul() - 8.0).abs() < 1e-9,
        "trial 1's and trial 2's arms"
    );
}
