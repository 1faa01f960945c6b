//! `rigd demo`: a whole session against the virtual rig, with no
//! configuration. The virtual rig runs in this process on a real pty; the
//! daemon talks to it through the same serial link, task engine, storage and
//! control socket as on a real rig.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use firmware_bridge::link::LinkSettings;
use protocol::control::{Event, LinkState, SessionEvent, StartRequest, TrialOutcome};
use rig_sim::SimOptions;

use crate::app::App;
use daemon::session::{SessionLog, StopReason};

/// What `rigd demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Session length in minutes of device time.
    pub minutes: u32,
    /// Device time per wall time.
    pub speed: f64,
    /// Training day of the simulated mouse, 1 (naive) ..= 14 (expert).
    pub day: u8,
    /// Where session folders go.
    pub data: PathBuf,
    pub seed: u64,
    /// Mouse id for the session.
    pub mouse: String,
}

/// Run the demo; returns the session folder.
pub async fn run(opts: DemoOptions, session_log: SessionLog) -> anyhow::Result<PathBuf> {
    if !(opts.speed > 0.0 && opts.speed <= 100.0) {
        anyhow::bail!("--speed {}: must be > 0 and <= 100", opts.speed);
    }
    if !(1..=14).contains(&opts.day) {
        anyhow::bail!("--day {}: must be 1..=14", opts.day);
    }
    if opts.minutes == 0 || opts.minutes > 24 * 60 {
        anyhow::bail!("--minutes {}: must be 1..=1440", opts.minutes);
    }
    let data = if opts.data.is_absolute() {
        opts.data.clone()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(&opts.data)
    };
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create the data folder {}", data.display()))?;
    // The demo mouse is a mouse like any other: it has a record, made here
    // the first time (before anything else is set up, so a refusal leaves
    // nothing behind).
    if let Err(training::SubjectError::Unknown { .. }) = training::subject::read(&data, &opts.mouse)
    {
        training::subject::write(
            &data,
            &training::subject::demo_subject(&opts.mouse),
            true,
            None,
        )
        .map_err(|e| anyhow::anyhow!("cannot write the demo mouse's record: {e}"))?;
    }
    let run_dir = std::env::temp_dir().join(format!("rigd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let link_path = run_dir.join("ttyRIG");

    // The virtual rig, in this process.
    let mut sim_opts = SimOptions::new(&link_path);
    sim_opts.seed = opts.seed;
    sim_opts.clock.speed = opts.speed;
    sim_opts.day = opts.day;
    sim_opts.quiet = true;
    sim_opts.truth = Some(run_dir.join("truth.tsv"));
    // The simulated microscope: 256x256 keeps a 10x-speed demo light (the
    // default 512x512 is for real-time sessions; see docs/performance.md).
    let shm_name = format!("/rigd-demo-{}", std::process::id());
    let mut scope = rig_sim::microscope::live::MicroscopeOptions::new(Some(shm_name.clone()));
    scope.width = 256;
    scope.height = 256;
    scope.neurons = 100;
    scope.slot_count = 256;
    sim_opts.microscope = Some(scope);
    let sim = rig_sim::spawn(sim_opts)
        .map_err(|e| anyhow::anyhow!("cannot start the virtual rig: {e}"))?;

    // A configuration with every default, pointed at the virtual rig.
    let mut cfg = rig_config::RigConfig::default();
    cfg.rig.name = "demo".into();
    cfg.rig.serial_port = link_path.display().to_string();
    cfg.storage.data_root = data.clone();
    cfg.control.socket = run_dir.join("rigd.sock");
    cfg.task.max_duration_min = Some(opts.minutes);
    // A start needs the mouse's record.
    cfg.training = Some(rig_config::TrainingSection::default());
    // The preview page on a free loopback port (printed at start).
    cfg.preview.enabled = true;
    cfg.preview.port = 0;
    cfg.imaging.enabled = true;
    cfg.imaging.shm_name = shm_name.clone();
    cfg.imaging.width = 256;
    cfg.imaging.height = 256;
    cfg.imaging.channels = 1;
    // A demo is not a rig: it leaves the machine's CPU idle states, kernel
    // workers and memory as they are (and has no warnings to print about
    // them on a machine where it may not touch them).
    cfg.realtime.lock_memory = false;
    cfg.realtime.hold_cpus_awake = false;
    cfg.realtime.boost_tty_workers = false;
    let mut settings = LinkSettings::from_config(&cfg);
    // The device's watchdog counts device time, which runs `speed` times
    // faster than the host's heartbeats: scale its timeout so it trips after
    // the same wall time as on a real rig.
    let scaled =
        (f64::from(settings.configure.heartbeat_timeout_ms) * opts.speed).min(f64::from(u16::MAX));
    settings.configure.heartbeat_timeout_ms = scaled as u16;

    let mut app = App::start(cfg, None, settings, session_log).await?;
    let mut events = app.events.subscribe();
    daemon::outln!(
        "rigd demo: virtual rig at {} (day {}, {}x speed), {} min session",
        link_path.display(),
        opts.day,
        opts.speed,
        opts.minutes
    );
    daemon::outln!(
        "control socket: {}  (try: rigctl --socket {} status)",
        run_dir.join("rigd.sock").display(),
        run_dir.join("rigd.sock").display()
    );

    // Wait for the handshake.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if app.live.status.link() == Some(LinkState::Connected) && app.live.status.rig_now_us() > 0
        {
            break;
        }
        if Instant::now() > deadline {
            app.shutdown().await;
            let _ = sim.stop();
            anyhow::bail!("the virtual rig did not connect within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reply = app
        .core
        .start(StartRequest {
            mouse: opts.mouse.clone(),
            notes: Some(format!(
                "rigd demo: virtual rig, day {}, speed {}x, seed {}",
                opts.day, opts.speed, opts.seed
            )),
            task: None,
            ..Default::default()
        })
        .await;
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            // Leave nothing behind: the virtual rig, its frame ring, the
            // run folder.
            app.shutdown().await;
            let _ = sim.stop();
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = frame_ring::unlink_ring(&shm_name);
            let water_cap = e.message.contains("max_water_per_day_ul");
            let hint = if e.code == protocol::control::ErrorCode::RefusedBySafety && water_cap {
                format!(
                    "\nThe demo mouse {} is a mouse like any other: its water today is counted \
                     from its sessions in {}. Run `rigd demo --mouse ANOTHER` or \
                     `rigd demo --data FRESH_FOLDER`.",
                    opts.mouse,
                    data.display()
                )
            } else {
                String::new()
            };
            anyhow::bail!("cannot start the session: {}{hint}", e.message);
        }
    };
    daemon::outln!("session {}", reply.session_dir);

    let total_us = f64::from(opts.minutes) * 60e6;
    let mut last_bar = Instant::now();
    let mut stdout = std::io::stdout();
    let result = loop {
        tokio::select! {
            Some(req) = app.core_rx.recv() => app.core.handle(req).await,
            Some(n) = app.notices.recv() => app.core.on_notice(n),
            bg = app.core.background() => match bg {
                daemon::supervisor::Background::FovCheck(done) => app.core.complete_start(done).await,
                daemon::supervisor::Background::Finished(f) => break app.core.complete_stop(*f),
            },
            ev = events.recv() => {
                if let Ok(line) = ev {
                    if let Ok(protocol::control::ServerMessage::Event(e)) = protocol::control::parse_server_line(&line) {
                        print_event(&e, &mut stdout);
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => app.core.tick(),
            _ = tokio::signal::ctrl_c() => {
                daemon::outln!("\ninterrupted: stopping the session");
                app.core.begin_stop(StopReason::Requested("interrupted (Ctrl-C)".into()), false);
            }
        }
        if last_bar.elapsed() > Duration::from_secs(2) {
            last_bar = Instant::now();
            let s = app.live.status.snapshot();
            let (now, t0, trials, rewards) = (
                s.rig_now_us,
                s.t0_us.unwrap_or(s.rig_now_us),
                s.trials,
                s.rewards,
            );
            let frac = (now.saturating_sub(t0) as f64 / total_us).clamp(0.0, 1.0);
            let filled = (frac * 30.0).round() as usize;
            let _ = writeln!(
                stdout,
                "[{}{}] {:3.0} %  {:.1} of {} min   trials {trials}   rewards {rewards}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                frac * 100.0,
                now.saturating_sub(t0) as f64 / 60e6,
                opts.minutes
            );
        }
    };
    app.shutdown().await;
    if let Err(e) = sim.stop() {
        tracing::warn!("virtual rig: {e}");
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = frame_ring::unlink_ring(&shm_name);
    let reply = result.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let s = &reply.summary;
    daemon::outln!();
    daemon::outln!("session finished: {}", s.session_dir);
    if let Some(why) = &s.stop_reason {
        daemon::outln!("ended by: {why}");
    }
    daemon::outln!(
        "trials {}   rewards {}   water {:.1} µL   success {}",
        s.trials,
        s.rewards,
        s.water_ul,
        s.success_rate
            .map_or("-".into(), |x| format!("{:.0} %", x * 100.0))
    );
    daemon::outln!(
        "reaction time median {}   trajectory correlation median {}",
        s.reaction_time_median_s
            .map_or("-".into(), |x| format!("{x:.3} s")),
        s.trajectory_corr_median
            .map_or("-".into(), |x| format!("{x:.2}"))
    );
    if let Some(qc) =
        s.qc.clone()
            .and_then(|v| serde_json::from_value::<session_format::Qc>(v).ok())
    {
        let mut text = qc.to_string();
        text.pop();
        daemon::outln!("{text}");
    }
    let frames = std::path::Path::new(&s.session_dir).join(daemon::imaging::ingest::FRAMES_TSV);
    if let Ok(text) = std::fs::read_to_string(frames) {
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|r| r.split('\t').collect())
            .collect();
        let ttl = rows.iter().filter(|r| r.get(3) == Some(&"ttl")).count();
        let dropped = rows.iter().filter(|r| r.get(4) == Some(&"1")).count();
        daemon::outln!(
            "imaging: {} frames ({} stamped by the frame clock), {} dropped",
            rows.len(),
            ttl,
            dropped
        );
    }
    Ok(PathBuf::from(&s.session_dir))
}

fn print_event(e: &Event, out: &mut impl Write) {
    match e {
        Event::Trial(t) => {
            let what = match t.outcome {
                TrialOutcome::Rewarded => "rewarded",
                TrialOutcome::Miss => "miss",
                TrialOutcome::Aborted => "aborted",
            };
            let _ = writeln!(
                out,
                "trial {:4}  {:8}  {}",
                t.trial,
                what,
                t.cue_to_crossing_s
                    .map_or(String::new(), |r| format!("cue to crossing {r:.3} s"))
            );
        }
        Event::Link(l) if l.state != LinkState::Connected => {
            let _ = writeln!(
                out,
                "link {:?}: {}",
                l.state,
                l.detail.as_deref().unwrap_or("")
            );
        }
        Event::Session(SessionEvent::Stopped { reason, .. }) => {
            let _ = writeln!(out, "session stopped: {}", reason.as_deref().unwrap_or(""));
        }
        _ => {}
    }
}
