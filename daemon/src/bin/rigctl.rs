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
    /// For mouse, history, report, water: the data root (default: the
    /// configuration's [storage].data_root).
    #[arg(long, global = true)]
    data_root: Option<PathBuf>,
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
        /// Run this stage of the training protocol instead of the one its
        /// rules choose (needs --stage-reason; recorded with --operator).
        #[arg(long, requires = "stage_reason")]
        stage: Option<String>,
        /// Why --stage overrides the rules.
        #[arg(long)]
        stage_reason: Option<String>,
        /// Who starts the session (default: $USER).
        #[arg(long)]
        operator: Option<String>,
        /// The mouse's weight today, g (checked against the welfare rule).
        #[arg(long)]
        weight_g: Option<f64>,
        /// Start even if the field of view is beyond the limits of
        /// [imaging.fov_check] (recorded in session.toml).
        #[arg(long)]
        accept_fov: bool,
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
    Recover {
        /// The session folder, `<data_root>/<mouse>/<date>_<time>`.
        dir: PathBuf,
    },
    /// Mouse records (<data_root>/<mouse>/subject.toml), on the data root.
    Mouse {
        #[command(subcommand)]
        action: MouseCmd,
    },
    /// A mouse's sessions as a table: date, day, stage, trials, success,
    /// reaction time, water, weight.
    History {
        /// The mouse's id.
        mouse: String,
    },
    /// Write a mouse's training report (one self-contained HTML file).
    Report {
        /// The mouse's id.
        mouse: String,
        /// Output file (default: <data_root>/<mouse>/report.html).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The water ledger: record water given by hand.
    Water {
        #[command(subcommand)]
        action: WaterCmd,
    },
}

#[derive(Debug, Subcommand)]
enum WaterCmd {
    /// Record water given to a mouse by hand (a supplement, or manual valve
    /// pulses given to it): it counts for the mouse's lab-local day.
    Give {
        /// The mouse's id.
        mouse: String,
        /// Volume, µL.
        #[arg(long)]
        ul: f64,
        /// `supplement` (default) or `pulse`.
        #[arg(long, default_value = "supplement")]
        kind: String,
        /// Free text kept in the ledger line.
        #[arg(long, default_value = "")]
        note: String,
        /// Who gave it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct SubjectArgs {
    /// Latin name (default for add: "Mus musculus").
    #[arg(long)]
    species: Option<String>,
    /// M, F, U (unknown) or O (other).
    #[arg(long)]
    sex: Option<String>,
    /// YYYY-MM-DD.
    #[arg(long)]
    date_of_birth: Option<String>,
    /// Strain, e.g. "C57BL/6J".
    #[arg(long)]
    strain: Option<String>,
    /// Genotype, e.g. "wild type".
    #[arg(long)]
    genotype: Option<String>,
    /// "Last, First".
    #[arg(long)]
    experimenter: Option<String>,
    /// Weight before water restriction, g.
    #[arg(long)]
    baseline_weight_g: Option<f64>,
    /// Free text.
    #[arg(long)]
    notes: Option<String>,
    /// The lab (for NWB).
    #[arg(long)]
    lab: Option<String>,
    /// The institution (for NWB).
    #[arg(long)]
    institution: Option<String>,
}

impl From<SubjectArgs> for daemon::training_cli::SubjectFields {
    fn from(a: SubjectArgs) -> Self {
        Self {
            species: a.species,
            sex: a.sex,
            date_of_birth: a.date_of_birth,
            strain: a.strain,
            genotype: a.genotype,
            experimenter: a.experimenter,
            baseline_weight_g: a.baseline_weight_g,
            notes: a.notes,
            lab: a.lab,
            institution: a.institution,
        }
    }
}

#[derive(Debug, Subcommand)]
enum ReferenceCmd {
    /// Set (or replace) the mouse's imaging reference: a session's mean
    /// image (and the ROI label image and table it used), or files.
    Set {
        /// The mouse's id.
        id: String,
        /// A session folder of the mouse: its mean_image.npy, and its
        /// roi_labels.* and roi_table.tsv if it has them.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "image",
            conflicts_with = "image"
        )]
        from_session: Option<PathBuf>,
        /// A mean image instead: float32 NPY (..., height, width).
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// The ROI label image drawn on it (NPY or TIFF; replaces the
        /// session's).
        #[arg(long, value_name = "FILE")]
        labels: Option<PathBuf>,
        /// The ROI table for the labels (TSV).
        #[arg(long, value_name = "FILE", requires = "labels")]
        table: Option<PathBuf>,
        /// Who sets it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
        /// Why (kept in the record).
        #[arg(long)]
        note: Option<String>,
    },
    /// Print the mouse's imaging reference record.
    Show {
        /// The mouse's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum MouseCmd {
    /// Add a mouse: writes <data_root>/<mouse>/subject.toml.
    Add {
        /// The mouse's id (letters, digits, `_` and `-`; at most 64).
        id: String,
        #[command(flatten)]
        fields: SubjectArgs,
    },
    /// Print a mouse's record.
    Show {
        /// The mouse's id.
        id: String,
    },
    /// Every mouse on the data root.
    List,
    /// The mouse's imaging reference (its day-1 field of view and ROIs),
    /// kept in its folder and used by every rig.
    Reference {
        #[command(subcommand)]
        action: ReferenceCmd,
    },
    /// Change fields of a mouse's record.
    Edit {
        /// The mouse's id.
        id: String,
        #[command(flatten)]
        fields: SubjectArgs,
    },
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
        /// The mouse that drank it: the pulse's water (from the valve
        /// calibration) goes into its water ledger for today.
        #[arg(long)]
        mouse: Option<String>,
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
/// What names the rig's configuration on the command line.
#[derive(Clone)]
struct ConfigOnly {
    config: Option<PathBuf>,
    rig: Option<String>,
    rigs_dir: Option<PathBuf>,
}

impl ConfigOnly {
    fn of(cli: &Cli) -> Self {
        Self {
            config: cli.config.clone(),
            rig: cli.rig.clone(),
            rigs_dir: cli.rigs_dir.clone(),
        }
    }
}

/// `--config`, else the file of `--rig NAME`, else none.
fn config_path(cli: &Cli) -> Result<Option<PathBuf>, Failure> {
    config_of(&ConfigOnly::of(cli))
}

fn config_of(c: &ConfigOnly) -> Result<Option<PathBuf>, Failure> {
    if let Some(c) = &c.config {
        return Ok(Some(c.clone()));
    }
    let Some(name) = &c.rig else {
        return Ok(None);
    };
    rigs::config_of(&rigs::rigs_dir(c.rigs_dir.as_deref()), name).map(Some)
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
    if matches!(
        cli.command,
        Cmd::Mouse { .. } | Cmd::History { .. } | Cmd::Report { .. } | Cmd::Water { .. }
    ) {
        return training_command(cli);
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
    let cli_data_root = cli.data_root.clone();
    let cli_config = ConfigOnly::of(&cli);
    let answer = match cli.command {
        Cmd::Start {
            mouse,
            notes,
            stage,
            stage_reason,
            operator,
            weight_g,
            accept_fov,
        } => {
            let operator = operator.or_else(|| std::env::var("USER").ok());
            let v = client.call(
                Request::Start(StartRequest {
                    mouse,
                    notes,
                    task: None,
                    stage,
                    stage_reason,
                    operator,
                    weight_g,
                    accept_fov,
                }),
                // The field-of-view check waits for frames first (at most
                // [imaging.fov_check].timeout_s, 120 s).
                Duration::from_secs(150),
            )?;
            if !json {
                println!(
                    "started {} at {}\n  {}",
                    v["mouse"].as_str().unwrap_or("?"),
                    v["started_utc"].as_str().unwrap_or("?"),
                    v["session_dir"].as_str().unwrap_or("?")
                );
                if let Some(day) = v["training_day"].as_u64() {
                    print!("  training day {day}");
                    if let Some(stage) = v["stage"].as_str() {
                        print!(
                            "   stage {stage} ({})",
                            v["stage_why"].as_str().unwrap_or("")
                        );
                    }
                    println!();
                }
                if let Some(f) = v.get("fov_check").filter(|f| f.is_object()) {
                    let n = |k: &str| f[k].as_f64().map_or("-".into(), |x| format!("{x:+.1}"));
                    println!(
                        "  field of view: {} (reference: {}; dx {} px, dy {} px, rotation {}°, r = {})",
                        f["verdict"].as_str().unwrap_or("?"),
                        f["reference"].as_str().unwrap_or("?"),
                        n("dx_px"),
                        n("dy_px"),
                        n("rotation_deg"),
                        f["correlation"].as_f64().map_or("-".into(), |x| format!("{x:.2}"))
                    );
                }
                for w in v["warnings"].as_array().into_iter().flatten() {
                    println!("  WARNING: {}", w.as_str().unwrap_or_default());
                }
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
        Cmd::Valve {
            action:
                ValveCmd::Pulse {
                    ms,
                    ms_flag,
                    mouse: Some(mouse),
                },
        } => {
            // Everything the ledger needs is checked before the valve opens:
            // water that cannot be counted for the mouse is not given.
            let config = config_of(&cli_config)?;
            let ctx =
                daemon::training_cli::Ctx::resolve(config.as_deref(), cli_data_root.as_deref())
                    .map_err(Failure::Usage)?;
            let pulse_ms = ms.or(ms_flag).unwrap_or(0.0);
            let ul = ctx
                .config
                .as_ref()
                .ok_or_else(|| {
                    Failure::Usage(
                        "--mouse needs the rig's configuration (its valve calibration): give --config or --rig"
                            .into(),
                    )
                })?
                .valve
                .volume_for_open_ms(pulse_ms)
                .map_err(|e| Failure::Refused(format!("--mouse {mouse}: {e}")))?;
            if !ctx.data_root.join(&mouse).is_dir() {
                return Err(Failure::Refused(format!(
                    "no folder for mouse {mouse} in {}: add it with `rigctl mouse add {mouse} ...`",
                    ctx.data_root.display()
                )));
            }
            let v = client.call(
                Request::Valve(ValveRequest {
                    pulse_ms: Some(pulse_ms),
                    flush_ms: None,
                    calibration: false,
                }),
                quick,
            )?;
            let by = std::env::var("USER").unwrap_or_default();
            let note = format!("rigctl valve pulse {pulse_ms} ms");
            let g =
                training::water::give(&ctx.data_root, &mouse, &ctx.zone, ul, "pulse", &by, &note)
                    .map_err(|e| {
                    Failure::Refused(format!(
                        "the valve opened for {pulse_ms} ms but the water was not recorded ({e}): \
                     record it with `rigctl water give {mouse} --ul {ul:.2} --kind pulse`"
                    ))
                })?;
            if !json {
                println!(
                    "valve: done; {:.2} µL recorded for {mouse} on {}",
                    g.ul, g.local_date
                );
            }
            v
        }
        Cmd::Valve { action } => {
            let req = match action {
                ValveCmd::Pulse { ms, ms_flag, .. } => ValveRequest {
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
        Cmd::Recover { .. }
        | Cmd::Calibrate { .. }
        | Cmd::Mouse { .. }
        | Cmd::History { .. }
        | Cmd::Report { .. }
        | Cmd::Water { .. } => unreachable!("handled above"),
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
    if let Some(m) = v["checking_fov"].as_str() {
        println!("starting {m}: checking the field of view against its reference");
    }
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
            Event::Manual(m) => Some(format!(
                "by hand: {}{} (by {}){}",
                m.action.replace('_', " "),
                m.duration_ms
                    .map_or(String::new(), |d| format!(" {d:.1} ms")),
                m.by,
                if m.calibration {
                    ", calibration: water for no mouse"
                } else {
                    ""
                }
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

/// The commands that work on the data root (daemon::training_cli says why).
fn training_command(cli: Cli) -> Result<ExitCode, Failure> {
    use daemon::training_cli as t;
    // `--rig NAME` names the rig's configuration (and so its data root).
    let config = config_path(&cli)?;
    let ctx =
        t::Ctx::resolve(config.as_deref(), cli.data_root.as_deref()).map_err(Failure::Usage)?;
    let json = cli.json;
    let refused = |e: String| Failure::Refused(e);
    match cli.command {
        Cmd::Mouse { action } => match action {
            MouseCmd::Add { id, fields } => {
                let p = t::mouse_add(&ctx, &id, fields.into()).map_err(refused)?;
                println!("added {id}: {}", p.display());
            }
            MouseCmd::Edit { id, fields } => {
                let (p, s) = t::mouse_edit(&ctx, &id, fields.into()).map_err(refused)?;
                println!("{s}\nsaved {}", p.display());
            }
            MouseCmd::Show { id } => {
                let s = training::subject::read(&ctx.data_root, &id)
                    .map_err(|e| refused(e.to_string()))?;
                if json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    println!("{s}\n{}", t::next_session(&ctx, &id));
                }
            }
            MouseCmd::List => print!("{}", t::mouse_list(&ctx).map_err(refused)?),
            MouseCmd::Reference {
                action:
                    ReferenceCmd::Set {
                        id,
                        from_session,
                        image,
                        labels,
                        table,
                        operator,
                        note,
                    },
            } => {
                let mut new = match (from_session, image) {
                    (Some(dir), _) => training::reference::NewReference::from_session(&dir)
                        .map_err(|e| refused(e.to_string()))?,
                    (None, Some(image)) => training::reference::NewReference {
                        image,
                        ..Default::default()
                    },
                    (None, None) => {
                        return Err(Failure::Usage(
                            "give --from-session DIR or --image FILE".into(),
                        ))
                    }
                };
                if labels.is_some() {
                    new.roi_labels = labels;
                    new.roi_table = table;
                }
                new.operator = operator.or_else(|| std::env::var("USER").ok());
                new.note = note;
                let r = t::reference_set(&ctx, &id, new).map_err(refused)?;
                if json {
                    println!("{}", serde_json::to_string(&r.record).unwrap_or_default());
                } else {
                    print!("{}", t::reference_text(&r));
                    println!("saved {}", r.record_path.display());
                }
            }
            MouseCmd::Reference {
                action: ReferenceCmd::Show { id },
            } => match training::reference::read(&ctx.data_root, &id)
                .map_err(|e| refused(e.to_string()))?
            {
                Some(r) if json => {
                    println!("{}", serde_json::to_string(&r.record).unwrap_or_default())
                }
                Some(r) => print!("{}", t::reference_text(&r)),
                None => {
                    return Err(refused(format!(
                        "mouse {id} has no imaging reference: set one with `rigctl mouse \
                         reference set {id} --from-session DIR`"
                    )))
                }
            },
        },
        Cmd::History { mouse } => {
            let t::History {
                rows,
                ledger,
                notes,
            } = t::history(&ctx, &mouse).map_err(refused)?;
            if json {
                println!("{}", training::table::history_json(&rows, &ledger));
            } else {
                print!("{}", training::table::history_table(&rows, &ledger));
                println!("(dates and days in {})", ctx.zone.name());
            }
            for n in notes {
                eprintln!("rigctl: {n}");
            }
        }
        Cmd::Report { mouse, out } => {
            let t::History { rows, ledger, .. } = t::history(&ctx, &mouse).map_err(refused)?;
            let subject = training::subject::read(&ctx.data_root, &mouse).ok();
            let now = session_format::rfc3339_utc(std::time::SystemTime::now());
            let html =
                training::report::report_html(&mouse, subject.as_ref(), &rows, &ledger, &now);
            let out = out.unwrap_or_else(|| t::default_report_path(&ctx, &mouse));
            std::fs::write(&out, html)
                .map_err(|e| refused(format!("write {}: {e}", out.display())))?;
            println!("{}", out.display());
        }
        Cmd::Water { action } => match action {
            WaterCmd::Give {
                mouse,
                ul,
                kind,
                note,
                by,
            } => {
                let by = by
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_default();
                let g =
                    training::water::give(&ctx.data_root, &mouse, &ctx.zone, ul, &kind, &by, &note)
                        .map_err(refused)?;
                let day = training::water::by_hand_on_day(&ctx.data_root, &mouse, &g.local_date);
                println!(
                    "{mouse}: {:.1} µL ({}) on {} ({}); by hand that day: {day:.1} µL",
                    g.ul,
                    g.kind,
                    g.local_date,
                    ctx.zone.name()
                );
            }
        },
        _ => unreachable!("only training commands come here"),
    }
    Ok(ExitCode::SUCCESS)
}
