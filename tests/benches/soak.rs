//! The soak: `cargo bench -p rig-tests --bench soak [-- --hours H --speed X
//! --fault-every-min M --frame-px N]`. Defaults: 12 h of device time at 60x
//! (12 minutes), a fault every 30 device-minutes, 32x32 frames. Prints the
//! accounting and rigd's memory, file descriptors and threads; exits 1 if
//! anything is not accounted for or memory grew by 10 % or more.
//! `scripts/soak.sh` runs it.

use rig_tests::soak::{run, SoakOptions};

fn main() {
    let mut opts = SoakOptions {
        device_hours: 12.0,
        speed: 60.0,
        fault_every_s: 1800.0,
        frame_px: 32,
        verbose: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> f64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--hours" => opts.device_hours = val(i),
            "--speed" => opts.speed = val(i),
            "--fault-every-min" => opts.fault_every_s = val(i) * 60.0,
            "--frame-px" => opts.frame_px = val(i) as u32,
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let report = run(&opts);
    report.print();
    // The resource trace, for plots: wall s, RSS kB, fds, threads.
    println!("samples (wall_s rss_kb fds threads), every 10th:");
    for s in report.samples.iter().step_by(10) {
        println!("  {:.0} {} {} {}", s.wall_s, s.rss_kb, s.fds, s.threads);
    }
    let ok = report.problems.is_empty() && report.rss_growth_pct < 10.0;
    std::process::exit(if ok { 0 } else { 1 });
}
