//! Tests of the control-socket messages: request parsing and error
//! classification, the exact JSON of responses and events, mouse ids and the
//! line splitter.

use proptest::prelude::*;
use protocol::control::{
    encode_line, parse_request_line, parse_server_line, validate_mouse_id, ControlError,
    DeviceEvent, ErrorBody, ErrorCode, Event, InvalidValveRequest, LineSplitter, LinkEvent,
    LinkState, Request, RequestEnvelope, RequestId, Response, ServerMessage, SessionEvent,
    SessionState, SessionSummary, SplitLine, StartReply, StartRequest, StatusReply, StopReply,
    StopRequest, TaskOverrides, ToneRequest, TrialEvent, TrialOutcome, ValveAction, ValveRequest,
    MAX_LINE_BYTES,
};
use serde_json::{json, Value};

fn value_of_line(line: &[u8]) -> Value {
    assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "exactly one newline"
    );
    serde_json::from_slice(line).expect("valid JSON")
}

fn every_request() -> Vec<Request> {
    vec![
        Request::Start(StartRequest {
            mouse: "M12".into(),
            notes: None,
            task: None,
            ..Default::default()
        }),
        Request::Start(StartRequest {
            mouse: "cohort3_m-07".into(),
            notes: Some("day 4; new lever \"B\"\nsecond line".into()),
            task: Some(TaskOverrides {
                response_window_ms: Some(10_000),
                threshold_mm: Some(1.5),
                reward_ul: Some(4.0),
                iti_min_ms: Some(3000),
                iti_max_ms: Some(6000),
                quiescence_ms: Some(200),
                max_trials: Some(300),
                max_rewards: Some(250),
                max_duration_min: Some(60),
                sated_after_min: None,
            }),
            ..Default::default()
        }),
        Request::Start(StartRequest {
            mouse: "m".into(),
            notes: None,
            task: Some(TaskOverrides {
                threshold_mm: Some(2.0),
                ..Default::default()
            }),
            ..Default::default()
        }),
        Request::Start(StartRequest {
            mouse: "M12".into(),
            stage: Some("full-task".into()),
            stage_reason: Some("back after a week off".into()),
            operator: Some("jdoe".into()),
            weight_g: Some(21.5),
            ..Default::default()
        }),
        Request::Stop(StopRequest { reason: None }),
        Request::Stop(StopRequest {
            reason: Some("mouse sated".into()),
        }),
        Request::Status {},
        Request::Subscribe {},
        Request::Valve(ValveRequest {
            pulse_ms: Some(40.0),
            flush_ms: None,
            ..Default::default()
        }),
        Request::Valve(ValveRequest {
            pulse_ms: None,
            flush_ms: Some(2500.5),
            ..Default::default()
        }),
        Request::Valve(ValveRequest {
            pulse_ms: Some(20.0),
            flush_ms: None,
            calibration: true,
        }),
        Request::Tone(ToneRequest { test: true }),
    ]
}

// ---- requests ----------------------------------------------------------------

#[test]
fn every_request_round_trips_with_and_without_id() {
    for request in every_request() {
        for id in [
            None,
            Some(RequestId::Number(0)),
            Some(RequestId::Number(u64::MAX)),
            Some("a-1".into()),
        ] {
            let envelope = RequestEnvelope {
                id: id.clone(),
                request: request.clone(),
            };
            let line = envelope.to_line();
            value_of_line(&line);
            let parsed = parse_request_line(&line[..line.len() - 1]).expect("parses");
            assert_eq!(parsed, envelope, "{}", String::from_utf8_lossy(&line));
            // serde's Deserialize goes the same way.
            let via_serde: RequestEnvelope = serde_json::from_slice(&line).expect("deserializes");
            assert_eq!(via_serde, envelope);
        }
    }
}

#[test]
fn request_wire_shapes() {
    let shape = |envelope: RequestEnvelope| value_of_line(&envelope.to_line());
    assert_eq!(
        shape(RequestEnvelope::new(1, Request::Status {})),
        json!({"id": 1, "cmd": "status"})
    );
    assert_eq!(
        shape(RequestEnvelope {
            id: None,
            request: Request::Subscribe {}
        }),
        json!({"cmd": "subscribe"})
    );
    assert_eq!(
        shape(RequestEnvelope::new(
            "x",
            Request::Start(StartRequest {
                mouse: "M12".into(),
                notes: Some("n".into()),
                task: Some(TaskOverrides {
                    max_trials: Some(5),
                    ..Default::default()
                }),
                ..Default::default()
            })
        )),
        json!({"id": "x", "cmd": "start", "mouse": "M12", "notes": "n", "task": {"max_trials": 5}})
    );
    assert_eq!(
        shape(RequestEnvelope::new(
            2,
            Request::Valve(ValveRequest {
                pulse_ms: Some(40.0),
                flush_ms: None,
                ..Default::default()
            })
        )),
        json!({"id": 2, "cmd": "valve", "pulse_ms": 40.0})
    );
    assert_eq!(
        shape(RequestEnvelope::new(
            3,
            Request::Tone(ToneRequest { test: true })
        )),
        json!({"id": 3, "cmd": "tone", "test": true})
    );
    assert_eq!(
        shape(RequestEnvelope::new(
            4,
            Request::Stop(StopRequest::default())
        )),
        json!({"id": 4, "cmd": "stop"})
    );
}

#[test]
fn handwritten_requests_parse() {
    let parse = |s: &str| parse_request_line(s.as_bytes()).expect(s);
    let e = parse(r#"  {"cmd":"start","mouse":"M12","task":{"reward_ul":3.5}}  "#);
    assert_eq!(e.id, None);
    match e.request {
        Request::Start(start) => {
            assert_eq!(start.mouse, "M12");
            assert_eq!(start.task.and_then(|t| t.reward_ul), Some(3.5));
        }
        other => panic!("{other:?}"),
    }
    // A trailing CR (a client that sends CRLF), `id: null` and null options.
    let e = parse("{\"cmd\":\"stop\",\"id\":null,\"reason\":null}\r");
    assert_eq!(e.id, None);
    assert_eq!(e.request, Request::Stop(StopRequest { reason: None }));
    // Key order does not matter; integer durations are fine.
    let e = parse(r#"{"flush_ms":3000,"id":"abc","cmd":"valve"}"#);
    assert_eq!(e.id, Some(RequestId::Text("abc".into())));
    match e.request {
        Request::Valve(v) => assert_eq!(
            v.action(),
            Ok(ValveAction::Flush {
                duration_ms: 3000.0
            })
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_valve_request_without_one_positive_duration_says_which_rule() {
    let action = |pulse_ms, flush_ms| {
        ValveRequest {
            pulse_ms,
            flush_ms,
            ..Default::default()
        }
        .action()
    };
    assert_eq!(action(None, None), Err(InvalidValveRequest::Neither));
    assert_eq!(action(Some(1.0), Some(1.0)), Err(InvalidValveRequest::Both));
    let e = action(Some(0.0), None).expect_err("a zero pulse");
    assert_eq!(
        e,
        InvalidValveRequest::NotPositive {
            field: "pulse_ms",
            value_ms: 0.0
        }
    );
    assert_eq!(
        e.to_string(),
        "valve: pulse_ms = 0: expected a duration > 0"
    );
    assert_eq!(
        action(None, Some(-3.0)).map_err(|e| e.to_string()),
        Err("valve: flush_ms = -3: expected a duration > 0".to_owned())
    );
    assert_eq!(
        action(None, Some(2.5)),
        Ok(ValveAction::Flush { duration_ms: 2.5 })
    );
}

#[test]
fn every_known_command_is_recognised() {
    for cmd in Request::COMMANDS {
        let line = format!(r#"{{"cmd":"{cmd}","id":1}}"#);
        match parse_request_line(line.as_bytes()) {
            Ok(e) => assert_eq!(e.request.name(), cmd),
            Err(e) => assert_ne!(e.code, ErrorCode::UnknownCommand, "{cmd}: {e}"),
        }
    }
    for request in every_request() {
        assert!(Request::COMMANDS.contains(&request.name()));
    }
}

/// Each malformed input, the code it must get, and the id the error must
/// carry.
#[test]
fn malformed_requests_get_the_right_code_and_keep_the_id() {
    use ErrorCode::*;
    let n = |i: u64| Some(RequestId::Number(i));
    let cases: Vec<(&[u8], ErrorCode, Option<RequestId>, &str)> = vec![
        // not JSON
        (b"", BadJson, None, "empty"),
        (b"   \r", BadJson, None, "empty"),
        (b"\xff\xfe{}", BadJson, None, "UTF-8"),
        (
            b"{\"cmd\":\"status\",\"id\":\"\xc3\x28\"}",
            BadJson,
            None,
            "UTF-8",
        ),
        (b"status", BadJson, None, "not valid JSON"),
        (b"{\"cmd\":\"status\"", BadJson, None, "not valid JSON"),
        (
            b"{\"cmd\":\"status\"} {\"cmd\":\"stop\"}",
            BadJson,
            None,
            "trailing",
        ),
        (b"{'cmd':'status'}", BadJson, None, "not valid JSON"),
        (
            b"{\"id\":1e999,\"cmd\":\"status\"}",
            BadJson,
            None,
            "not valid JSON",
        ),
        // JSON, but not a request object
        (b"[]", BadRequest, None, "an array"),
        (b"42", BadRequest, None, "a number"),
        (b"\"status\"", BadRequest, None, "a string"),
        (b"null", BadRequest, None, "null"),
        (b"true", BadRequest, None, "a boolean"),
        (br#"{"id":5}"#, BadRequest, n(5), "missing field `cmd`"),
        (br#"{"id":6,"cmd":7}"#, BadRequest, n(6), "cmd = 7"),
        (br#"{"id":6,"cmd":null}"#, BadRequest, n(6), "cmd = null"),
        // bad ids: the id cannot be echoed
        (
            br#"{"id":{"a":1},"cmd":"status"}"#,
            BadRequest,
            None,
            "id = {\"a\":1}",
        ),
        (br#"{"id":-1,"cmd":"status"}"#, BadRequest, None, "id = -1"),
        (
            br#"{"id":1.5,"cmd":"status"}"#,
            BadRequest,
            None,
            "non-negative integer",
        ),
        (
            br#"{"id":[1],"cmd":"status"}"#,
            BadRequest,
            None,
            "id = [1]",
        ),
        // unknown commands
        (
            br#"{"id":"q","cmd":"reboot"}"#,
            UnknownCommand,
            Some("q".into()),
            "\"reboot\"",
        ),
        (
            br#"{"cmd":"STATUS","id":8}"#,
            UnknownCommand,
            n(8),
            "start, stop, status",
        ),
        (
            br#"{"cmd":"","id":8}"#,
            UnknownCommand,
            n(8),
            "unknown command",
        ),
        // wrong or missing fields
        (
            br#"{"cmd":"start","id":3}"#,
            BadRequest,
            n(3),
            "start: missing field `mouse`",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":12}"#,
            BadRequest,
            n(3),
            "invalid type",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":"m","colour":"red"}"#,
            BadRequest,
            n(3),
            "unknown field `colour`",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":"m","task":{"threshhold_mm":2}}"#,
            BadRequest,
            n(3),
            "threshhold_mm",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":"m","task":{"iti_min_ms":-5}}"#,
            BadRequest,
            n(3),
            "-5",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":"m","task":[]}"#,
            BadRequest,
            n(3),
            "task = []: expected an object",
        ),
        (
            br#"{"cmd":"start","id":3,"mouse":"m","task":[5000]}"#,
            BadRequest,
            n(3),
            "expected an object",
        ),
        (
            br#"{"cmd":"status","id":4,"verbose":true}"#,
            BadRequest,
            n(4),
            "unknown field `verbose`",
        ),
        (
            br#"{"cmd":"subscribe","id":4,"filter":"trial"}"#,
            BadRequest,
            n(4),
            "unknown field `filter`",
        ),
        (
            br#"{"cmd":"stop","id":4,"reason":5}"#,
            BadRequest,
            n(4),
            "invalid type",
        ),
        (
            br#"{"cmd":"tone","id":9}"#,
            BadRequest,
            n(9),
            "missing field `test`",
        ),
        (
            br#"{"cmd":"tone","id":9,"test":"yes"}"#,
            BadRequest,
            n(9),
            "invalid type",
        ),
        (
            br#"{"cmd":"valve","id":10}"#,
            BadRequest,
            n(10),
            "exactly one",
        ),
        (
            br#"{"cmd":"valve","id":10,"pulse_ms":10,"flush_ms":10}"#,
            BadRequest,
            n(10),
            "exactly one",
        ),
        (
            br#"{"cmd":"valve","id":10,"pulse_ms":0}"#,
            BadRequest,
            n(10),
            "pulse_ms = 0",
        ),
        (
            br#"{"cmd":"valve","id":10,"flush_ms":-3}"#,
            BadRequest,
            n(10),
            "flush_ms = -3",
        ),
        (
            br#"{"cmd":"valve","id":10,"pulse_ms":"40"}"#,
            BadRequest,
            n(10),
            "invalid type",
        ),
        // semantic: the mouse id
        (
            br#"{"cmd":"start","id":11,"mouse":"../x"}"#,
            InvalidMouse,
            n(11),
            "mouse = \"../x\"",
        ),
        (
            br#"{"cmd":"start","id":"s","mouse":""}"#,
            InvalidMouse,
            Some("s".into()),
            "1 to 64",
        ),
    ];
    for (input, code, id, needle) in cases {
        let shown = String::from_utf8_lossy(input);
        let err = parse_request_line(input).expect_err(&shown);
        assert_eq!(err.code, code, "{shown}: {err}");
        assert_eq!(err.id, id, "{shown}: {err}");
        assert!(
            err.message.contains(needle),
            "{shown}: {:?} lacks {needle:?}",
            err.message
        );
        // The error response carries code, message and id.
        let v = value_of_line(&err.to_response().to_line());
        assert_eq!(v["ok"], json!(false));
        assert_eq!(v["error"]["code"], json!(code.as_str()));
        assert_eq!(v["id"], serde_json::to_value(&id).expect("id"));
    }
}

#[test]
fn deeply_nested_json_is_bad_json_not_a_crash() {
    let line = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(
        parse_request_line(line.as_bytes()).map_err(|e| e.code),
        Err(ErrorCode::BadJson)
    );
}

#[test]
fn over_long_line_is_line_too_long() {
    let mut line = br#"{"cmd":"start","mouse":"m","notes":""#.to_vec();
    line.resize(MAX_LINE_BYTES - 2, b'a');
    line.extend_from_slice(b"\"}");
    assert_eq!(line.len(), MAX_LINE_BYTES);
    assert!(
        parse_request_line(&line).is_ok(),
        "exactly the limit is fine"
    );
    line.insert(40, b'a');
    let err = parse_request_line(&line).expect_err("one byte too long");
    assert_eq!(err.code, ErrorCode::LineTooLong);
    assert_eq!(err, ControlError::line_too_long());
    assert!(err.message.contains("65536"));
}

#[test]
fn long_values_are_cut_in_error_messages() {
    let cmd = "x".repeat(10_000);
    let line = format!(r#"{{"cmd":"{cmd}"}}"#);
    let err = parse_request_line(line.as_bytes()).expect_err("unknown");
    assert_eq!(err.code, ErrorCode::UnknownCommand);
    assert!(err.message.len() < 300, "{}", err.message.len());
    assert!(err.message.contains("..."));
}

// ---- mouse ids ------------------------------------------------------------------

#[test]
fn mouse_ids() {
    for good in [
        "M12",
        "m",
        "cohort3_m-07",
        "-",
        "_",
        &"a".repeat(64),
        "0123456789",
    ] {
        assert_eq!(validate_mouse_id(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        "../x",
        "..",
        ".",
        "a/b",
        "/abs",
        "a b",
        " m",
        "m\n",
        "m\0",
        "mäus",
        "M12\u{200b}",
        "a\\b",
        "m.1",
        "m:1",
        "*",
        &"a".repeat(65),
    ] {
        let err = validate_mouse_id(bad).expect_err(bad);
        let msg = err.to_string();
        assert!(msg.starts_with("mouse = \""), "{msg}");
        assert!(msg.contains("A-Z, a-z, 0-9, '_' or '-'"), "{msg}");
        assert!(msg.contains("1 to 64 characters"), "{msg}");
    }
    let msg = validate_mouse_id("a\nb").expect_err("newline").to_string();
    assert!(msg.contains(r#""a\nb""#), "escaped in the message: {msg}");
}

// ---- responses ------------------------------------------------------------------

#[test]
fn ok_response_shape() {
    let reply = StatusReply {
        state: SessionState::Running,
        mouse: Some("M12".into()),
        session_dir: Some("/data/M12/2025-03-14_092653".into()),
        started_utc: Some("2025-03-14T09:26:53Z".into()),
        elapsed_s: Some(61.5),
        trials: Some(12),
        rewards: Some(9),
        water_ul: Some(36.0),
        link: Some(LinkState::Connected),
        frames: Some(1830),
        drops: Some(0),
        checking_fov: None,
    };
    let response = Response::ok(Some(RequestId::Number(7)), &reply);
    assert_eq!(
        value_of_line(&response.to_line()),
        json!({
            "ok": true, "id": 7, "state": "running", "mouse": "M12",
            "session_dir": "/data/M12/2025-03-14_092653", "started_utc": "2025-03-14T09:26:53Z",
            "elapsed_s": 61.5, "trials": 12, "rewards": 9, "water_ul": 36.0,
            "link": "connected", "frames": 1830, "drops": 0
        })
    );
    // The first keys on the line are ok and id.
    let line = String::from_utf8(response.to_line()).expect("utf8");
    assert!(line.starts_with(r#"{"ok":true,"id":7,"#), "{line}");
    assert_eq!(response.payload::<StatusReply>().expect("payload"), reply);

    let idle = Response::ok(None, &StatusReply::default());
    assert_eq!(
        value_of_line(&idle.to_line()),
        json!({"ok": true, "id": null, "state": "idle"})
    );
    assert_eq!(
        value_of_line(&Response::ok_empty(Some("abc".into())).to_line()),
        json!({"ok": true, "id": "abc"})
    );
    assert_eq!(
        value_of_line(&Response::ok(Some(1.into()), &()).to_line()),
        json!({"ok": true, "id": 1})
    );
}

#[test]
fn error_response_shape() {
    let response = Response::error(
        Some(RequestId::Number(3)),
        ErrorCode::AlreadyRunning,
        "a session for M12 is running",
    );
    assert_eq!(
        value_of_line(&response.to_line()),
        json!({
            "ok": false, "id": 3,
            "error": {"code": "already_running", "message": "a session for M12 is running"}
        })
    );
    let without_id = ControlError::new(ErrorCode::BadJson, "nope").to_response();
    assert_eq!(
        value_of_line(&without_id.to_line()),
        json!({"ok": false, "id": null, "error": {"code": "bad_json", "message": "nope"}})
    );
}

#[test]
fn every_error_code_has_its_snake_case_string() {
    use ErrorCode::*;
    let codes = [
        (BadJson, "bad_json"),
        (BadRequest, "bad_request"),
        (UnknownCommand, "unknown_command"),
        (LineTooLong, "line_too_long"),
        (AlreadyRunning, "already_running"),
        (NotRunning, "not_running"),
        (InvalidMouse, "invalid_mouse"),
        (DeviceUnavailable, "device_unavailable"),
        (RefusedBySafety, "refused_by_safety"),
        (Busy, "busy"),
        (Internal, "internal"),
    ];
    for (code, text) in codes {
        assert_eq!(code.as_str(), text);
        assert_eq!(code.to_string(), text);
        assert_eq!(serde_json::to_value(code).expect("ser"), json!(text));
        assert_eq!(
            serde_json::from_value::<ErrorCode>(json!(text)).expect("de"),
            code
        );
    }
    // A code from a newer daemon does not break an older client.
    assert_eq!(
        serde_json::from_value::<ErrorCode>(json!("quota_exceeded")).expect("de"),
        ErrorCode::Unknown
    );
}

#[test]
fn typed_replies_round_trip() {
    let start = StartReply {
        session_dir: "/data/M12/2025-03-14_092653".into(),
        mouse: "M12".into(),
        started_utc: "2025-03-14T09:26:53Z".into(),
        ..Default::default()
    };
    let response = Response::ok(Some(1.into()), &start);
    assert_eq!(
        value_of_line(&response.to_line()),
        json!({"ok": true, "id": 1, "session_dir": "/data/M12/2025-03-14_092653",
               "mouse": "M12", "started_utc": "2025-03-14T09:26:53Z"})
    );
    assert_eq!(response.payload::<StartReply>().expect("payload"), start);

    let stop = StopReply {
        summary: SessionSummary {
            session_dir: "/data/M12/2025-03-14_092653".into(),
            trials: 0,
            rewards: 0,
            water_ul: 0.0,
            success_rate: None,
            reaction_time_median_s: None,
            trajectory_corr_median: None,
            stop_reason: None,
            water_today_ul: None,
            supplement_ul: None,
            qc: None,
        },
    };
    let response = Response::ok(Some(2.into()), &stop);
    assert_eq!(
        value_of_line(&response.to_line()),
        json!({"ok": true, "id": 2, "summary": {
            "session_dir": "/data/M12/2025-03-14_092653", "trials": 0, "rewards": 0,
            "water_ul": 0.0, "success_rate": null, "reaction_time_median_s": null,
            "trajectory_corr_median": null
        }})
    );
    assert_eq!(response.payload::<StopReply>().expect("payload"), stop);

    // Responses parse back on the client side.
    for response in [
        Response::ok(Some(2.into()), &stop),
        Response::ok(Some("s".into()), &start),
        Response::error(None, ErrorCode::Busy, "stopping"),
        Response::ok_empty(None),
    ] {
        let line = response.to_line();
        match parse_server_line(&line) {
            Ok(ServerMessage::Response(parsed)) => assert_eq!(parsed, response),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn status_reply_tolerates_unknown_fields_from_newer_daemons() {
    let line = br#"{"ok":true,"id":1,"state":"stopping","future_field":[1,2]}"#;
    let Ok(ServerMessage::Response(response)) = parse_server_line(line) else {
        panic!("a response");
    };
    let status: StatusReply = response.payload().expect("payload");
    assert_eq!(status.state, SessionState::Stopping);
    assert_eq!(response.error, None::<ErrorBody>);
}

// ---- events ---------------------------------------------------------------------

fn every_event() -> Vec<(Event, Value)> {
    let summary = SessionSummary {
        session_dir: "/d/M1/2025-01-01_000000".into(),
        trials: 10,
        rewards: 7,
        water_ul: 28.0,
        success_rate: Some(0.7),
        reaction_time_median_s: Some(0.8),
        trajectory_corr_median: Some(0.5),
        stop_reason: Some("water_cap".into()),
        water_today_ul: Some(900.0),
        supplement_ul: Some(100.0),
        qc: None,
    };
    vec![
        (
            Event::Trial(TrialEvent {
                trial: 3,
                outcome: TrialOutcome::Rewarded,
                t_us: 123_456_789,
                cue_to_crossing_s: Some(0.85),
                reward_ul: Some(4.0),
                rewards: 2,
                water_ul: 8.0,
            }),
            json!({"event": "trial", "trial": 3, "outcome": "rewarded", "t_us": 123_456_789u64,
                   "cue_to_crossing_s": 0.85, "reward_ul": 4.0, "rewards": 2, "water_ul": 8.0}),
        ),
        (
            Event::Trial(TrialEvent {
                trial: 4,
                outcome: TrialOutcome::Miss,
                t_us: 5,
                cue_to_crossing_s: None,
                reward_ul: None,
                rewards: 2,
                water_ul: 8.0,
            }),
            json!({"event": "trial", "trial": 4, "outcome": "miss", "t_us": 5,
                   "rewards": 2, "water_ul": 8.0}),
        ),
        (
            Event::Device(DeviceEvent::Lick { t_us: 10, on: true }),
            json!({"event": "device", "device": "lick", "t_us": 10, "on": true}),
        ),
        (
            Event::Device(DeviceEvent::Valve {
                t_us: 11,
                open: true,
                duration_ms: Some(40.0),
            }),
            json!({"event": "device", "device": "valve", "t_us": 11, "open": true, "duration_ms": 40.0}),
        ),
        (
            Event::Device(DeviceEvent::Valve {
                t_us: 12,
                open: false,
                duration_ms: None,
            }),
            json!({"event": "device", "device": "valve", "t_us": 12, "open": false}),
        ),
        (
            Event::Device(DeviceEvent::Tone {
                t_us: 13,
                on: true,
                freq_hz: Some(6000.0),
            }),
            json!({"event": "device", "device": "tone", "t_us": 13, "on": true, "freq_hz": 6000.0}),
        ),
        (
            Event::Device(DeviceEvent::FrameTtl {
                t_us: 14,
                frame: 99,
            }),
            json!({"event": "device", "device": "frame_ttl", "t_us": 14, "frame": 99}),
        ),
        (
            Event::Link(LinkEvent {
                state: LinkState::Lost,
                detail: Some("no heartbeat for 500 ms".into()),
            }),
            json!({"event": "link", "state": "lost", "detail": "no heartbeat for 500 ms"}),
        ),
        (
            Event::Link(LinkEvent {
                state: LinkState::Reconnecting,
                detail: None,
            }),
            json!({"event": "link", "state": "reconnecting"}),
        ),
        (
            Event::Session(SessionEvent::Started {
                mouse: "M1".into(),
                session_dir: "/d/M1/2025-01-01_000000".into(),
                started_utc: "2025-01-01T00:00:00Z".into(),
                t0_us: 1_000,
            }),
            json!({"event": "session", "state": "started", "mouse": "M1",
                   "session_dir": "/d/M1/2025-01-01_000000",
                   "started_utc": "2025-01-01T00:00:00Z", "t0_us": 1000}),
        ),
        (
            Event::Session(SessionEvent::Stopped {
                mouse: "M1".into(),
                reason: Some("max_rewards reached".into()),
                summary: summary.clone(),
            }),
            json!({"event": "session", "state": "stopped", "mouse": "M1",
                   "reason": "max_rewards reached",
                   "summary": serde_json::to_value(&summary).expect("summary")}),
        ),
        (
            Event::Lagged { dropped: 17 },
            json!({"event": "lagged", "dropped": 17}),
        ),
    ]
}

#[test]
fn every_event_has_its_shape_and_round_trips() {
    for (event, shape) in every_event() {
        let line = event.to_line();
        let value = value_of_line(&line);
        assert_eq!(value, shape);
        assert!(value.get("ok").is_none(), "events have no ok key");
        assert_eq!(
            serde_json::from_value::<Event>(value).expect("decode"),
            event
        );
        match parse_server_line(&line) {
            Ok(ServerMessage::Event(parsed)) => assert_eq!(parsed, event),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn server_lines_are_told_apart_by_ok_and_event() {
    assert!(matches!(
        parse_server_line(br#"{"event":"weather","sunny":true}"#),
        Ok(ServerMessage::UnknownEvent { ref event, .. }) if event == "weather"
    ));
    // A response that happens to carry an `event` field is still a response.
    assert!(matches!(
        parse_server_line(br#"{"ok":true,"id":null,"event":"x"}"#),
        Ok(ServerMessage::Response(_))
    ));
    for bad in [
        &b"nope"[..],
        b"[]",
        b"{}",
        br#"{"event":5}"#,
        br#"{"ok":"yes"}"#,
    ] {
        assert!(
            parse_server_line(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn encode_line_escapes_newlines_inside_strings() {
    let line = encode_line(&json!({"notes": "a\nb\r\n\u{2028}"})).expect("encodes");
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(value_of_line(&line)["notes"], json!("a\nb\r\n\u{2028}"));
    let mut bad = std::collections::BTreeMap::new();
    bad.insert(vec![1u8], 1);
    assert!(encode_line(&bad).is_err(), "non-string keys cannot be JSON");
}

// ---- line splitting -----------------------------------------------------------

fn drain(splitter: &mut LineSplitter) -> Vec<SplitLine> {
    std::iter::from_fn(|| splitter.next_line()).collect()
}

fn line(s: &str) -> SplitLine {
    SplitLine::Line(s.as_bytes().to_vec())
}

#[test]
fn lines_split_across_chunk_boundaries() {
    let input = b"{\"cmd\":\"status\"}\n{\"cmd\":\"stop\"}\r\n\n{\"cmd\":\"sub";
    let mut whole = LineSplitter::new();
    whole.push(input);
    let expected = vec![
        line(r#"{"cmd":"status"}"#),
        line("{\"cmd\":\"stop\"}\r"),
        line(""),
    ];
    assert_eq!(drain(&mut whole), expected);
    assert_eq!(whole.buffered(), br#"{"cmd":"sub"#.len());

    // Byte by byte gives the same lines.
    let mut bytewise = LineSplitter::new();
    let mut got = Vec::new();
    for b in input {
        bytewise.push(std::slice::from_ref(b));
        got.extend(drain(&mut bytewise));
    }
    assert_eq!(got, expected);
    bytewise.push(b"scribe\"}\n");
    assert_eq!(drain(&mut bytewise), vec![line(r#"{"cmd":"subscribe"}"#)]);
    assert_eq!(bytewise.finish(), None);
}

#[test]
fn finish_returns_an_unterminated_last_line() {
    let mut s = LineSplitter::new();
    s.push(b"a\nlast");
    assert_eq!(drain(&mut s), vec![line("a")]);
    assert_eq!(s.finish(), Some(line("last")));
    assert_eq!(s.finish(), None);
}

#[test]
fn line_of_exactly_the_limit_passes_and_one_more_byte_is_too_long() {
    let mut s = LineSplitter::with_limit(8);
    s.push(b"12345678\n123456789\nok\n");
    assert_eq!(
        drain(&mut s),
        vec![line("12345678"), SplitLine::TooLong, line("ok")]
    );
}

#[test]
fn over_long_line_in_pieces_is_reported_once_and_discarded() {
    let mut s = LineSplitter::with_limit(16);
    let mut got = Vec::new();
    for _ in 0..100 {
        s.push(b"xxxxxxx");
        got.extend(drain(&mut s));
        assert!(s.buffered() <= 16 + 7, "memory stays bounded");
    }
    s.push(b"xx\n{\"cmd\":\"status\"}\n");
    got.extend(drain(&mut s));
    assert_eq!(got, vec![SplitLine::TooLong, line(r#"{"cmd":"status"}"#)]);
    // Ending the stream inside a discarded line yields nothing more.
    s.push(&[b'y'; 40]);
    assert_eq!(drain(&mut s), vec![SplitLine::TooLong]);
    assert_eq!(s.finish(), None);
}

#[test]
fn protocol_limit_is_max_line_bytes() {
    let mut s = LineSplitter::new();
    let mut big = vec![b'a'; MAX_LINE_BYTES];
    s.push(&big);
    assert_eq!(s.next_line(), None);
    s.push(b"\n");
    assert_eq!(s.next_line(), Some(SplitLine::Line(big.clone())));
    big.push(b'a');
    s.push(&big);
    assert_eq!(s.next_line(), Some(SplitLine::TooLong));
    s.push(b"tail of the long line\n{}\n");
    assert_eq!(drain(&mut s), vec![line("{}")]);
}

// ---- properties -----------------------------------------------------------------

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_request_line(&bytes);
        let _ = parse_server_line(&bytes);
    }

    #[test]
    fn json_ish_input_never_panics_and_errors_have_codes(
        s in r#"\{("(cmd|id|mouse|pulse_ms|flush_ms|test|task|reason|notes)":("[a-z./ ]{0,6}"|-?[0-9]{1,3}(\.[0-9])?|true|null|\{\}|\[\]),?){0,5}\}"#
    ) {
        match parse_request_line(s.as_bytes()) {
            Ok(envelope) => {
                // Whatever parses re-encodes to something that parses the same.
                let again = parse_request_line(&envelope.to_line()).expect("re-parse");
                prop_assert_eq!(again, envelope);
            }
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    #[test]
    fn splitter_never_panics_and_bounds_memory(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32),
        limit in 0usize..32,
    ) {
        let mut s = LineSplitter::with_limit(limit);
        for chunk in &chunks {
            s.push(chunk);
            while let Some(item) = s.next_line() {
                if let SplitLine::Line(l) = item {
                    prop_assert!(l.len() <= limit);
                    prop_assert!(!l.contains(&b'\n'));
                }
            }
            prop_assert!(s.buffered() <= limit + chunk.len());
        }
        let _ = s.finish();
    }

    #[test]
    fn splitting_does_not_depend_on_chunking(
        lines in proptest::collection::vec("[a-z{}\":, ]{0,20}", 0..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut input = Vec::new();
        for l in &lines {
            input.extend_from_slice(l.as_bytes());
            input.push(b'\n');
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        let mut s = LineSplitter::with_limit(12);
        let mut got = Vec::new();
        for pair in points.windows(2) {
            s.push(&input[pair[0]..pair[1]]);
            got.extend(std::iter::from_fn(|| s.next_line()));
        }
        prop_assert_eq!(s.finish(), None);
        let expected: Vec<SplitLine> = lines
            .iter()
            .map(|l| if l.len() > 12 { SplitLine::TooLong } else { SplitLine::Line(l.as_bytes().to_vec()) })
            .collect();
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn a_trial_event_from_an_older_daemon_still_reads() {
    let old = r#"{"event":"trial","trial":1,"outcome":"rewarded","t_us":5,"reaction_time_s":0.62,"reward_ul":4.0,"rewards":1,"water_ul":4.0}"#;
    let e: Event = serde_json::from_str(old).expect("old trial event");
    match e {
        Event::Trial(t) => assert_eq!(t.cue_to_crossing_s, Some(0.62)),
        other => panic!("{other:?}"),
    }
}
