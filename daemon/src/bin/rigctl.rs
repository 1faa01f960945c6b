//! `rigctl`: the experimenter's command-line client for `rigd`.
//!
//! Exit codes: 0 done, 1 refused by the daemon, 2 cannot connect or bad usage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use protocol::control::{
    parse_server_line, DeviceEvent, Event, Request, RequestEnvelope, ServerMessage, SessionEvent,
    StartRequest, StopRequest, ToneRequest, ValveRequest,
};
use serde_json::Value;

#[path = "rigctl/calibrate.rs"]
mod calibrate;
#[path = "rigctl/rigs.rs"]
mod rigs;

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// Where the socket is when nothing else says.
const DEFAULT_SOCKET: &str = "/run/rigd/rigd.sock";

#[derive(Debug, Parser)]
#[command(name = "rigctl", version, about = "Control a running rigd")]
struct Cli {
    /// The daemon's control socket. Default: $RIGD_SOCKET, else [control].socket
    /// of --config, else /run/rigd/rigd.sock.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Rig configuration to read the socket path from.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The rig named NAME: its configuration is NAME.toml in the rigs folder
    /// (--rigs-dir), which gives the socket.
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "config")]
    rig: Option<String>,
    /// The folder of per-rig configurations. Default: $RIGD_RIGS_DIR, else
    /// /etc/rigd/rigs.
    #[arg(long, global = true, value_name = "DIR")]
    rigs_dir: Option<PathBuf>,
    /// Print the daemon's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a session for a mouse.
    Start {
        /// The mouse's id (letters, digits, `_` and `-`; at most 64): its
        /// sessions go to `<data_root>/<mouse>/`.
        #[arg(long)]
        mouse: String,
        /// Free text kept in the session's session.toml (`notes`).
        #[arg(long)]
        notes: Option<String>,
    },
    /// Stop the running session and print its summary.
    Stop {
        /// Why, kept as the session's stop_reason (default: `rigctl stop`).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show what the daemon is doing.
    Status {
        /// Every rig in the rigs folder (--rigs-dir), one line each.
        #[arg(long)]
        all: bool,
    },
    /// Calibrate the water valve (weigh the water of many openings).
    Calibrate {
        #[command(subcommand)]
        what: CalibrateCmd,
    },
    /// Follow trials and events live (Ctrl-C to quit).
    Watch,
    /// Open the water valve outside the task.
    Valve {
        #[command(subcommand)]
        action: ValveCmd,
    },
    /// Play the cue tone once (speaker check).
    Tone {
        /// Accepted for older scripts; the tone is always a test.
        #[arg(long, hide = true)]
        test: bool,
    },
    /// Repair a session folder left behind by a crash and mark it recovered.
    Recover { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum CalibrateCmd {
    /// Open the valve N times at each of several open times, ask for the
    /// weight of each cup, fit and write the rig's calibration file.
    Valve(calibrate::ValveArgs),
}

#[derive(Debug, Subcommand)]
enum ValveCmd {
    /// One pulse of the given length: `rigctl valve pulse 40` or `--ms 40`.
    Pulse {
        /// Pulse length, ms (at least 1, at most [safety].max_valve_open_ms).
        #[arg(value_name = "MS", required_unless_present = "ms_flag")]
        ms: Option<f64>,
        /// The same, as an option.
        #[arg(long = "ms", value_name = "MS", conflicts_with = "ms")]
        ms_flag: Option<f64>,
    },
    /// Flush the line for the given time: `rigctl valve flush 2000` or `--ms 2000`.
    Flush {
        /// Flush length, ms (at most [safety].max_flush_ms).
        #[arg(value_name = "MS", required_unless_present = "ms_flag")]
        ms: Option<f64>,
        /// The same, as an option.
        #[arg(long = "ms", value_name = "MS", conflicts_with = "ms")]
        ms_flag: Option<f64>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("rigctl: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("rigctl: {msg}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

enum Failure {
    /// Cannot connect, bad usage, broken answer: exit 2.
    Usage(String),
    /// The daemon said no: exit 1.
    Refused(String),
}

fn socket_path(cli: &Cli) -> Result<PathBuf, Failure> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if cli.rig.is_some() {
        let cfg = config_path(cli)?.unwrap_or_default();
        return match rig_config::load(&cfg) {
            Ok(l) => Ok(l.config.control.socket),
            Err(e) => Err(Failure::Usage(format!("{e}"))),
        };
    }
    if let Some(s) = std::env::var_os("RIGD_SOCKET") {
        return Ok(PathBuf::from(s));
    }
    if let Some(cfg) = &cli.config {
        return match rig_config::load(cfg) {
            Ok(l) => Ok(l.config.control.socket),
            Err(e) => Err(Failure::Usage(format!("{e}"))),
        };
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

/// The configuration file named by --config or --rig, if any.
fn config_path(cli: &Cli) -> Result<Option<PathBuf>, Failure> {
    if let Some(c) = &cli.config {
        return Ok(Some(c.clone()));
    }
    let Some(name) = &cli.rig else {
        return Ok(None);
    };
    rigs::config_of(&rigs::rigs_dir(cli.rigs_dir.as_deref()), name).map(Some)
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    fn connect(path: &Path) -> Result<Self, Failure> {
        let stream = UnixStream::connect(path).map_err(|e| {
            Failure::Usage(format!(
                "cannot connect to rigd at {}: {e} (is rigd running? set --socket or RIGD_SOCKET)",
                path.display()
            ))
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Failure::Usage(format!("socket: {e}")))?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Send one request and wait for its answer (events before it are skipped).
    fn call(&mut self, request: Request, timeout: Duration) -> Result<Value, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let line = RequestEnvelope::new(id, request).to_line();
        self.writer
            .write_all(&line)
            .map_err(|e| Failure::Usage(format!("cannot send to rigd: {e}")))?;
        let _ = self.reader.get_ref().set_read_timeout(Some(timeout));
        loop {
            match self.next_message()? {
                ServerMessage::Response(r) => {
                    let v = serde_json::to_value(&r)
                        .map_err(|e| Failure::Usage(format!("bad answer from rigd: {e}")))?;
                    if r.ok {
                        return Ok(v);
                    }
                    let msg = r
                        .error
                        .map(|e| format!("{}: {}", e.code, e.message))
                        .unwrap_or_else(|| "refused".into());
                    return Err(Failure::Refused(msg));
                }
                _ => continue,
            }
        }
    }

    fn next_message(&mut self) -> Result<ServerMessage, Failure> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Failure::Usage("rigd closed the connection".into())),
            Ok(_) => parse_server_line(line.as_bytes())
                .map_err(|e| Failure::Usage(format!("bad line from rigd: {}", e.0))),
            Err(e) => Err(Failure::Usage(format!("no answer from rigd: {e}"))),
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    if let Cmd::Recover { dir } = &cli.command {
        return recover(dir, cli.json);
    }
    if let Cmd::Status { all: true } = &cli.command {
        return rigs::status_all(&rigs::rigs_dir(cli.rigs_dir.as_deref()), cli.json);
    }
    if let Cmd::Calibrate {
        what: CalibrateCmd::Valve(args),
    } = &cli.command
    {
        let cfg = config_path(&cli)?;
        let socket = socket_path(&cli)?;
        return calibrate::valve(args, cfg.as_deref(), &socket, cli.json);
    }
    let path = socket_path(&cli)?;
    let mut client = Client::connect(&path)?;
    let quick = Duration::from_secs(10);
    let json = cli.json;
    let answer = match cli.command {
        Cmd::Start { mouse, notes } => {
            let v = client.call(
                Request::Start(StartRequest {
                    mouse,
                    notes,
                    task: None,
                }),
                quick,
            )?;
            if !json {
                println!(
                    "started {} at {}\n  {}",
                    v["mouse"].as_str().unwrap_or("?"),
                    v["started_utc"].as_str().unwrap_or("?"),
                    v["session_dir"].as_str().unwrap_or("?")
                );
            }
            v
        }
        Cmd::Stop { reason } => {
            // Stopping finalises files and computes the summary: allow time.
            let v = client.call(
                Request::Stop(StopRequest { reason }),
                Duration::from_secs(120),
            )?;
            if !json {
                print_summary(&v["summary"]);
            }
            v
        }
        Cmd::Status { all: _ } => {
            let v = client.call(Request::Status {}, quick)?;
            if !json {
                print_status(&v);
            }
            v
        }
        Cmd::Watch => return watch(&mut client, json),
        Cmd::Valve { action } => {
            let req = match action {
                ValveCmd::Pulse { ms, ms_flag } => ValveRequest {
                    pulse_ms: ms.or(ms_flag),
                    flush_ms: None,
                    calibration: false,
                },
                ValveCmd::Flush { ms, ms_flag } => ValveRequest {
                    pulse_ms: None,
                    flush_ms: ms.or(ms_flag),
                    calibration: false,
                },
            };
            let v = client.call(Request::Valve(req), quick)?;
            if !json {
                println!("valve: done");
            }
            v
        }
        Cmd::Tone { test: _ } => {
            let v = client.call(Request::Tone(ToneRequest { test: true }), quick)?;
            if !json {
                println!("tone: played");
            }
            v
        }
        Cmd::Recover { .. } | Cmd::Calibrate { .. } => unreachable!("handled above"),
    };
    if json {
        println!("{answer}");
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn print_summary(s: &Value) {
    println!("session  {}", s["session_dir"].as_str().unwrap_or("?"));
    println!(
        "trials   {}   rewards {}   water {} µL   success {}",
        s["trials"],
        s["rewards"],
        fmt_opt(&s["water_ul"], 1),
        s["success_rate"]
            .as_f64()
            .map_or("-".to_owned(), |x| format!("{:.0} %", x * 100.0))
    );
    println!(
        "reaction time median {} s   trajectory correlation median {}",
        fmt_opt(&s["reaction_time_median_s"], 3),
        fmt_opt(&s["trajectory_corr_median"], 2)
    );
    if let Some(reason) = s["stop_reason"].as_str() {
        println!("stopped  {reason}");
    }
    if let Some(today) = s["water_today_ul"].as_f64() {
        print!("water today {today:.1} µL");
        if let Some(sup) = s["supplement_ul"].as_f64() {
            print!("   SUPPLEMENT {sup:.1} µL by hand to reach the daily target");
        }
        println!();
    }
    if let Ok(qc) = serde_json::from_value::<session_format::Qc>(s["qc"].clone()) {
        print!("{qc}");
    }
}

pub(crate) fn print_status(v: &Value) {
    let state = v["state"].as_str().unwrap_or("?");
    print!("{state}");
    if let Some(link) = v["link"].as_str() {
        print!("   link {link}");
    }
    println!();
    if state != "idle" {
        println!(
            "mouse {}   elapsed {} s   trials {}   rewards {}   water {} µL",
            v["mouse"].as_str().unwrap_or("?"),
            fmt_opt(&v["elapsed_s"], 0),
            v["trials"],
            v["rewards"],
            fmt_opt(&v["water_ul"], 1)
        );
        if let Some(d) = v["session_dir"].as_str() {
            println!("{d}");
        }
    }
}

fn watch(client: &mut Client, json: bool) -> Result<ExitCode, Failure> {
    client.call(Request::Subscribe {}, Duration::from_secs(10))?;
    let _ = client.reader.get_ref().set_read_timeout(None);
    let mut out = std::io::stdout();
    loop {
        let msg = client.next_message()?;
        let ServerMessage::Event(ev) = msg else {
            continue;
        };
        if json {
            let _ = out.write_all(&ev.to_line());
            let _ = out.flush();
            continue;
        }
        let text = match &ev {
            Event::Trial(t) => Some(format!(
                "trial {:4}  {:8}  cue to crossing {}  rewards {}  water {:.1} µL",
                t.trial,
                serde_json::to_value(t.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                t.cue_to_crossing_s
                    .map_or("-".to_owned(), |x| format!("{x:.3} s")),
                t.rewards,
                t.water_ul
            )),
            Event::Session(SessionEvent::Started {
                mouse, session_dir, ..
            }) => Some(format!("session started: {mouse}  {session_dir}")),
            Event::Session(SessionEvent::Stopped { mouse, reason, .. }) => Some(format!(
                "session stopped: {mouse}{}",
                reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )),
            Event::Link(l) => Some(format!(
                "link {:?}{}",
                l.state,
                l.detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )),
            Event::Device(DeviceEvent::Valve {
                open: true,
                duration_ms,
                ..
            }) => Some(format!(
                "valve open {} ms",
                duration_ms.map_or("-".into(), |d| format!("{d:.1}"))
            )),
            Event::Lagged { dropped } => Some(format!("({dropped} events not shown: too slow)")),
            _ => None,
        };
        if let Some(t) = text {
            let _ = writeln!(out, "{t}");
            let _ = out.flush();
        }
    }
}

fn recover(dir: &Path, json: bool) -> Result<ExitCode, Failure> {
    // With the full behavioural summary recomputed from the files (counts
    // only if they cannot be read).
    match session_format::recover_with_summary(dir, daemon::storage_thread::summarize_folder) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Failure::Refused(format!("recover {}: {e}", dir.display()))),
    }
}
