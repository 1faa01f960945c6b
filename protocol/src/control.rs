//! Control-socket messages: newline-delimited JSON between `rigctl` (or any
//! client) and `rigd` over a Unix domain socket.
//!
//! One JSON object per line, at most [`MAX_LINE_BYTES`] bytes before the
//! newline. A client sends [`Request`]s (wrapped in a [`RequestEnvelope`] that
//! carries an optional client-chosen `id`); the daemon answers every request
//! line with exactly one [`Response`] line, in order, and after a `subscribe`
//! also streams [`Event`] lines. A line with an `"ok"` key is a response; a
//! line with an `"event"` key and no `"ok"` is an event.
//!
//! This module only maps bytes to values: [`parse_request_line`] classifies
//! every malformed request into an [`ErrorCode`] (recovering the `id` when it
//! can), [`LineSplitter`] cuts a byte stream into lines and enforces the length
//! limit, and [`encode_line`] writes a value as one line. The socket itself
//! lives in the daemon. The message-level specification is
//! `docs/protocol.md`, section 3.
//!
//! ```
//! use protocol::control::{parse_request_line, Request, Response, StatusReply, SessionState};
//!
//! let envelope = parse_request_line(br#"{"cmd":"status","id":7}"#).unwrap();
//! assert!(matches!(envelope.request, Request::Status {}));
//! let reply = StatusReply { state: SessionState::Idle, ..Default::default() };
//! let line = Response::ok(envelope.id, &reply).to_line();
//! assert_eq!(line, b"{\"ok\":true,\"id\":7,\"state\":\"idle\"}\n");
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Longest accepted line, in bytes, not counting the newline.
pub const MAX_LINE_BYTES: usize = 65536;

/// Longest accepted mouse id, in characters.
pub const MAX_MOUSE_ID_LEN: usize = 64;

/// Keys of a response object that payloads may not use.
const RESERVED_RESPONSE_KEYS: [&str; 3] = ["ok", "id", "error"];

// ---- requests -------------------------------------------------------------

/// The client-chosen request id, echoed in the response: a non-negative
/// integer (up to 2^64 - 1) or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(u64),
    Text(String),
}

impl RequestId {
    /// The id a JSON value denotes, if it is a valid id.
    pub fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_u64().map(Self::Number),
            Value::String(s) => Some(Self::Text(s.clone())),
            _ => None,
        }
    }
}

impl From<u64> for RequestId {
    fn from(n: u64) -> Self {
        Self::Number(n)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// A command to the daemon. On the wire, the `cmd` key names the variant in
/// snake_case and the variant's fields sit beside it:
/// `{"cmd":"start","mouse":"M12"}`. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a session.
    Start(StartRequest),
    /// Stop the running session.
    Stop(StopRequest),
    /// Report the daemon's state.
    Status {},
    /// Stream events on this connection after the response.
    Subscribe {},
    /// Open the water valve outside the task.
    Valve(ValveRequest),
    /// Play the cue tone.
    Tone(ToneRequest),
}

impl Request {
    /// Every `cmd` this version understands.
    pub const COMMANDS: [&'static str; 6] =
        ["start", "stop", "status", "subscribe", "valve", "tone"];

    /// The `cmd` string of this request.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start(_) => "start",
            Self::Stop(_) => "stop",
            Self::Status {} => "status",
            Self::Subscribe {} => "subscribe",
            Self::Valve(_) => "valve",
            Self::Tone(_) => "tone",
        }
    }

    /// The checks the types cannot express: a valid mouse id for `start`
    /// ([`ErrorCode::InvalidMouse`]), exactly one positive duration for
    /// `valve` ([`ErrorCode::BadRequest`]).
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Start(start) => {
                validate_mouse_id(&start.mouse)
                    .map_err(|e| ControlError::new(ErrorCode::InvalidMouse, e.to_string()))?;
                start
                    .check_training_fields()
                    .map_err(|e| ControlError::new(ErrorCode::BadRequest, e))
            }
            Self::Valve(valve) => valve
                .action()
                .map(|_| ())
                .map_err(|e| ControlError::new(ErrorCode::BadRequest, e.to_string())),
            Self::Stop(_) | Self::Status {} | Self::Subscribe {} | Self::Tone(_) => Ok(()),
        }
    }
}

/// `start`: begin a session for `mouse`, optionally overriding task
/// parameters of the rig configuration for this session only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Mouse id: see [`validate_mouse_id`].
    pub mouse: String,
    /// Free text stored in the session metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Task parameters for this session; absent fields keep the configured
    /// value. The daemon validates the merged task like the config file.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "task_object"
    )]
    pub task: Option<TaskOverrides>,
    /// Run this stage of the training protocol instead of the one the rules
    /// choose (needs `stage_reason`; recorded with `operator`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Why `stage` overrides the rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_reason: Option<String>,
    /// Who starts the session (recorded with a stage override).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The mouse's weight before the session, g.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_g: Option<f64>,
    /// Start even if the field-of-view check finds the image beyond its
    /// limits (recorded in session.toml's `[fov_check]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_fov: bool,
}

impl StartRequest {
    /// `stage` needs a reason; `weight_g` is a weight.
    pub fn check_training_fields(&self) -> Result<(), String> {
        if let Some(stage) = &self.stage {
            let reason = self.stage_reason.as_deref().unwrap_or("");
            if reason.trim().is_empty() {
                return Err(format!(
                    "stage = {stage:?} overrides the protocol's rules: give stage_reason (why), \
                     e.g. rigctl start --stage {stage} --stage-reason \"back to shaping after a \
                     week off\""
                ));
            }
        }
        if let Some(w) = self.weight_g {
            if !(w.is_finite() && (5.0..=80.0).contains(&w)) {
                return Err(format!(
                    "weight_g = {w}: must be the mouse's weight in grams, 5..=80"
                ));
            }
        }
        Ok(())
    }
}

/// `task` must be a JSON object (or null): serde would otherwise also accept
/// an array and fill the fields by position.
fn task_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TaskOverrides>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(value @ Value::Object(_)) => serde_json::from_value(value)
            .map(Some)
            .map_err(serde::de::Error::custom),
        Some(other) => Err(serde::de::Error::custom(format!(
            "task = {}: expected an object of task parameters",
            brief(&other)
        ))),
    }
}

/// Per-session overrides of the `[task]` section of the rig configuration.
/// Units as in the configuration; unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_window_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_mm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_ul: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iti_min_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iti_max_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiescence_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_trials: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rewards: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sated_after_min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_min: Option<u32>,
}

/// `stop`: end the running session.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Why, recorded in the session metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `valve`: open the water valve outside the task, either one pulse
/// (`pulse_ms`, e.g. to check a drop or calibrate) or a flush of the line
/// (`flush_ms`). Exactly one of the two, > 0. The daemon applies its safety
/// limits (maximum open time, caps) and may answer `refused_by_safety`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_ms: Option<f64>,
    /// The pulse is part of a valve calibration (`rigctl calibrate valve`):
    /// its water goes into a cup, not to a mouse. The daemon logs it as such
    /// and counts it in `rigd_calibration_pulses_total`. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub calibration: bool,
}

/// What a valid [`ValveRequest`] asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValveAction {
    Pulse { duration_ms: f64 },
    Flush { duration_ms: f64 },
}

/// Why a [`ValveRequest`] asks for nothing valid.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InvalidValveRequest {
    /// The one duration given is not a number > 0.
    #[error("valve: {field} = {value_ms}: expected a duration > 0")]
    NotPositive {
        /// `pulse_ms` or `flush_ms`.
        field: &'static str,
        /// The duration as given, ms.
        value_ms: f64,
    },
    /// Both `pulse_ms` and `flush_ms`.
    #[error("valve: both pulse_ms and flush_ms given: expected exactly one")]
    Both,
    /// Neither `pulse_ms` nor `flush_ms`.
    #[error("valve: neither pulse_ms nor flush_ms given: expected exactly one")]
    Neither,
}

impl ValveRequest {
    /// The requested action, or what is wrong with the request.
    pub fn action(&self) -> Result<ValveAction, InvalidValveRequest> {
        let positive = |field: &'static str, ms: f64| {
            if ms.is_finite() && ms > 0.0 {
                Ok(ms)
            } else {
                Err(InvalidValveRequest::NotPositive {
                    field,
                    value_ms: ms,
                })
            }
        };
        match (self.pulse_ms, self.flush_ms) {
            (Some(ms), None) => {
                positive("pulse_ms", ms).map(|duration_ms| ValveAction::Pulse { duration_ms })
            }
            (None, Some(ms)) => {
                positive("flush_ms", ms).map(|duration_ms| ValveAction::Flush { duration_ms })
            }
            (Some(_), Some(_)) => Err(InvalidValveRequest::Both),
            (None, None) => Err(InvalidValveRequest::Neither),
        }
    }
}

/// `tone`: `{"cmd":"tone","test":true}` plays the configured cue tone once
/// (a speaker check outside the task).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToneRequest {
    pub test: bool,
}

/// A request line: the optional `id` and the command. Serializes as one flat
/// object, `{"id":1,"cmd":"status"}` (no `id` key when there is none).
///
/// Deserializing goes through [`parse_request_value`] (serde's `flatten`
/// cannot be combined with `deny_unknown_fields`, so the `id` is taken out of
/// the object by hand before the [`Request`] is decoded).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEnvelope {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    #[serde(flatten)]
    pub request: Request,
}

impl RequestEnvelope {
    /// A request with an id.
    pub fn new(id: impl Into<RequestId>, request: Request) -> Self {
        Self {
            id: Some(id.into()),
            request,
        }
    }

    /// The request as one line (newline included).
    pub fn to_line(&self) -> Vec<u8> {
        encode_line(self).unwrap_or_else(|_| b"{}\n".to_vec())
    }
}

impl<'de> Deserialize<'de> for RequestEnvelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        parse_request_value(value).map_err(serde::de::Error::custom)
    }
}

/// Parse one request line (without its newline; surrounding whitespace and a
/// trailing `\r` are fine) and classify what is wrong with it:
///
/// | problem | code |
/// |---|---|
/// | longer than [`MAX_LINE_BYTES`] | `line_too_long` |
/// | not UTF-8, not JSON, empty | `bad_json` |
/// | JSON but not an object; `cmd` missing or not a string; bad `id` | `bad_request` |
/// | `cmd` not one of [`Request::COMMANDS`] | `unknown_command` |
/// | missing, unknown or mistyped fields; bad `valve` durations | `bad_request` |
/// | `start` with an invalid mouse id | `invalid_mouse` |
///
/// When the line is a JSON object with a valid `id`, the error carries it.
pub fn parse_request_line(line: &[u8]) -> Result<RequestEnvelope, ControlError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ControlError::line_too_long());
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        ControlError::new(
            ErrorCode::BadJson,
            format!(
                "request is not valid UTF-8 (bad byte at offset {}): expected a JSON object",
                e.valid_up_to()
            ),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ControlError::new(
            ErrorCode::BadJson,
            "empty request line: expected a JSON object such as {\"cmd\":\"status\"}",
        ));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ControlError::new(
            ErrorCode::BadJson,
            format!("request is not valid JSON: {e}"),
        )
    })?;
    parse_request_value(value)
}

/// The part of [`parse_request_line`] after JSON parsing.
pub fn parse_request_value(value: Value) -> Result<RequestEnvelope, ControlError> {
    let mut map = match value {
        Value::Object(map) => map,
        other => {
            return Err(ControlError::new(
                ErrorCode::BadRequest,
                format!(
                    "request is {}: expected a JSON object such as {{\"cmd\":\"status\"}}",
                    json_kind(&other)
                ),
            ))
        }
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(v) => match RequestId::from_value(&v) {
            Some(id) => Some(id),
            None => {
                return Err(ControlError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "id = {}: expected a non-negative integer or a string",
                        brief(&v)
                    ),
                ))
            }
        },
    };
    let with_id = |e: ControlError| e.with_id(id.clone());
    let cmd = match map.get("cmd") {
        Some(Value::String(cmd)) => cmd.clone(),
        Some(other) => {
            return Err(with_id(ControlError::new(
                ErrorCode::BadRequest,
                format!("cmd = {}: expected a command name string", brief(other)),
            )))
        }
        None => {
            return Err(with_id(ControlError::new(
                ErrorCode::BadRequest,
                "missing field `cmd`: expected the command name, e.g. {\"cmd\":\"status\"}",
            )))
        }
    };
    if !Request::COMMANDS.contains(&cmd.as_str()) {
        return Err(with_id(ControlError::new(
            ErrorCode::UnknownCommand,
            format!(
                "cmd = {}: unknown command; expected one of {}",
                brief(&Value::String(cmd)),
                Request::COMMANDS.join(", ")
            ),
        )));
    }
    let request: Request = serde_json::from_value(Value::Object(map)).map_err(|e| {
        with_id(ControlError::new(
            ErrorCode::BadRequest,
            format!("{cmd}: {e}"),
        ))
    })?;
    request.validate().map_err(with_id)?;
    Ok(RequestEnvelope { id, request })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value for an error message, cut to a readable length.
fn brief(value: &Value) -> String {
    const MAX: usize = 64;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

// ---- mouse ids ----------------------------------------------------------------

/// A mouse id that cannot be used (it names a folder in the data root).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "mouse = {shown}: expected 1 to {MAX_MOUSE_ID_LEN} characters, each A-Z, a-z, 0-9, '_' \
     or '-' (the id names the mouse's data folder)"
)]
pub struct InvalidMouseId {
    /// The id as given, quoted and escaped, cut to a readable length.
    pub shown: String,
}

/// Check a mouse id: `[A-Za-z0-9_-]{1,64}`. So `../x`, an empty id, slashes,
/// spaces and non-ASCII letters are refused.
pub fn validate_mouse_id(id: &str) -> Result<(), InvalidMouseId> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.len() <= MAX_MOUSE_ID_LEN && id.chars().all(ok_char) {
        Ok(())
    } else {
        Err(InvalidMouseId {
            shown: brief(&Value::String(id.to_owned())),
        })
    }
}

// ---- responses ---------------------------------------------------------------

/// Machine-readable error codes, snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not UTF-8 JSON.
    BadJson,
    /// Valid JSON, but not a valid request (shape, fields, types, values).
    BadRequest,
    /// `cmd` names no command this daemon knows.
    UnknownCommand,
    /// The line exceeded [`MAX_LINE_BYTES`]; the rest of it was discarded.
    LineTooLong,
    /// `start` while a session runs.
    AlreadyRunning,
    /// `stop` (or a session-only command) while no session runs.
    NotRunning,
    /// The mouse id is malformed or not allowed on this rig.
    InvalidMouse,
    /// The device (serial link, valve, speaker) is not available.
    DeviceUnavailable,
    /// A safety limit refused the command (valve time, water caps).
    RefusedBySafety,
    /// The daemon cannot do this now (e.g. a session is stopping).
    Busy,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// A code this version does not know (sent by a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadRequest => "bad_request",
            Self::UnknownCommand => "unknown_command",
            Self::LineTooLong => "line_too_long",
            Self::AlreadyRunning => "already_running",
            Self::NotRunning => "not_running",
            Self::InvalidMouse => "invalid_mouse",
            Self::DeviceUnavailable => "device_unavailable",
            Self::RefusedBySafety => "refused_by_safety",
            Self::Busy => "busy",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that failed: the code, a message for a person, and the request
/// id if it could be recovered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<RequestId>,
}

impl ControlError {
    /// An error without an id.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
        }
    }

    /// The same error for the request with `id`.
    pub fn with_id(mut self, id: Option<RequestId>) -> Self {
        self.id = id;
        self
    }

    /// The error for a line longer than [`MAX_LINE_BYTES`].
    pub fn line_too_long() -> Self {
        Self::new(
            ErrorCode::LineTooLong,
            format!(
                "request line is longer than {MAX_LINE_BYTES} bytes: the rest of the line was \
                 discarded; expected one JSON object per line"
            ),
        )
    }

    /// The error response for this error.
    pub fn to_response(&self) -> Response {
        Response::error(self.id.clone(), self.code, self.message.clone())
    }
}

/// The `error` object of a failure response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// One response line. Success: `{"ok":true,"id":…,<payload fields>}`;
/// failure: `{"ok":false,"id":…,"error":{"code":…,"message":…}}`. `id` is
/// always present (`null` when the request had none or it was unreadable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub id: Option<RequestId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// The command-specific fields of a success (never `ok`, `id` or
    /// `error`).
    #[serde(flatten)]
    pub body: Map<String, Value>,
}

impl Response {
    /// A success whose fields are those of `payload` (a struct or map; `()`
    /// gives no fields). A payload that does not serialize to an object gives
    /// an `internal` error response instead.
    pub fn ok<T: Serialize + ?Sized>(id: Option<RequestId>, payload: &T) -> Self {
        match serde_json::to_value(payload) {
            Ok(Value::Object(mut body)) => {
                for key in RESERVED_RESPONSE_KEYS {
                    debug_assert!(!body.contains_key(key), "payload uses reserved key {key}");
                    body.remove(key);
                }
                Self {
                    ok: true,
                    id,
                    error: None,
                    body,
                }
            }
            Ok(Value::Null) => Self::ok_empty(id),
            Ok(other) => Self::error(
                id,
                ErrorCode::Internal,
                format!("reply payload is {}, expected an object", json_kind(&other)),
            ),
            Err(e) => Self::error(
                id,
                ErrorCode::Internal,
                format!("reply could not be encoded: {e}"),
            ),
        }
    }

    /// A success with no fields: `{"ok":true,"id":…}`.
    pub fn ok_empty(id: Option<RequestId>) -> Self {
        Self {
            ok: true,
            id,
            error: None,
            body: Map::new(),
        }
    }

    /// A failure.
    pub fn error(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            id,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
            body: Map::new(),
        }
    }

    /// Decode the success fields as a typed payload (e.g. [`StatusReply`]).
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(Value::Object(self.body.clone()))
    }

    /// The response as one line (newline included).
    pub fn to_line(&self) -> Vec<u8> {
        encode_line(self).unwrap_or_else(|e| {
            // Unreachable for this type (string keys, no failing Serialize
            // impls); keep the one-response-per-request promise anyway.
            let fallback = Self::error(
                None,
                ErrorCode::Internal,
                format!("response could not be encoded: {e}"),
            );
            encode_line(&fallback).unwrap_or_default()
        })
    }
}

impl From<ControlError> for Response {
    fn from(e: ControlError) -> Self {
        e.to_response()
    }
}

/// What the daemon is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    #[default]
    Idle,
    Running,
    Stopping,
}

/// The state of the serial link to the microcontroller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Connected,
    Lost,
    Reconnecting,
}

/// Payload of the `status` response. Every field but `state` is optional
/// and omitted when absent, so fields can be added without breaking clients.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StatusReply {
    pub state: SessionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mouse: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_dir: Option<String>,
    /// Session start, UTC, RFC 3339 (`2025-03-14T09:26:53Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_utc: Option<String>,
    /// Seconds since the session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trials: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub water_ul: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkState>,
    /// Imaging frames received this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u64>,
    /// Imaging frames lost this session (ring overruns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<u64>,
    /// A start waiting for its field-of-view check: its mouse (the state
    /// is `idle` until the session starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checking_fov: Option<String>,
}

/// Payload of the `start` response.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StartReply {
    pub session_dir: String,
    pub mouse: String,
    /// UTC, RFC 3339.
    pub started_utc: String,
    /// The mouse's training day (1 = its first lab-local day with a session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_day: Option<u32>,
    /// The training protocol's stage this session runs, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_why: Option<String>,
    /// What the experimenter should know (a weight below the welfare
    /// threshold, a field of view beyond its limits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The field-of-view check against the imaging reference, if one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fov_check: Option<FovSummary>,
}

/// The field-of-view check of a start: the first frames' mean image
/// registered against the imaging reference.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FovSummary {
    /// `"pass"`, `"warned"` (beyond a limit, started under `on_fail =
    /// "warn"`), `"accepted"` (beyond a limit, started with `accept_fov`)
    /// or `"not_checked"` (the check could not be made).
    pub verdict: String,
    /// Where the reference came from: `"mouse"` or `"rig"`.
    pub reference: String,
    /// Shift of the image content from the reference, px (x right, y down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dx_px: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dy_px: Option<f64>,
    /// The shift's length in µm, when the pixel size is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_um: Option<f64>,
    /// Rotation, degrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_deg: Option<f64>,
    /// Pearson's r with the reference, shift and rotation undone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<f64>,
    /// What was beyond the limits, or why no check could be made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Payload of the `stop` response.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StopReply {
    pub summary: SessionSummary,
}

/// The numbers of a finished session. Statistics that are undefined (no
/// trials, no rewarded trials) are `null`, never omitted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionSummary {
    pub session_dir: String,
    pub trials: u64,
    pub rewards: u64,
    pub water_ul: f64,
    /// rewards / trials.
    pub success_rate: Option<f64>,
    /// Median cue-to-threshold time of rewarded trials, seconds.
    pub reaction_time_median_s: Option<f64>,
    /// Median correlation of rewarded lever trajectories.
    pub trajectory_corr_median: Option<f64>,
    /// Why the session ended (`max_trials`, `water_cap`, `sated`, `stopped
    /// by ...`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Water the mouse had today including this session, µL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub water_today_ul: Option<f64>,
    /// Water still to give by hand to reach the daily target, µL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplement_ul: Option<f64>,
    /// The session's quality record, as in `summary.json`'s `qc`
    /// (docs/session-format.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qc: Option<Value>,
}

// ---- events --------------------------------------------------------------------

/// A line streamed to a subscribed client. On the wire the `event` key names
/// the variant: `{"event":"trial",…}`. Times `t_us` are rig-clock
/// microseconds (the device's counter, unwrapped to 64 bits); a
/// `session`/`started` event carries the session's `t0_us`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Trial(TrialEvent),
    Device(DeviceEvent),
    Link(LinkEvent),
    Session(SessionEvent),
    /// A command given by hand outside the task (`valve`, `tone`), once the
    /// device took it.
    Manual(ManualEvent),
    /// The client read too slowly and `dropped` events were not sent to it.
    Lagged {
        dropped: u64,
    },
}

impl Event {
    /// The event as one line (newline included).
    pub fn to_line(&self) -> Vec<u8> {
        // Cannot fail for this type; if it somehow did, nothing is sent.
        encode_line(self).unwrap_or_default()
    }
}

/// A command given by hand: `{"event":"manual","action":"valve_pulse",
/// "duration_ms":40.0,"calibration":true,"by":"uid 1000 (pid 4242)"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualEvent {
    /// `valve_pulse`, `valve_flush` or `tone_test`.
    pub action: String,
    /// The valve's open time, ms (valve actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// Part of a valve calibration: the water went into a cup, for no mouse.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub calibration: bool,
    /// Who asked (the control client's credentials).
    pub by: String,
}

/// A trial ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialEvent {
    /// 1-based trial number within the session.
    pub trial: u64,
    pub outcome: TrialOutcome,
    /// Rig clock when the outcome was decided.
    pub t_us: u64,
    /// Cue onset to the threshold crossing, seconds (rewarded trials only).
    /// Not the summary's reaction time, which ends at the movement's onset
    /// (docs/behaviour.md); the old name `reaction_time_s` is still read.
    #[serde(
        default,
        alias = "reaction_time_s",
        skip_serializing_if = "Option::is_none"
    )]
    pub cue_to_crossing_s: Option<f64>,
    /// Water given for this trial, µL (rewarded trials only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_ul: Option<f64>,
    /// Rewards so far in the session.
    pub rewards: u64,
    /// Water so far in the session, µL.
    pub water_ul: f64,
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialOutcome {
    /// Press past threshold within the response window: rewarded.
    Rewarded,
    /// No press within the response window.
    Miss,
    /// The session stopped during the trial.
    Aborted,
}

/// Something the device reported or did; `device` names it:
/// `{"event":"device","device":"lick","t_us":…,"on":true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "device", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// Lick sensor touched (`on`) or released.
    Lick { t_us: u64, on: bool },
    /// Valve opened or closed; an opening carries its commanded duration.
    Valve {
        t_us: u64,
        open: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<f64>,
    },
    /// Tone started or stopped.
    Tone {
        t_us: u64,
        on: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        freq_hz: Option<f64>,
    },
    /// The microscope's frame clock ticked; `frame` counts TTL edges in the
    /// session.
    FrameTtl { t_us: u64, frame: u64 },
}

/// The serial link changed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkEvent {
    pub state: LinkState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A session started or stopped; `state` names which:
/// `{"event":"session","state":"started",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SessionEvent {
    Started {
        mouse: String,
        session_dir: String,
        started_utc: String,
        /// Rig clock at session start (session time 0).
        t0_us: u64,
    },
    Stopped {
        mouse: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        summary: SessionSummary,
    },
}

/// A line from the daemon, as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The line has an `ok` key.
    Response(Response),
    /// The line has an `event` key (and no `ok`) of a kind this version
    /// knows.
    Event(Event),
    /// An event this version cannot decode (a newer daemon): skip it.
    UnknownEvent { event: String, line: Value },
}

/// Why a server line could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("daemon sent an unreadable line: {0}")]
pub struct ServerLineError(pub String);

/// Classify a line from the daemon (client side): a line with `ok` is a
/// response, a line with `event` and no `ok` an event.
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, ServerLineError> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| ServerLineError(format!("not JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ServerLineError(format!(
            "{}, expected an object",
            json_kind(&value)
        )));
    };
    if map.contains_key("ok") {
        return serde_json::from_value(value)
            .map(ServerMessage::Response)
            .map_err(|e| ServerLineError(format!("bad response: {e}")));
    }
    let event = match map.get("event") {
        Some(Value::String(event)) => event.clone(),
        _ => {
            return Err(ServerLineError(
                "neither `ok` nor an `event` string".to_owned(),
            ))
        }
    };
    match serde_json::from_value::<Event>(value.clone()) {
        Ok(decoded) => Ok(ServerMessage::Event(decoded)),
        Err(_) => Ok(ServerMessage::UnknownEvent { event, line: value }),
    }
}

// ---- lines -----------------------------------------------------------------------

/// Serialize `value` as one line of compact JSON with a trailing newline.
/// serde_json escapes control characters inside strings, so the only newline
/// is the last byte. Fails only for values JSON cannot represent (maps with
/// non-string keys) or failing `Serialize` impls.
pub fn encode_line<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    Ok(line)
}

/// What [`LineSplitter::next_line`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitLine {
    /// A complete line, without its `\n`.
    Line(Vec<u8>),
    /// A line exceeded the limit. Reported once per over-long line; its bytes
    /// up to and including the next `\n` are discarded.
    TooLong,
}

/// Cuts a byte stream into `\n`-terminated lines without doing I/O: feed it
/// whatever a read returned with [`push`](Self::push), then take lines with
/// [`next_line`](Self::next_line) until it returns `None`. It holds at most
/// the limit plus one pushed chunk, however long a line the peer sends.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for `\n`.
    scanned: usize,
    /// Dropping bytes until the next `\n` (after a `TooLong`).
    discarding: bool,
    max_line: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl LineSplitter {
    /// A splitter with the protocol's limit, [`MAX_LINE_BYTES`].
    pub fn new() -> Self {
        Self::with_limit(MAX_LINE_BYTES)
    }

    /// A splitter that reports lines longer than `max_line` bytes.
    pub fn with_limit(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            discarding: false,
            max_line,
        }
    }

    /// Append bytes read from the stream.
    pub fn push(&mut self, mut chunk: &[u8]) {
        if self.discarding {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.discarding = false;
                    chunk = &chunk[i + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line or over-long-line report, or `None` when more
    /// bytes are needed.
    pub fn next_line(&mut self) -> Option<SplitLine> {
        if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + i;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop(); // the '\n'
            self.scanned = 0;
            if line.len() > self.max_line {
                return Some(SplitLine::TooLong);
            }
            return Some(SplitLine::Line(line));
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_line {
            // No newline yet and already too long: report now, drop what we
            // have and the rest of the line as it arrives.
            self.buf.clear();
            self.scanned = 0;
            // (The buffer holds no '\n', so all of it belongs to this line.)
            self.discarding = true;
            return Some(SplitLine::TooLong);
        }
        None
    }

    /// At end of stream: the unterminated last line, if any (`None` if the
    /// stream ended on a `\n` or inside a discarded over-long line). Call
    /// after `next_line` has returned `None`.
    pub fn finish(&mut self) -> Option<SplitLine> {
        self.scanned = 0;
        if self.discarding {
            self.discarding = false;
            self.buf.clear();
            return None;
        }
        if self.buf.is_empty() {
            return None;
        }
        let line = std::mem::take(&mut self.buf);
        if line.len() > self.max_line {
            Some(SplitLine::TooLong)
        } else {
            Some(SplitLine::Line(line))
        }
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
