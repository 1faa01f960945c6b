//! The simulated microscope inside the running virtual rig: frames published
//! into a shared-memory ring at the frame-clock TTL edges, with the truth.

use std::path::Path;

use frame_ring::{unlink_ring, FrameRingMapping};
use protocol::ring::PollOutcome;
use rig_sim::microscope::live::MicroscopeOptions;
use rig_sim::{SimClock, SimOptions};

#[test]
fn sim_publishes_a_frame_at_every_ttl_edge() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sim-microscope")
        .join(format!("e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let shm = format!("/rigsim-microscope-test-{}", std::process::id());
    let mut o = SimOptions::new(dir.join("ttyRIG"));
    o.quiet = true;
    o.truth = Some(dir.join("truth.tsv"));
    o.clock = SimClock::new(1_000_000, 50.0, 2.0);
    o.duration_s = Some(2.0);
    let mut m = MicroscopeOptions::new(Some(shm.clone()));
    (m.width, m.height, m.channels, m.neurons) = (64, 48, 2, 30);
    m.truth_dir = Some(dir.join("microscope"));
    o.microscope = Some(m);
    let h = rig_sim::spawn(o).expect("start");
    let start_host_ns = h.start_host_ns();
    let clock = h.clock();
    // Map the ring while the sim runs: it removes the name when it stops
    // (a reader's mapping stays valid).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let map = loop {
        match FrameRingMapping::open(&shm) {
            Ok(m) => break m,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "ring never appeared: {e:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    };
    h.wait().expect("run");
    assert!(
        FrameRingMapping::open(&shm).is_err(),
        "the sim removes its ring when it stops"
    );

    // The sim's own truth: TTL edges (true s, device µs).
    let truth = std::fs::read_to_string(dir.join("truth.tsv")).expect("truth");
    let ttl: Vec<(f64, u64)> = truth
        .lines()
        .filter(|l| l.split('\t').nth(2) == Some("ttl"))
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c[0].parse().expect("t"), c[1].parse().expect("dev"))
        })
        .collect();
    assert!(
        (55..=59).contains(&ttl.len()),
        "{} TTL edges in 2 s",
        ttl.len()
    );

    let frames = std::fs::read_to_string(dir.join("microscope/frames_truth.tsv")).expect("frames");
    let rows: Vec<Vec<String>> = frames
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), ttl.len(), "one truth row per TTL edge");
    for (k, (r, &(t, dev))) in rows.iter().zip(&ttl).enumerate() {
        assert_eq!(r[0], k.to_string());
        assert_eq!(r[1], (k + 1).to_string(), "frame_number = TTL count");
        let true_s: f64 = r[2].parse().expect("true_s");
        assert!(
            (true_s - t).abs() < 1.5e-6,
            "frame {k}: {true_s} vs TTL {t}"
        );
        assert_eq!(r[3].parse::<u64>().expect("dev"), dev);
        let host_ns: u64 = r[4].parse().expect("host_ns");
        let back = clock.true_us_at_host_ns(host_ns, start_host_ns) / 1e6;
        assert!(
            (back - true_s).abs() < 2e-6,
            "host_ns maps to {back}, not {true_s}"
        );
        assert_eq!(r[7], "0", "no drops at 64x48");
    }
    let dff = std::fs::read(dir.join("microscope/dff_truth.npy")).expect("dff");
    assert_eq!(dff.len(), 128 + rows.len() * 30 * 4);

    // The ring holds every frame, stamped with the TTL's host time.
    map.check_geometry(64, 48, 2).expect("geometry");
    let mut reader = map.reader().expect("reader");
    reader.seek(0);
    let mut px = vec![0u16; 64 * 48 * 2];
    let mut got = Vec::new();
    loop {
        match reader.poll(&mut px).expect("poll") {
            PollOutcome::Frame(meta) => got.push((meta.frame_number, meta.host_monotonic_ns)),
            PollOutcome::NothingNew => break,
            other => panic!("{other:?}"),
        }
    }
    let want: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r[1].parse().expect("n"), r[4].parse().expect("ns")))
        .collect();
    assert_eq!(got, want);
    let _ = unlink_ring(&shm);
    let _ = std::fs::remove_dir_all(&dir);
}
