//! Per-session task overrides: each applied alone, checked by the file's
//! rules (cross-key rules too), with errors that name the override.

use std::path::Path;

use protocol::control::TaskOverrides;

use super::*;
use crate::parse_str;

fn config(text: &str) -> RigConfig {
    match parse_str(text, Path::new("rig.toml")) {
        Ok(l) => l.config,
        Err(e) => panic!("expected {text:?} to load, got:\n{e}"),
    }
}

fn accepted(base: &RigConfig, o: &TaskOverrides) -> RigConfig {
    match base.with_task_overrides(o) {
        Ok(c) => c,
        Err(e) => panic!("expected {o:?} to be accepted, got: {e}"),
    }
}

/// Every problem, displayed, for overrides that must be refused.
fn refused(base: &RigConfig, o: &TaskOverrides) -> Vec<String> {
    match base.with_task_overrides(o) {
        Ok(_) => panic!("expected {o:?} to be refused"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

/// The rule (message) of the single problem of a file that must fail.
fn file_rule(text: &str) -> String {
    match parse_str(text, Path::new("rig.toml")) {
        Ok(_) => panic!("expected {text:?} to fail"),
        Err(e) => {
            assert_eq!(e.problems().len(), 1, "{e}");
            e.problems()[0].message.clone()
        }
    }
}

fn o() -> TaskOverrides {
    TaskOverrides::default()
}

#[test]
fn no_overrides_is_the_configuration() {
    let base = config("[task]\nmax_trials = 100\n");
    assert_eq!(accepted(&base, &o()), base);
}

#[test]
fn each_override_sets_its_key_and_nothing_else() {
    // Every key away from its default, so a stray write would show.
    let base = config(
        "[rig]\nlever_travel_mm = 8.0\n\n[task]\ncue_tone_hz = 7000\nresponse_window_ms = 9000\n\
         threshold_mm = 2.0\nreward_ul = 3.0\niti_min_ms = 2000\niti_max_ms = 7000\n\
         quiescence_ms = 100\nmax_trials = 100\nmax_rewards = 50\nsated_after_min = 10\n\
         max_duration_min = 60\n",
    );
    type Set = fn(&mut TaskSection);
    let cases: [(TaskOverrides, Set); 10] = [
        (
            TaskOverrides {
                response_window_ms: Some(5000),
                ..o()
            },
            |t| t.response_window_ms = 5000,
        ),
        (
            TaskOverrides {
                threshold_mm: Some(7.5),
                ..o()
            },
            |t| t.threshold_mm = 7.5,
        ),
        (
            TaskOverrides {
                reward_ul: Some(8.6),
                ..o()
            },
            |t| t.reward_ul = 8.6,
        ),
        (
            TaskOverrides {
                iti_min_ms: Some(7000),
                ..o()
            },
            |t| t.iti_min_ms = 7000,
        ),
        (
            TaskOverrides {
                iti_max_ms: Some(2000),
                ..o()
            },
            |t| t.iti_max_ms = 2000,
        ),
        (
            TaskOverrides {
                quiescence_ms: Some(0),
                ..o()
            },
            |t| t.quiescence_ms = 0,
        ),
        (
            TaskOverrides {
                max_trials: Some(1),
                ..o()
            },
            |t| t.max_trials = Some(1),
        ),
        (
            TaskOverrides {
                max_rewards: Some(400),
                ..o()
            },
            |t| t.max_rewards = Some(400),
        ),
        (
            TaskOverrides {
                sated_after_min: Some(1),
                ..o()
            },
            |t| t.sated_after_min = Some(1),
        ),
        (
            TaskOverrides {
                max_duration_min: Some(1440),
                ..o()
            },
            |t| t.max_duration_min = Some(1440),
        ),
    ];
    let mut fields = Vec::new();
    for (overrides, set) in cases {
        let mut expected = base.clone();
        set(&mut expected.task);
        assert_ne!(expected, base, "{overrides:?} must change something");
        assert_eq!(accepted(&base, &overrides), expected, "{overrides:?}");
        let applied = apply(&overrides, &mut base.task.clone());
        assert_eq!(applied.len(), 1, "{overrides:?}");
        fields.extend(applied.into_iter().map(|(field, _)| field));
    }
    fields.dedup();
    assert_eq!(fields.len(), 10, "every override field is covered once");

    // An unset limit becomes set (an override cannot remove one).
    let c = accepted(
        &RigConfig::default(),
        &TaskOverrides {
            max_trials: Some(3),
            ..o()
        },
    );
    assert_eq!(c.task.max_trials, Some(3));
}

#[test]
fn out_of_range_overrides_name_the_field_the_value_and_the_rule() {
    let base = RigConfig::default();
    let cases = [
        (
            TaskOverrides {
                response_window_ms: Some(0),
                ..o()
            },
            "task.response_window_ms = 0: must be 1..=600000 ms",
        ),
        (
            TaskOverrides {
                response_window_ms: Some(600_001),
                ..o()
            },
            "task.response_window_ms = 600001: must be 1..=600000 ms",
        ),
        (
            TaskOverrides {
                threshold_mm: Some(-1.0),
                ..o()
            },
            "task.threshold_mm = -1.0: must be > 0 and < rig.lever_travel_mm (6 mm)",
        ),
        (
            TaskOverrides {
                threshold_mm: Some(0.0),
                ..o()
            },
            "task.threshold_mm = 0.0: must be > 0 and < rig.lever_travel_mm (6 mm)",
        ),
        (
            TaskOverrides {
                reward_ul: Some(0.0),
                ..o()
            },
            "task.reward_ul = 0.0: must be a finite number > 0 µL",
        ),
        (
            TaskOverrides {
                reward_ul: Some(9.0),
                ..o()
            },
            "task.reward_ul = 9.0: must be inside the valve calibration's range (2..=8.6 µL); \
             change the reward or add a [[valve.calibration]] point that covers it",
        ),
        (
            TaskOverrides {
                iti_max_ms: Some(600_001),
                ..o()
            },
            "task.iti_max_ms = 600001: must be 0..=600000 ms",
        ),
        (
            TaskOverrides {
                quiescence_ms: Some(60_001),
                ..o()
            },
            "task.quiescence_ms = 60001: must be 0..=60000 ms (0 = off)",
        ),
        (
            TaskOverrides {
                max_trials: Some(0),
                ..o()
            },
            "task.max_trials = 0: must be > 0; remove the key for no limit",
        ),
        (
            TaskOverrides {
                max_rewards: Some(0),
                ..o()
            },
            "task.max_rewards = 0: must be > 0; remove the key for no limit",
        ),
        (
            TaskOverrides {
                sated_after_min: Some(0),
                ..o()
            },
            "task.sated_after_min = 0: must be > 0; remove the key for no limit",
        ),
        (
            TaskOverrides {
                max_duration_min: Some(0),
                ..o()
            },
            "task.max_duration_min = 0: must be > 0; remove the key for no limit",
        ),
    ];
    for (overrides, want) in cases {
        assert_eq!(refused(&base, &overrides), vec![want.to_owned()]);
    }
}

#[test]
fn threshold_override_is_checked_against_the_configured_lever_travel() {
    let short = config("[rig]\nlever_travel_mm = 3.0\n");
    let at = |mm: f64| TaskOverrides {
        threshold_mm: Some(mm),
        ..o()
    };
    assert_eq!(accepted(&short, &at(2.5)).task.threshold_mm, 2.5);
    assert_eq!(
        refused(&short, &at(3.0)),
        ["task.threshold_mm = 3.0: must be > 0 and < rig.lever_travel_mm (3 mm)"]
    );
    assert_eq!(
        refused(&short, &at(4.0)),
        ["task.threshold_mm = 4.0: must be > 0 and < rig.lever_travel_mm (3 mm)"]
    );
    // The same override on the default 6 mm lever is fine.
    assert_eq!(
        accepted(&RigConfig::default(), &at(4.0)).task.threshold_mm,
        4.0
    );
}

#[test]
fn reward_override_is_checked_against_the_calibration_and_the_valve_cap() {
    let reward = |ul: f64| TaskOverrides {
        reward_ul: Some(ul),
        ..o()
    };
    let capped = config("[safety]\nmax_valve_open_ms = 50\n");
    assert_eq!(
        refused(&capped, &reward(8.0)),
        [format!(
            "task.reward_ul = 8.0: {}",
            file_rule("[safety]\nmax_valve_open_ms = 50\n[task]\nreward_ul = 8.0\n")
        )]
    );
    assert!(
        refused(&capped, &reward(8.0))[0].contains("more than safety.max_valve_open_ms (50 ms)")
    );
    assert_eq!(accepted(&capped, &reward(4.0)).task.reward_ul, 4.0);

    // A calibration from zero: a reward too small for the device to time.
    let from_zero = config(
        "[[valve.calibration]]\nopen_ms = 0.0\nvolume_ul = 0.0\n\
         [[valve.calibration]]\nopen_ms = 40.0\nvolume_ul = 4.0\n",
    );
    let tiny = refused(&from_zero, &reward(0.00001));
    assert_eq!(tiny.len(), 1, "{tiny:?}");
    assert!(
        tiny[0].starts_with("task.reward_ul = 1e-5: needs the valve open 0.10 µs"),
        "{tiny:?}"
    );
    assert!(tiny[0].contains("less than the 1 µs the device can time"));
    assert_eq!(accepted(&from_zero, &reward(0.01)).task.reward_ul, 0.01);
}

#[test]
fn iti_overrides_are_checked_against_each_other_and_the_configured_end() {
    let base = RigConfig::default(); // 3000..=6000 ms
    assert_eq!(
        refused(
            &base,
            &TaskOverrides {
                iti_min_ms: Some(7000),
                ..o()
            }
        ),
        [
            "task.iti_min_ms = 7000: must be <= task.iti_max_ms (6000 ms); lower iti_min_ms or \
          raise iti_max_ms"
        ]
    );
    // Only iti_max_ms overridden: the broken rule is iti_min_ms's, and the
    // error still names the override that broke it.
    assert_eq!(
        refused(
            &base,
            &TaskOverrides {
                iti_max_ms: Some(2000),
                ..o()
            }
        ),
        [
            "task.iti_max_ms = 2000: conflicts with the configured task.iti_min_ms = 3000, which \
          must be <= task.iti_max_ms (2000 ms); lower iti_min_ms or raise iti_max_ms"
        ]
    );
    assert_eq!(
        refused(
            &base,
            &TaskOverrides {
                iti_min_ms: Some(5000),
                iti_max_ms: Some(4000),
                ..o()
            }
        ),
        [
            "task.iti_min_ms = 5000: must be <= task.iti_max_ms (4000 ms); lower iti_min_ms or \
          raise iti_max_ms"
        ]
    );
    let both = accepted(
        &base,
        &TaskOverrides {
            iti_min_ms: Some(1000),
            iti_max_ms: Some(2000),
            ..o()
        },
    );
    assert_eq!((both.task.iti_min_ms, both.task.iti_max_ms), (1000, 2000));
}

#[test]
fn every_problem_is_reported_in_the_order_of_the_fields() {
    let e = RigConfig::default()
        .with_task_overrides(&TaskOverrides {
            max_trials: Some(0),
            threshold_mm: Some(-1.0),
            response_window_ms: Some(0),
            ..o()
        })
        .expect_err("three broken rules");
    let fields: Vec<TaskOverrideField> = e.problems.iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            TaskOverrideField::ResponseWindowMs,
            TaskOverrideField::ThresholdMm,
            TaskOverrideField::MaxTrials
        ]
    );
    assert_eq!(
        e.to_string(),
        "task overrides rejected: task.response_window_ms = 0: must be 1..=600000 ms; \
         task.threshold_mm = -1.0: must be > 0 and < rig.lever_travel_mm (6 mm); \
         task.max_trials = 0: must be > 0; remove the key for no limit"
    );
}

#[test]
fn override_rules_are_the_files_rules() {
    // Each override's rule, word for word what check-config says for the
    // same value in the file.
    let cases = [
        (
            "[task]\nresponse_window_ms = 0\n",
            TaskOverrides {
                response_window_ms: Some(0),
                ..o()
            },
        ),
        (
            "[rig]\nlever_travel_mm = 3.0\n[task]\nthreshold_mm = 3.5\n",
            TaskOverrides {
                threshold_mm: Some(3.5),
                ..o()
            },
        ),
        (
            "[task]\nreward_ul = 1.0\n",
            TaskOverrides {
                reward_ul: Some(1.0),
                ..o()
            },
        ),
        (
            "[task]\niti_min_ms = 6500\n",
            TaskOverrides {
                iti_min_ms: Some(6500),
                ..o()
            },
        ),
        (
            "[task]\nquiescence_ms = 90000\n",
            TaskOverrides {
                quiescence_ms: Some(90_000),
                ..o()
            },
        ),
    ];
    for (text, overrides) in cases {
        let base = match text.split_once("[task]") {
            Some((before, _)) => config(before),
            None => RigConfig::default(),
        };
        let e = base
            .with_task_overrides(&overrides)
            .expect_err("must be refused");
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].rule, file_rule(text), "{text:?}");
    }
}

#[test]
fn rules_the_configuration_already_broke_are_not_the_overrides_fault() {
    // `rigd demo` runs a configuration built in code with preview.port = 0
    // (any free port), which the file rules do not allow.
    let mut base = RigConfig::default();
    base.preview.port = 0;
    let c = accepted(
        &base,
        &TaskOverrides {
            threshold_mm: Some(2.0),
            ..o()
        },
    );
    assert_eq!((c.task.threshold_mm, c.preview.port), (2.0, 0));
    // An overridden key is always checked, even at the value it had.
    base.task.threshold_mm = 9.0;
    assert_eq!(
        refused(
            &base,
            &TaskOverrides {
                threshold_mm: Some(9.0),
                ..o()
            }
        ),
        ["task.threshold_mm = 9.0: must be > 0 and < rig.lever_travel_mm (6 mm)"]
    );
}

#[test]
fn override_error_texts() {
    let base = config("[rig]\nlever_travel_mm = 4.0\n[safety]\nmax_valve_open_ms = 60\n");
    let requests = [
        TaskOverrides {
            threshold_mm: Some(4.5),
            ..o()
        },
        TaskOverrides {
            threshold_mm: Some(-2.0),
            ..o()
        },
        TaskOverrides {
            reward_ul: Some(12.0),
            ..o()
        },
        TaskOverrides {
            reward_ul: Some(8.0),
            ..o()
        },
        TaskOverrides {
            iti_max_ms: Some(1000),
            ..o()
        },
        TaskOverrides {
            iti_min_ms: Some(9000),
            iti_max_ms: Some(8000),
            ..o()
        },
        TaskOverrides {
            response_window_ms: Some(0),
            quiescence_ms: Some(70_000),
            max_trials: Some(0),
            max_rewards: Some(0),
            sated_after_min: Some(0),
            max_duration_min: Some(0),
            ..o()
        },
    ];
    // Each request's `task` object as a client sends it, then the error.
    let mut out = String::new();
    for r in &requests {
        let e = base.with_task_overrides(r).expect_err("must be refused");
        let json = serde_json::to_string(r).expect("overrides serialize");
        out.push_str(&format!("\"task\": {json}\n  {e}\n"));
    }
    insta::assert_snapshot!(out);
}
