//! `rigd demo` when the session cannot start: the reason is said plainly,
//! and nothing is left behind (the virtual rig's frame ring in /dev/shm, its
//! run folder, a session folder).

use std::process::{Command, Stdio};

use rig_tests::{bin, TempDir};

#[test]
fn a_refused_demo_says_why_and_leaves_nothing_behind() {
    let dir = TempDir::new("demo-refused");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    // The mouse folder is a link to somewhere else: rigd refuses to write a
    // session through it.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, data.join("LINKED")).expect("symlink");

    let child = Command::new(bin("rigd"))
        .args([
            "demo",
            "--speed",
            "10",
            "--minutes",
            "1",
            "--mouse",
            "LINKED",
            "--data",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rigd demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("rigd demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the demo must fail:\n{text}");
    assert!(
        text.contains("LINKED") && text.contains("symbolic link"),
        "says why:\n{text}"
    );
    // The water-cap hint is for the water cap only.
    assert!(!text.contains("water today"), "no unrelated hint:\n{text}");
    // Nothing left behind: the frame ring, the run folder, any session.
    let shm = format!("/dev/shm/rigd-demo-{pid}");
    assert!(
        !std::path::Path::new(&shm).exists(),
        "{shm} left behind:\n{text}"
    );
    let run_dir = std::env::temp_dir().join(format!("rigd-demo-{pid}"));
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    assert_eq!(
        std::fs::read_dir(&elsewhere).expect("elsewhere").count(),
        0,
        "nothing written through the link"
    );
}
