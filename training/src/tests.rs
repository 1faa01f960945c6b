#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use crate::stages::{decide, Protocol, SessionMeasures};
use crate::subject::{self, Subject, SubjectError};
use crate::zone::LabZone;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rigd-training-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn example() -> Protocol {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/protocol.toml");
    Protocol::load(&path).unwrap()
}

fn m(trials: u64, success: f64, rt: f64) -> SessionMeasures {
    SessionMeasures {
        trials,
        success_rate: Some(success),
        reaction_time_median_s: Some(rt),
        trajectory_corr_median: None,
    }
}

#[test]
fn the_example_protocol_loads_and_its_stages_follow_the_rules() {
    let p = example();
    assert_eq!(p.file.stages.len(), 3);
    assert_eq!(p.sha256.len(), 64);
    let s = |name: &str, ms: SessionMeasures| (name.to_owned(), ms);
    // A new mouse starts at the first stage.
    assert_eq!(decide(&p, &[]).unwrap().name, "s1-shaping");
    // Too few trials: stays, and says why.
    let d = decide(&p, &[s("s1-shaping", m(50, 0.9, 1.0))]).unwrap();
    assert_eq!(d.name, "s1-shaping");
    assert!(d.why.contains("50 trials < min_trials 100"), "{}", d.why);
    // One good session advances s1.
    let d = decide(&p, &[s("s1-shaping", m(120, 0.8, 1.0))]).unwrap();
    assert_eq!(d.name, "s2-threshold");
    // s2 needs two consecutive good sessions at s2: one is not enough.
    let mut past = vec![
        s("s1-shaping", m(120, 0.8, 1.0)),
        s("s2-threshold", m(150, 0.9, 0.8)),
    ];
    assert_eq!(decide(&p, &past).unwrap().name, "s2-threshold");
    // A bad one between resets the count.
    past.push(s("s2-threshold", m(150, 0.5, 0.8)));
    past.push(s("s2-threshold", m(150, 0.9, 0.8)));
    assert_eq!(decide(&p, &past).unwrap().name, "s2-threshold");
    past.push(s("s2-threshold", m(150, 0.9, 1.2)));
    assert_eq!(decide(&p, &past).unwrap().name, "s3-full-task");
    // Reaction time too slow in the last one: stays.
    let slow = vec![
        s("s2-threshold", m(150, 0.9, 0.8)),
        s("s2-threshold", m(150, 0.9, 2.0)),
    ];
    let d = decide(&p, &slow).unwrap();
    assert_eq!(d.name, "s2-threshold");
    assert!(d.why.contains("reaction time"), "{}", d.why);
    // Regression: two failing sessions at s3 go back to s2.
    let bad = vec![
        s("s3-full-task", m(100, 0.2, 3.0)),
        s("s3-full-task", m(100, 0.25, 3.0)),
    ];
    assert_eq!(decide(&p, &bad).unwrap().name, "s2-threshold");
    // The last stage stays.
    assert_eq!(
        decide(&p, &[s("s3-full-task", m(300, 0.95, 0.4))])
            .unwrap()
            .name,
        "s3-full-task"
    );
    // A stage the protocol does not have: a clear error naming --stage.
    let e = decide(&p, &[s("old-stage", m(1, 1.0, 1.0))]).unwrap_err();
    assert!(e.contains("--stage") && e.contains("s1-shaping"), "{e}");
}

#[test]
fn a_bad_protocol_is_refused_with_file_key_value_and_rule() {
    let path = Path::new("/x/protocol.toml");
    let cases = [
        ("name = \"p\"\n", "stage"),
        (
            "name = \"p\"\n[[stage]]\nname = \"a\"\n[stage.advance]\nsessions = 1\nmin_success = 0.5\n",
            "stage[0].advance",
        ),
        (
            "name = \"p\"\n[[stage]]\nname = \"a\"\n[stage.advance]\nsessions = 1\nmin_success = 70\n[[stage]]\nname = \"b\"\n",
            "stage[0].advance.min_success = 70",
        ),
        (
            "name = \"p\"\n[[stage]]\nname = \"a\"\n[stage.advance]\nsessions = 0\nmin_trials = 5\n[[stage]]\nname = \"b\"\n",
            "stage[0].advance.sessions = 0",
        ),
        ("name = \"p\"\n[[stage]]\nname = \"a b\"\n", "stage[0].name"),
        ("name = \"p\"\n[[stage]]\nname = \"a\"\n[stage.task]\nthreshold = 1.0\n", "unknown field"),
        (
            "name = \"p\"\n[[stage]]\nname = \"a\"\n[stage.regress]\nsessions = 1\nmax_success = 0.1\n",
            "stage[0].regress",
        ),
    ];
    for (text, want) in cases {
        let e = Protocol::parse(path, text).unwrap_err().to_string();
        assert!(
            e.contains("/x/protocol.toml") && e.contains(want),
            "{want}: {e}"
        );
    }
}

fn mouse(id: &str) -> Subject {
    Subject {
        id: id.into(),
        species: "Mus musculus".into(),
        sex: "F".into(),
        date_of_birth: "2026-01-15".into(),
        strain: "C57BL/6J".into(),
        genotype: "wild type".into(),
        experimenter: "Doe, Jane".into(),
        baseline_weight_g: 24.5,
        notes: "left ear punch".into(),
        lab: Some("Lab".into()),
        institution: None,
        age: None,
        description: None,
    }
}

#[test]
fn a_subject_record_round_trips_and_reads_like_the_nwb_exports_file() {
    let root = temp("subject");
    let s = mouse("M12");
    let path = subject::write(&root, &s, true, None).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    // A TOML date, as the NWB export's tests write it.
    assert!(text.contains("date_of_birth = 2026-01-15\n"), "{text}");
    assert!(text.starts_with("# rigd mouse record"), "{text}");
    assert_eq!(subject::read(&root, "M12").unwrap(), s);
    // No temporary file left behind.
    assert!(!root.join("M12/subject.toml.tmp").exists());
    // Adding it again is refused, naming edit.
    let e = subject::write(&root, &s, true, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rigctl mouse edit M12"), "{e}");
    // The file tests/tests/nwb.rs writes reads too.
    std::fs::create_dir_all(root.join("M7")).unwrap();
    std::fs::write(
        root.join("M7/subject.toml"),
        "id = \"M7\"\nspecies = \"Mus musculus\"\nsex = \"F\"\ndate_of_birth = 2026-09-01\n\
         strain = \"C57BL/6J\"\ngenotype = \"wild type\"\nexperimenter = \"Doe, Jane\"\n\
         baseline_weight_g = 23.5\nnotes = \"test mouse\"\nlab = \"Test lab\"\ninstitution = \"Test institute\"\n",
    )
    .unwrap();
    assert_eq!(subject::read(&root, "M7").unwrap().baseline_weight_g, 23.5);
    // An unknown mouse names the command that adds it.
    match subject::read(&root, "M99") {
        Err(e @ SubjectError::Unknown { .. }) => {
            assert!(e.to_string().contains("rigctl mouse add M99"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let list = subject::list(&root).unwrap();
    assert_eq!(list.len(), 2);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn every_subject_field_is_checked() {
    let p = Path::new("/data/M12/subject.toml");
    let today = "2026-06-01".parse().ok();
    type Change = Box<dyn Fn(&mut Subject)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|s| s.sex = "female".into()), "sex = \"female\""),
        (Box::new(|s| s.species = " ".into()), "species"),
        (
            Box::new(|s| s.date_of_birth = "2026-13-01".into()),
            "date_of_birth",
        ),
        (
            Box::new(|s| s.date_of_birth = "2027-01-01".into()),
            "after today",
        ),
        (
            Box::new(|s| s.baseline_weight_g = 245.0),
            "baseline_weight_g = 245",
        ),
        (
            Box::new(|s| s.baseline_weight_g = f64::NAN),
            "baseline_weight_g",
        ),
        (Box::new(|s| s.id = "M13".into()), "folder name"),
        (Box::new(|s| s.age = Some("90 days".into())), "age"),
    ];
    for (change, want) in cases {
        let mut s = mouse("M12");
        change(&mut s);
        let e = s.validate(p, today).unwrap_err().to_string();
        assert!(
            e.contains("/data/M12/subject.toml") && e.contains(want),
            "{want}: {e}"
        );
    }
    assert!(mouse("M12").validate(p, today).is_ok());
}

fn session(root: &Path, mouse: &str, folder: &str, start_utc: &str, training: &str, summary: &str) {
    let d = root.join(mouse).join(folder);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("session.toml"),
        format!("format_version = 2\nstate = \"complete\"\nmouse = \"{mouse}\"\nrig = \"rig1\"\nstart_utc = \"{start_utc}\"\n{training}"),
    )
    .unwrap();
    if !summary.is_empty() {
        std::fs::write(d.join("summary.json"), summary).unwrap();
    }
}

#[test]
fn history_days_and_water_are_counted_in_the_labs_zone() {
    let root = temp("history");
    let la = LabZone::new("America/Los_Angeles").unwrap();
    // Two sessions on the same California day (the second after 4 pm,
    // which is the next UTC day), one the next day, and one without a
    // summary (a crash not yet recovered): counted from trials.tsv.
    session(&root, "M1", "2026-07-01_090000", "2026-07-01T16:00:00Z", "[training]\nday = 1\nlocal_date = \"2026-07-01\"\ntimezone = \"America/Los_Angeles\"\nstage = \"s1\"\nweight_g = 22.0\n", r#"{"trials": 100, "rewards": 80, "water_ul": 320.0, "success_rate": 0.8}"#);
    session(
        &root,
        "M1",
        "2026-07-01_170000",
        "2026-07-02T00:30:00Z",
        "",
        r#"{"trials": 10, "rewards": 5, "water_ul": 20.0, "success_rate": 0.5}"#,
    );
    session(
        &root,
        "M1",
        "2026-07-02_090000",
        "2026-07-02T16:00:00Z",
        "",
        "",
    );
    std::fs::write(
        root.join("M1/2026-07-02_090000/trials.tsv"),
        "trial\tt_start_s\tt_cue_s\tt_response_s\toutcome\tt_reward_s\treward_ul\n1\t0\t1\t1.5\trewarded\t1.5\t4.0\n2\t3\t4\t\tmiss\t\t0\n",
    )
    .unwrap();
    let (rows, skipped) = crate::read_sessions(&root, "M1", &la);
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].local_date, "2026-07-01");
    assert_eq!(rows[2].trials, 2);
    assert_eq!(rows[2].rewards, 1);
    assert_eq!(rows[2].source, "trials.tsv");
    assert_eq!(crate::training_day(&rows, "2026-07-01"), 1);
    assert_eq!(crate::training_day(&rows, "2026-07-02"), 2);
    assert_eq!(crate::training_day(&rows, "2026-07-05"), 3);
    // In UTC the second session is on the 2nd.
    let (utc_rows, _) = crate::read_sessions(&root, "M1", &LabZone::utc());
    assert_eq!(utc_rows[1].local_date, "2026-07-02");
    // The ledger: task water per local day, water by hand, supplement owed.
    let gifts = vec![crate::water::Gift {
        utc: "2026-07-02T03:00:00Z".into(),
        local_date: "2026-07-01".into(),
        ul: 500.0,
        kind: "supplement".into(),
        by: "jdoe".into(),
        note: String::new(),
    }];
    let ledger = crate::water::ledger(&rows, &gifts, Some(1000.0));
    let d1 = &ledger["2026-07-01"];
    assert_eq!(d1.task_ul, 340.0);
    assert_eq!(d1.by_hand_ul, 500.0);
    assert_eq!(d1.supplement_owed_ul, Some(160.0));
    assert_eq!(ledger["2026-07-02"].task_ul, 4.0);
    let table = crate::table::history_table(&rows, &ledger);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains("22.0g"), "{table}");
    let html = crate::report::report_html("M1", None, &rows, &ledger, "now");
    assert!(html.contains("data-value=\"0.8\""), "{html}");
    // Self-contained: no script, nothing loaded from anywhere.
    for banned in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(banned), "{banned} in the report");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn water_given_by_hand_is_appended_and_a_torn_line_is_not_counted() {
    let root = temp("water");
    let z = LabZone::utc();
    assert!(crate::water::give(&root, "M1", &z, 100.0, "supplement", "me", "").is_err());
    std::fs::create_dir_all(root.join("M1")).unwrap();
    let g =
        crate::water::give(&root, "M1", &z, 250.0, "supplement", "me", "after\tsession").unwrap();
    crate::water::give(&root, "M1", &z, 12.5, "pulse", "me", "").unwrap();
    for bad in [0.0, -5.0, f64::NAN, 1e6] {
        assert!(crate::water::give(&root, "M1", &z, bad, "supplement", "me", "").is_err());
    }
    assert!(crate::water::give(&root, "M1", &z, 5.0, "bath", "me", "").is_err());
    // A crash mid-line: no newline, not counted.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("M1/water.tsv"))
        .unwrap();
    f.write_all(b"2026-01-01T00:00:00Z\t2026").unwrap();
    let (gifts, bad) = crate::water::gifts(&root, "M1");
    assert_eq!((gifts.len(), bad), (2, 0));
    assert_eq!(gifts[0].note, "after session");
    assert_eq!(
        crate::water::by_hand_on_day(&root, "M1", &g.local_date),
        262.5
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_mouse_folder_that_is_a_link_is_never_written_through() {
    let root = temp("link");
    let elsewhere = temp("link-target");
    std::os::unix::fs::symlink(&elsewhere, root.join("M7")).unwrap();
    let e = subject::write(&root, &subject::demo_subject("M7"), true, None).unwrap_err();
    assert!(matches!(e, SubjectError::Unsafe(_)), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let zone = LabZone::utc();
    let e = crate::water::give(&root, "M7", &zone, 10.0, "supplement", "me", "").unwrap_err();
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written"
    );
}
