//! ROIs from suite2p: `rigsession suite2p-labels` (python/rigsession/suite2p.py)
//! converts a suite2p plane folder, made by python/tests/test_suite2p.py as
//! suite2p writes one, into a label image; here the label image is read by
//! the NPY reader rigd reads label images with.

use std::process::Command;

use rig_tests::{python, workspace_root, TempDir};
use session_format::NpyData;

#[test]
fn suite2p_rois_convert_to_a_label_image_rigd_reads() {
    let dir = TempDir::new("suite2p");
    let path = rig_tests::checkout_pythonpath();
    // numpy is what the conversion needs (CI installs it; without it this
    // fails, it does not skip).
    let out = Command::new(python())
        .arg(workspace_root().join("python/tests/test_suite2p.py"))
        .arg(dir.path())
        .env("PYTHONPATH", path)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", python().display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("OK "),
        "python/tests/test_suite2p.py failed (numpy for {}?):\n{text}",
        python().display()
    );
    let labels = dir.path().join("out/rois.npy");
    let bytes = std::fs::read(&labels).expect("rois.npy");
    let a = session_format::parse_npy(&bytes, &labels).expect("rigd's NPY reader");
    assert_eq!(a.shape, vec![48, 64], "{}", a.shape_text());
    let NpyData::U4(v) = a.data else {
        panic!("uint32 labels, got {}", a.descr)
    };
    // Three ROIs of 25, 12 and 12 pixels, labelled 1..=3.
    let count = |k: u32| v.iter().filter(|&&x| x == k).count();
    assert_eq!((count(1), count(2), count(3)), (25, 12, 12));
    assert_eq!(v.iter().copied().max(), Some(3));
    let table = std::fs::read_to_string(dir.path().join("out/rois.tsv")).expect("rois.tsv");
    assert_eq!(table.lines().count(), 4, "{table}");
}
