//! A short soak in the tests (the 12-hour one is `cargo bench -p rig-tests
//! --bench soak`, numbers in docs/performance.md): the virtual rig and its
//! microscope at high speed with link faults injected on a schedule; every
//! trial, reward, lever sample and frame accounted for; rigd's file
//! descriptors and threads flat.

use rig_tests::soak::{run, SoakOptions};

#[test]
fn a_short_soak_with_faults_accounts_for_everything() {
    let report = run(&SoakOptions {
        device_hours: 0.5,
        speed: 30.0,
        fault_every_s: 300.0,
        frame_px: 32,
        verbose: false,
    });
    report.print();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.faults.len(), 5);
    assert!(report.trials > 100, "{} trials", report.trials);
    assert!(report.ttl_edges > 40_000, "{} frames", report.ttl_edges);
    // Flat resources after warm-up (memory is measured over 12 h in the
    // bench; half an hour at 30x is too short to judge it).
    assert!(
        report.fds.1 <= report.fds.0 + 1,
        "file descriptors grew: {:?}",
        report.fds
    );
    assert!(
        report.threads.1 <= report.threads.0 + 1,
        "threads grew: {:?}",
        report.threads
    );
}
