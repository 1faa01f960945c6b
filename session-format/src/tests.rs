//! Tests of the session folder: every file round-trips, stays loadable after
//! each sync, and a crash at any point is repaired by recovery.

#![allow(clippy::unwrap_used)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::manifest::sha256_file;
use super::npy::read_f8;
use super::tsv::{put_escaped, put_us_as_s, unescape};
use super::*;
use crate::trial::{Outcome, TrialRecord};

// ---- helpers -------------------------------------------------------------------

/// A unique scratch folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rigd-storage-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// 2024-05-01T09:30:12.123456Z
fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(1_714_555_812_123_456)
}

fn info() -> SessionInfo {
    SessionInfo {
        training: None,
        imaging_reference: None,
        fov_check: None,
        rig: "rig7".to_owned(),
        notes: "day 3, \"good\" mouse".to_owned(),
        config_toml: toml::to_string(&rig_config::RigConfig::default()).unwrap(),
        t0_rig_us: 5_000_000,
        host_monotonic_start_ns: 987_654_321_000,
        clock_sync: None,
        realtime: None,
    }
}

fn new_writer(root: &Path) -> SessionWriter {
    let dir = SessionDir::create(root, "M12", start_time()).unwrap();
    SessionWriter::create(dir, info(), Duration::from_millis(1000), HOUR).unwrap()
}

fn trial(n: u32) -> TrialRecord {
    let rewarded = n % 3 != 0;
    let t = u64::from(n) * 7_000_001;
    TrialRecord {
        trial: n,
        t_start_us: t,
        t_cue_us: t + 1_500_000,
        t_response_us: rewarded.then_some(t + 1_812_345),
        outcome: if rewarded {
            Outcome::Rewarded
        } else {
            Outcome::Miss
        },
        t_reward_us: rewarded.then_some(t + 1_812_845),
        reward_ul: if rewarded { 2.5 } else { 0.0 },
        valve_open_us: if rewarded { 41_250 } else { 0 },
        lever_mm_at_cue: 0.1 * f64::from(n),
        iti_presses: n % 2,
        capped: n == 4,
    }
}

/// Header and rows of a TSV; asserts the file ends with a complete line.
fn read_tsv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "{} ends mid-line", path.display());
    assert!(!text.contains('\0'));
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split('\t')
        .map(str::to_owned)
        .collect();
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "row {r:?}");
    }
    (header, rows)
}

fn opt_s(cell: &str) -> Option<u64> {
    (!cell.is_empty()).then(|| s_to_us(cell))
}

/// Parse "12.000250" back to µs exactly.
fn s_to_us(cell: &str) -> u64 {
    let (s, frac) = cell.split_once('.').unwrap();
    assert_eq!(frac.len(), 6, "{cell}");
    s.parse::<u64>().unwrap() * 1_000_000 + frac.parse::<u64>().unwrap()
}

fn parse_trial(row: &[String]) -> TrialRecord {
    TrialRecord {
        trial: row[0].parse().unwrap(),
        t_start_us: s_to_us(&row[1]),
        t_cue_us: s_to_us(&row[2]),
        t_response_us: opt_s(&row[3]),
        outcome: match row[4].as_str() {
            "rewarded" => Outcome::Rewarded,
            "miss" => Outcome::Miss,
            o => panic!("outcome {o}"),
        },
        t_reward_us: opt_s(&row[5]),
        reward_ul: row[6].parse().unwrap(),
        valve_open_us: row[7].parse().unwrap(),
        lever_mm_at_cue: row[8].parse().unwrap(),
        iti_presses: row[9].parse().unwrap(),
        capped: match row[10].as_str() {
            "0" => false,
            "1" => true,
            c => panic!("capped {c}"),
        },
    }
}

fn session_toml(dir: &Path) -> toml::Table {
    std::fs::read_to_string(dir.join(SESSION_FILE))
        .unwrap()
        .parse()
        .unwrap()
}

fn state(dir: &Path) -> String {
    session_toml(dir)["state"].as_str().unwrap().to_owned()
}

/// Every file's bytes, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Check MANIFEST.sha256 against the files, with our hasher.
fn check_manifest(dir: &Path) {
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let mut listed = Vec::new();
    for line in text.lines() {
        let (hex, name) = line.split_once("  ").unwrap();
        assert_eq!(hex.len(), 64);
        assert_eq!(sha256_file(&dir.join(name)).unwrap(), hex, "{name}");
        listed.push(name.to_owned());
    }
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != MANIFEST_FILE)
        .collect();
    present.sort();
    assert_eq!(listed, present);
}

fn has_dev_full() -> bool {
    OpenOptions::new().write(true).open("/dev/full").is_ok()
}

// ---- session folder ------------------------------------------------------------

#[test]
fn folder_is_utc_stamp_and_a_second_start_gets_a_suffix() {
    let root = Scratch::new("dir");
    let a = SessionDir::create(&root.0, "M12", start_time()).unwrap();
    assert_eq!(a.path(), root.0.join("M12").join("2024-05-01_093012"));
    assert!(a.path().is_dir());
    assert_eq!(a.mouse(), "M12");
    let b = SessionDir::create(&root.0, "M12", start_time()).unwrap();
    assert_eq!(b.path(), root.0.join("M12").join("2024-05-01_093012_2"));
    let c = SessionDir::create(&root.0, "M12", start_time()).unwrap();
    assert_eq!(c.path(), root.0.join("M12").join("2024-05-01_093012_3"));
    // An existing folder is never reused: fill up the suffixes, then refuse.
    for _ in 4..=9 {
        SessionDir::create(&root.0, "M12", start_time()).unwrap();
    }
    let err = SessionDir::create(&root.0, "M12", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::SessionExists { .. }), "{err}");
    assert!(err.to_string().contains("2024-05-01_093012"), "{err}");
    // Another mouse, same second: its own folder.
    let other = SessionDir::create(&root.0, "M13", start_time()).unwrap();
    assert!(other.path().ends_with("M13/2024-05-01_093012"));
}

#[test]
fn mouse_ids_that_name_paths_are_refused() {
    let root = Scratch::new("mouse");
    for bad in [
        "../x",
        "a/b",
        "",
        "..",
        ".",
        "a\\b",
        "M 1",
        "m\0",
        &"x".repeat(65),
    ] {
        let err = SessionDir::create(&root.0, bad, start_time()).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidMouse(_)),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(&root.0).unwrap().count(), 0);
}

#[test]
fn a_mouse_folder_that_is_a_link_or_a_file_is_never_written_through() {
    let root = Scratch::new("links");
    let elsewhere = Scratch::new("links-elsewhere");
    // data_root/M12 -> a folder outside the data root.
    std::os::unix::fs::symlink(&elsewhere.0, root.0.join("M12")).unwrap();
    let err = SessionDir::create(&root.0, "M12", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::UnsafeFolder { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("symbolic link"), "{msg}");
    assert!(msg.contains(&*elsewhere.0.to_string_lossy()), "{msg}");
    assert_eq!(std::fs::read_dir(&elsewhere.0).unwrap().count(), 0);
    // A dangling link is refused too (it is not created through).
    let target = elsewhere.0.join("made-by-rigd");
    std::os::unix::fs::symlink(&target, root.0.join("M13")).unwrap();
    let err = SessionDir::create(&root.0, "M13", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::UnsafeFolder { .. }), "{err}");
    assert!(!target.exists());
    // A file where the mouse's folder should be.
    std::fs::write(root.0.join("M14"), b"x").unwrap();
    let err = SessionDir::create(&root.0, "M14", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::UnsafeFolder { .. }), "{err}");
    // A data root that is itself a link (a data disk) is the lab's choice.
    let linked_root = elsewhere.0.join("root-link");
    std::os::unix::fs::symlink(&root.0, &linked_root).unwrap();
    let dir = SessionDir::create(&linked_root, "M15", start_time()).unwrap();
    assert!(root.0.join("M15").is_dir());
    assert!(dir.path().starts_with(&linked_root));
}

#[test]
fn missing_data_root_is_refused_not_created() {
    let root = Scratch::new("missing");
    let gone = root.0.join("not-mounted");
    let err = SessionDir::create(&gone, "M12", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::DataRootMissing { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&*gone.to_string_lossy()), "{msg}");
    assert!(msg.contains("[storage].data_root"), "{msg}");
    assert!(!gone.exists());
    // A file where the root should be.
    let file = root.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = SessionDir::create(&file, "M12", start_time()).unwrap_err();
    assert!(matches!(err, StorageError::DataRootMissing { .. }), "{err}");
}

#[test]
fn unwritable_data_root_gives_a_clear_error() {
    let root = Scratch::new("readonly");
    std::fs::set_permissions(&root.0, std::fs::Permissions::from_mode(0o555)).unwrap();
    match SessionDir::create(&root.0, "M12", start_time()) {
        Err(err) => {
            let msg = err.to_string();
            assert!(
                msg.contains(&*root.0.join("M12").to_string_lossy()),
                "{msg}"
            );
            assert!(msg.contains("Permission denied"), "{msg}");
            assert!(msg.contains("may write"), "{msg}");
        }
        Ok(dir) => {
            // Root ignores permission bits; sysfs refuses everyone instead.
            println!(
                "note: running as root, mode 0555 did not stop {}",
                dir.path().display()
            );
            let sys = Path::new("/sys");
            if sys.is_dir() {
                let err = SessionDir::create(sys, "M12", start_time()).unwrap_err();
                let msg = err.to_string();
                assert!(msg.starts_with("cannot create folder /sys/M12: "), "{msg}");
                assert!(msg.contains("os error"), "{msg}");
            }
        }
    }
}

// ---- npy -------------------------------------------------------------------------

#[test]
fn npy_header_is_fixed_length_64_aligned_and_declares_the_rows() {
    let root = Scratch::new("npyhdr");
    for (dtype, shape) in [
        (NpyDtype::F8, vec![3]),
        (NpyDtype::F4, vec![]),
        (NpyDtype::U2, vec![2, 512, 512]),
    ] {
        let path = root.0.join(format!(
            "{}-{}.npy",
            dtype.descr().trim_start_matches('<'),
            shape.len()
        ));
        let mut a = NpyAppender::create(&path, dtype, &shape).unwrap();
        let h0 = read_npy_header(&path).unwrap();
        assert_eq!(h0.version, (1, 0));
        assert_eq!(h0.descr, dtype.descr());
        assert!(!h0.fortran_order);
        assert_eq!(h0.data_offset % 64, 0);
        let mut want = vec![0u64];
        want.extend(shape.iter().map(|&d| d as u64));
        assert_eq!(h0.shape, want);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), h0.data_offset);
        // The header text is what numpy writes, padded, ending in a newline.
        let bytes = std::fs::read(&path).unwrap();
        let text = std::str::from_utf8(&bytes[10..h0.data_offset as usize]).unwrap();
        assert!(text.ends_with('\n'));
        let expected_shape = match shape.len() {
            0 => "(0,)".to_owned(),
            _ => format!(
                "(0, {})",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        assert!(
            text.starts_with(&format!(
                "{{'descr': '{}', 'fortran_order': False, 'shape': {expected_shape}, }}",
                dtype.descr()
            )),
            "{text}"
        );
        // Rows appended and synced: same header length, new count.
        let row_len: usize = shape.iter().product();
        let rows = 3;
        match dtype {
            NpyDtype::F8 => a.append(&vec![1.5f64; row_len * rows]).unwrap(),
            NpyDtype::F4 => a.append(&vec![1.5f32; row_len * rows]).unwrap(),
            NpyDtype::U2 => a.append(&vec![7u16; row_len * rows]).unwrap(),
        }
        a.sync().unwrap();
        let h1 = read_npy_header(&path).unwrap();
        assert_eq!(h1.data_offset, h0.data_offset);
        assert_eq!(h1.shape[0], 3);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            h1.data_offset + 3 * h1.row_bytes().unwrap()
        );
    }
    // The largest row count still fits the reserved header.
    assert!(super::npy::header_fits("<f8", &[3], u64::MAX));
    assert!(super::npy::header_fits("<u2", &[4, 2048, 2048], u64::MAX));
}

#[test]
fn npy_appender_round_trips_each_dtype() {
    let root = Scratch::new("npyrt");
    let f8: Vec<f64> = (0..12).map(|i| f64::from(i) * 0.25 - 1.0).collect();
    let f4: Vec<f32> = (0..10).map(|i| i as f32 / 3.0).collect();
    let u2: Vec<u16> = (0..2 * 2 * 3 * 4).map(|i| (i * 2731) as u16).collect();
    let cases: Vec<(&str, NpyDtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "a.npy",
            NpyDtype::F8,
            vec![3],
            f8.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "b.npy",
            NpyDtype::F4,
            vec![5],
            f4.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "c.npy",
            NpyDtype::U2,
            vec![2, 3, 4],
            u2.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    for (name, dtype, shape, want) in cases {
        let path = root.0.join(name);
        let mut a = NpyAppender::create(&path, dtype, &shape).unwrap();
        // Two appends, so rows cross calls.
        match dtype {
            NpyDtype::F8 => {
                a.append(&f8[..3]).unwrap();
                a.append(&f8[3..]).unwrap();
            }
            NpyDtype::F4 => {
                a.append(&f4[..5]).unwrap();
                a.append(&f4[5..]).unwrap();
            }
            NpyDtype::U2 => {
                a.append(&u2[..24]).unwrap();
                a.append(&u2[24..]).unwrap();
            }
        }
        a.sync().unwrap();
        let h = read_npy_header(&path).unwrap();
        let rows = want.len() as u64 / h.row_bytes().unwrap();
        assert_eq!(h.shape[0], rows, "{name}");
        assert_eq!(a.rows(), rows);
        assert_eq!(a.synced_rows(), rows);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[h.data_offset as usize..], &want[..], "{name}");
    }
}

#[test]
fn npy_refuses_wrong_dtype_and_partial_rows() {
    let root = Scratch::new("npybad");
    let path = root.0.join("x.npy");
    let mut a = NpyAppender::create(&path, NpyDtype::F8, &[3]).unwrap();
    let err = a.append(&[1.0f32, 2.0, 3.0]).unwrap_err();
    assert!(
        err.to_string().contains("<f4 values to a <f8 array"),
        "{err}"
    );
    let err = a.append(&[1.0f64, 2.0]).unwrap_err();
    assert!(
        err.to_string().contains("not a whole number of rows"),
        "{err}"
    );
    assert_eq!(a.rows(), 0);
    // Never overwrites.
    let err = NpyAppender::create(&path, NpyDtype::F8, &[3]).unwrap_err();
    assert!(err.to_string().contains("File exists"), "{err}");
}

// ---- npy reader ------------------------------------------------------------------

/// An `.npy` file's bytes as numpy would write them: `version` 1 or 2, the
/// dictionary text as given, padded to 64 bytes, then `data`.
fn npy_bytes(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let len_bytes = if version == 1 { 2 } else { 4 };
    let mut header = dict.to_owned();
    while (8 + len_bytes + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY".to_vec();
    b.extend_from_slice(&[version, 0]);
    if version == 1 {
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

#[test]
fn read_npy_reads_every_integer_and_float_dtype_in_either_byte_order() {
    let path = Path::new("/data/x.npy");
    let values = [0u8, 1, 2, 3, 4, 125];
    for descr in [
        "<u1", "|u1", "|i1", "<u2", ">u2", "<u4", ">u4", "<u8", ">u8", "<i2", ">i2", "<i4", ">i4",
        "<i8", ">i8", "<f4", ">f4", "<f8", ">f8", "=u2",
    ] {
        let size: usize = descr[2..].parse().unwrap();
        let big = descr.starts_with('>');
        let mut data = Vec::new();
        for &v in &values {
            let mut le: Vec<u8> = match &descr[1..2] {
                "f" if size == 4 => f32::from(v).to_le_bytes().to_vec(),
                "f" => f64::from(v).to_le_bytes().to_vec(),
                _ => u64::from(v).to_le_bytes()[..size].to_vec(),
            };
            if big {
                le.reverse();
            }
            data.extend_from_slice(&le);
        }
        let a = parse_npy(&npy_bytes(1, &dict(descr, "(2, 3)"), &data), path)
            .unwrap_or_else(|e| panic!("{descr}: {e}"));
        assert_eq!(a.descr, descr);
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(a.shape_text(), "(2, 3)");
        assert_eq!(a.data.len(), 6);
        let as_f64: Vec<f64> = match &a.data {
            NpyData::U1(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::U2(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::U4(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::I1(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I2(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I4(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I8(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F4(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::F8(v) => v.clone(),
        };
        assert_eq!(as_f64, [0.0, 1.0, 2.0, 3.0, 4.0, 125.0], "{descr}");
        let kind = match &descr[1..2] {
            "u" => "uint",
            "i" => "int",
            _ => "float",
        };
        assert_eq!(a.data.type_name(), format!("{kind}{}", size * 8), "{descr}");
    }
    // Signed values keep their sign.
    let a = parse_npy(
        &npy_bytes(1, &dict("<i4", "(2,)"), &[255, 255, 255, 255, 7, 0, 0, 0]),
        path,
    )
    .unwrap();
    assert_eq!(a.data, NpyData::I4(vec![-1, 7]));
    assert_eq!(a.shape_text(), "(2,)");
}

#[test]
fn read_npy_reads_v2_headers_0d_arrays_and_ignores_trailing_bytes() {
    let path = Path::new("x.npy");
    let a = parse_npy(&npy_bytes(2, &dict("<u2", "(2,)"), &[1, 0, 2, 0]), path).unwrap();
    assert_eq!(a.data, NpyData::U2(vec![1, 2]));
    let a = parse_npy(
        &npy_bytes(1, &dict("<f8", "()"), &2.5f64.to_le_bytes()),
        path,
    )
    .unwrap();
    assert_eq!(
        (a.shape_text().as_str(), a.data),
        ("()", NpyData::F8(vec![2.5]))
    );
    let a = parse_npy(&npy_bytes(1, &dict("<u1", "(0, 4)"), &[]), path).unwrap();
    assert!(a.data.is_empty());
    let a = parse_npy(&npy_bytes(1, &dict("|u1", "(2,)"), &[5, 6, 7, 8]), path).unwrap();
    assert_eq!(a.data, NpyData::U1(vec![5, 6]));
    // Key order and quotes as other writers produce them.
    let text = "{'shape': (1,), 'fortran_order': False, 'descr': \"<i2\"}";
    let a = parse_npy(&npy_bytes(1, text, &[3, 0]), path).unwrap();
    assert_eq!(a.data, NpyData::I2(vec![3]));
}

#[test]
fn read_npy_reads_what_the_appender_writes() {
    let root = Scratch::new("npyread");
    let path = root.0.join("frames.npy");
    let mut w = NpyAppender::create(&path, NpyDtype::U2, &[2, 3]).unwrap();
    let pixels: Vec<u16> = (0..18).map(|i| i * 1000).collect();
    w.append(&pixels).unwrap();
    w.sync().unwrap();
    let a = read_npy(&path).unwrap();
    assert_eq!(
        (a.descr.as_str(), a.shape.as_slice()),
        ("<u2", &[3u64, 2, 3][..])
    );
    assert_eq!(a.data, NpyData::U2(pixels));
    let err = read_npy(&root.0.join("missing.npy"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot read ") && err.contains("missing.npy"),
        "{err}"
    );
}

#[test]
fn read_npy_names_the_file_and_the_problem_of_a_bad_header() {
    let path = Path::new("/data/labels.npy");
    let good = npy_bytes(1, &dict("<u2", "(2, 2)"), &[0; 8]);
    let mut bad_version = good.clone();
    bad_version[6] = 9;
    let mut long = good[..8].to_vec();
    long.extend_from_slice(&[0xff, 0xff]);
    let mut not_text = npy_bytes(1, &dict("<u2", "(2, 2)"), &[0; 8]);
    not_text[12] = 0xff;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x93NUM".to_vec(), "shorter than an NPY preamble"),
        (
            b"II*\0\x08\0\0\0\0\0".to_vec(),
            "not an NPY file (bad magic)",
        ),
        (bad_version, "unsupported NPY version 9"),
        (good[..30].to_vec(), "truncated NPY header"),
        (long, "NPY header of 65535 bytes is too long"),
        (not_text, "NPY header is not text"),
        (
            npy_bytes(1, "{'descr': '<u2', 'shape': (2, 2), }", &[0; 8]),
            "cannot parse NPY header dictionary",
        ),
        (
            npy_bytes(
                1,
                "{'descr': '<u2', 'fortran_order': False, 'shape': (2, x), }",
                &[0; 8],
            ),
            "cannot parse NPY header dictionary",
        ),
        (
            npy_bytes(
                1,
                "{'descr': '<u2', 'fortran_order': True, 'shape': (2, 2), }",
                &[0; 8],
            ),
            "Fortran-order array is not supported: save it in C order",
        ),
        (
            npy_bytes(1, &dict("<c8", "(2, 2)"), &[0; 32]),
            "NPY dtype \"<c8\" is not supported",
        ),
        (
            npy_bytes(1, &dict("<f2", "(2, 2)"), &[0; 8]),
            "NPY dtype \"<f2\" is not supported",
        ),
        (
            npy_bytes(1, &dict("|S4", "(2, 2)"), &[0; 16]),
            "NPY dtype \"|S4\" is not supported",
        ),
        (
            npy_bytes(1, &dict("<u2", "(2, 2)"), &[0; 7]),
            "truncated NPY data: shape [2, 2] of <u2 needs 8 bytes after the header, the file \
             has 7",
        ),
        (
            npy_bytes(1, &dict("<f8", "(4294967296, 4294967296)"), &[0; 8]),
            "NPY shape [4294967296, 4294967296] is too large",
        ),
        (
            npy_bytes(1, &dict("<f8", "(4294967296, 4294967)"), &[0; 8]),
            "needs 147573942419193856 bytes",
        ),
    ];
    for (bytes, want) in cases {
        let err = parse_npy(&bytes, path).unwrap_err();
        assert!(matches!(err, StorageError::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("/data/labels.npy: "), "{msg}");
        assert!(msg.contains(want), "want {want:?} in {msg}");
    }
    // The header reader gives the same reasons from a file.
    let root = Scratch::new("npyhdrbad");
    let p = root.0.join("x.npy");
    std::fs::write(&p, b"\x93NUMPY\x01\x00\x40\x00{'descr'").unwrap();
    let err = read_npy_header(&p).unwrap_err().to_string();
    assert!(err.ends_with("x.npy: truncated NPY header"), "{err}");
}

#[test]
fn lever_npy_is_loadable_after_every_sync() {
    let root = Scratch::new("lever");
    let mut w = new_writer(&root.0);
    let path = w.path().join(LEVER_FILE);
    let mut n = 0u64;
    for round in 1..=5u64 {
        for _ in 0..200 {
            w.write_lever(n * 1000, n as f64 * 0.025, n as i64 - 100)
                .unwrap();
            n += 1;
        }
        w.sync().unwrap();
        let (h, vals) = read_f8(&path);
        assert_eq!(h.shape, vec![round * 200, 3]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            h.data_offset + round * 200 * 24
        );
        for (i, row) in vals.chunks_exact(3).enumerate() {
            let i = i as u64;
            assert_eq!(row[0], (i * 1000) as f64 / 1e6);
            assert_eq!(row[1], i as f64 * 0.025);
            assert_eq!(row[2], i as f64 - 100.0);
        }
    }
    assert_eq!(w.lever_rows(), 1000);
}

// ---- tables ----------------------------------------------------------------------

#[test]
fn trials_tsv_round_trips_and_columns_follow_trial_record() {
    let root = Scratch::new("trials");
    let mut w = new_writer(&root.0);
    let recs: Vec<TrialRecord> = (1..=9).map(trial).collect();
    for r in &recs {
        w.write_trial(r).unwrap();
    }
    w.sync().unwrap();
    let (header, rows) = read_tsv(&w.path().join(TRIALS_FILE));
    assert_eq!(header, TRIALS_COLUMNS);
    let back: Vec<TrialRecord> = rows.iter().map(|r| parse_trial(r)).collect();
    assert_eq!(back, recs);
    // Missing times are empty cells.
    assert_eq!(rows[2][3], "");
    assert_eq!(rows[2][4], "miss");
    assert_eq!(rows[0][1], "7.000001");
    // Every TrialRecord field has its column, `_us` times as `_s`.
    let fields = serde_json::to_value(&recs[0]).unwrap();
    let mut from_struct: Vec<String> = fields
        .as_object()
        .unwrap()
        .keys()
        .map(
            |k| match k.strip_prefix("t_").and_then(|r| r.strip_suffix("_us")) {
                Some(mid) => format!("t_{mid}_s"),
                None => k.clone(),
            },
        )
        .collect();
    let mut cols: Vec<String> = TRIALS_COLUMNS.iter().map(|c| c.to_string()).collect();
    from_struct.sort();
    cols.sort();
    assert_eq!(from_struct, cols);
    assert_eq!(w.trials_written(), 9);
}

#[test]
fn events_tsv_round_trips_and_escapes_text() {
    let root = Scratch::new("events");
    let mut w = new_writer(&root.0);
    let details = [
        "plain",
        "tab\there",
        "two\nlines\r\n",
        "\"quoted\" at the start",
        "back\\slash",
        "",
        "µs ünïcode",
    ];
    for (i, d) in details.iter().enumerate() {
        let t = i as u64 * 1_000_250;
        match i % 4 {
            0 => w.write_event(t, EventSource::Device, "lick", 1, d).unwrap(),
            1 => w
                .write_event(t, EventSource::Command, "valve_pulse", 41_250u32, d)
                .unwrap(),
            2 => w
                .write_event(t, EventSource::Task, "state", EventValue::None, d)
                .unwrap(),
            _ => w
                .write_event(t, EventSource::Link, "rtt_us", 123.25, d)
                .unwrap(),
        }
    }
    w.write_event(9_000_000, EventSource::Daemon, "nan\tkind", f64::NAN, "x")
        .unwrap();
    w.sync().unwrap();
    let (header, rows) = read_tsv(&w.path().join(EVENTS_FILE));
    assert_eq!(header, EVENTS_COLUMNS);
    assert_eq!(rows.len(), details.len() + 1);
    for (i, (row, d)) in rows.iter().zip(details).enumerate() {
        assert_eq!(s_to_us(&row[0]), i as u64 * 1_000_250);
        assert_eq!(unescape(&row[4]), d);
        assert!(!row[4].starts_with('"'));
    }
    assert_eq!(rows[0][1..4], ["device", "lick", "1"]);
    assert_eq!(rows[1][1..4], ["command", "valve_pulse", "41250"]);
    assert_eq!(rows[2][1..4], ["task", "state", ""]);
    assert_eq!(rows[3][1..4], ["link", "rtt_us", "123.25"]);
    assert_eq!(rows[7][1..4], ["daemon", "nan\\tkind", "NaN"]);
    assert_eq!(w.events_written(), 8);
}

#[test]
fn text_cells_and_times_format_exactly() {
    let mut s = String::new();
    put_us_as_s(&mut s, 0);
    s.push(' ');
    put_us_as_s(&mut s, 1_234_567);
    s.push(' ');
    put_us_as_s(&mut s, u64::MAX);
    assert_eq!(s, "0.000000 1.234567 18446744073709.551615");
    let mut e = String::new();
    put_escaped(&mut e, "\"a\tb\\\n");
    assert_eq!(e, "\\\"a\\tb\\\\\\n");
    assert_eq!(unescape(&e), "\"a\tb\\\n");
}

// ---- session.toml, summary, manifest ----------------------------------------------------

#[test]
fn session_toml_says_running_then_complete_with_summary_and_manifest() {
    let root = Scratch::new("meta");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    let t = session_toml(&dir);
    assert_eq!(t["state"].as_str(), Some("running"));
    assert_eq!(t["format_version"].as_integer(), Some(2));
    assert_eq!(t["mouse"].as_str(), Some("M12"));
    assert_eq!(t["rig"].as_str(), Some("rig7"));
    assert_eq!(t["software"].as_str(), Some("rigd"));
    assert_eq!(
        t["software_version"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(t["notes"].as_str(), Some("day 3, \"good\" mouse"));
    assert_eq!(t["start_utc"].as_str(), Some("2024-05-01T09:30:12.123456Z"));
    assert_eq!(t["t0_rig_us"].as_integer(), Some(5_000_000));
    assert_eq!(
        t["host_monotonic_start_ns"].as_integer(),
        Some(987_654_321_000)
    );
    assert!(t.get("stop_utc").is_none());
    assert!(t.get("clock_sync").is_none());
    // The config is embedded as a table and equals the effective config.
    let cfg: rig_config::RigConfig = t["config"].clone().try_into().unwrap();
    assert_eq!(cfg, rig_config::RigConfig::default());

    let fit = ClockSyncRecord {
        host_ref_us: 1.0e9,
        rig_ref_us: 5.0e6,
        drift_ppm: -12.5,
        half_band_us: 38.0,
        exchanges: 40,
        min_rtt_us: 210.0,
    };
    w.update_info(|i| i.clock_sync = Some(fit)).unwrap();
    let t = session_toml(&dir);
    assert_eq!(t["state"].as_str(), Some("running"));
    let back: ClockSyncRecord = t["clock_sync"].clone().try_into().unwrap();
    assert_eq!(back, fit);
    assert_eq!(w.info().clock_sync, Some(fit));
    assert!(w
        .update_info(|i| i.config_toml = "not = [toml".to_owned())
        .is_err());

    w.write_trial(&trial(1)).unwrap();
    std::fs::write(dir.join(LOG_FILE), "log line\n").unwrap();
    let summary = serde_json::json!({"trials": 1, "rewards": 1, "water_ul": 2.5});
    let stop = start_time() + Duration::from_secs(3600);
    let path = w.finish(stop, "rigctl stop", &summary).unwrap();
    assert_eq!(path, dir);
    let t = session_toml(&dir);
    assert_eq!(t["state"].as_str(), Some("complete"));
    assert_eq!(t["stop_utc"].as_str(), Some("2024-05-01T10:30:12.123456Z"));
    assert_eq!(t["stop_reason"].as_str(), Some("rigctl stop"));
    assert!(t.get("clock_sync").is_some());
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(s, summary);
    check_manifest(&dir);
    let manifest = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let names: Vec<&str> = manifest.lines().map(|l| &l[66..]).collect();
    assert_eq!(
        names,
        [
            EVENTS_FILE,
            LEVER_FILE,
            LOG_FILE,
            SESSION_FILE,
            SUMMARY_FILE,
            TRIALS_FILE
        ]
    );
    // No temporary files left behind.
    assert!(snapshot(&dir).iter().all(|(n, _)| !n.ends_with(TMP_SUFFIX)));
    assert!(find_running(&root.0).is_empty());
}

#[test]
fn a_bad_config_snapshot_is_refused_and_leaves_no_folder() {
    let root = Scratch::new("badcfg");
    let dir = SessionDir::create(&root.0, "M12", start_time()).unwrap();
    let path = dir.path().to_owned();
    let mut i = info();
    i.config_toml = "[task\nthreshold_mm = 1".to_owned();
    let err = SessionWriter::create(dir, i, Duration::from_secs(1), HOUR).unwrap_err();
    assert!(matches!(err, StorageError::ConfigSnapshot(_)), "{err}");
    assert!(!path.exists());
}

#[test]
fn manifest_verifies_with_sha256sum() {
    let root = Scratch::new("sha");
    let mut w = new_writer(&root.0);
    for i in 0..100u64 {
        w.write_lever(i * 1000, 0.5, 20).unwrap();
    }
    w.write_trial(&trial(2)).unwrap();
    let dir = w
        .finish(start_time(), "test", &serde_json::json!({}))
        .unwrap();
    check_manifest(&dir);
    match Command::new("sha256sum")
        .args(["-c", "--strict", MANIFEST_FILE])
        .current_dir(&dir)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "sha256sum -c: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let said = String::from_utf8_lossy(&out.stdout);
            assert_eq!(said.matches(": OK").count(), 5, "{said}");
        }
        Err(e) => println!("note: sha256sum not run ({e}); checked with our own hasher only"),
    }
}

// ---- cadence --------------------------------------------------------------------------

#[test]
fn maybe_sync_syncs_once_the_interval_has_passed() {
    let root = Scratch::new("cadence");
    let dir = SessionDir::create(&root.0, "M1", start_time()).unwrap();
    // Intervals over a second are capped at one second.
    let mut w = SessionWriter::create(dir, info(), Duration::from_secs(60), HOUR).unwrap();
    let path = w.path().join(LEVER_FILE);
    let t0 = Instant::now();
    assert!(!w.maybe_sync(t0).unwrap());
    w.write_lever(1, 0.0, 0).unwrap();
    assert!(!w.maybe_sync(t0 + Duration::from_millis(999)).unwrap());
    assert_eq!(read_npy_header(&path).unwrap().shape[0], 0);
    assert!(w.maybe_sync(t0 + Duration::from_millis(1000)).unwrap());
    assert_eq!(read_npy_header(&path).unwrap().shape[0], 1);
    assert!(!w.maybe_sync(t0 + Duration::from_millis(1500)).unwrap());
    assert!(w.maybe_sync(t0 + Duration::from_millis(2000)).unwrap());
}

// ---- crashes and recovery -------------------------------------------------------------

/// Write `n` trials, events and lever rows starting at index `from`.
fn write_some(w: &mut SessionWriter, from: u32, n: u32) {
    for i in from..from + n {
        w.write_trial(&trial(i + 1)).unwrap();
        w.write_event(u64::from(i) * 1000, EventSource::Device, "lick", 1, "")
            .unwrap();
        for k in 0..10u64 {
            let t = u64::from(i) * 10 + k;
            w.write_lever(t * 1000, t as f64, t as i64).unwrap();
        }
    }
}

#[test]
fn sigkill_loses_only_what_was_not_synced() {
    let root = Scratch::new("kill");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 20);
    w.sync().unwrap();
    write_some(&mut w, 20, 5); // still in the buffers
    w.simulate_kill();
    assert_eq!(find_running(&root.0), vec![dir.clone()]);

    let report = recover(&dir).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Recovered);
    assert!(report.summary_written);
    assert!(report.problems.is_empty(), "{report}");
    let (_, trials) = read_tsv(&dir.join(TRIALS_FILE));
    let back: Vec<TrialRecord> = trials.iter().map(|r| parse_trial(r)).collect();
    assert_eq!(back, (1..=20).map(trial).collect::<Vec<_>>());
    let (_, events) = read_tsv(&dir.join(EVENTS_FILE));
    assert_eq!(events.len(), 20);
    let (h, vals) = read_f8(&dir.join(LEVER_FILE));
    assert_eq!(h.shape, vec![200, 3]);
    assert_eq!(vals[199 * 3], 199.0 * 1000.0 / 1e6);
    assert_eq!(state(&dir), "recovered");
    let t = session_toml(&dir);
    assert!(t["recovered_utc"].as_str().unwrap().ends_with('Z'));
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    let rewards = (1..=20).filter(|n| n % 3 != 0).count();
    assert_eq!(s["trials"], 20);
    assert_eq!(s["rewards"], rewards);
    assert_eq!(s["water_ul"], rewards as f64 * 2.5);
    assert_eq!(s["source"], "recovery");
    check_manifest(&dir);
    assert!(find_running(&root.0).is_empty());
}

#[test]
fn half_written_rows_are_cut_and_headers_fixed() {
    let root = Scratch::new("partial");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    let ext = w.add_array("dff.npy", NpyDtype::F4, &[4]).unwrap();
    write_some(&mut w, 0, 10);
    w.array(ext).append(&[0.5f32; 8]).unwrap();
    w.sync().unwrap();
    write_some(&mut w, 10, 3);
    w.array(ext).append(&[0.25f32; 4]).unwrap();
    drop(w); // buffers reach the OS, but no sync: headers still say 100 rows

    // The crash also cut files mid-row / mid-line, and one file system left
    // zeros at the end of the events.
    let lever = dir.join(LEVER_FILE);
    let len = std::fs::metadata(&lever).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&lever)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(TRIALS_FILE))
        .unwrap();
    f.write_all(b"14\t98.000014\t99.5").unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(EVENTS_FILE))
        .unwrap();
    f.write_all(b"13.000000\tdevice\tli\0\0\0\0\0\0\0\0")
        .unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join("dff.npy"))
        .unwrap();
    f.write_all(&[1, 2, 3]).unwrap();
    assert_eq!(read_npy_header(&lever).unwrap().shape[0], 100);

    let report = recover(&dir).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Recovered);
    let text = report.to_string();
    for name in [
        LEVER_FILE,
        TRIALS_FILE,
        EVENTS_FILE,
        "dff.npy",
        SUMMARY_FILE,
    ] {
        assert!(text.contains(name), "{text}");
    }
    // Everything complete is kept (the 13 full trials, 129 full lever rows);
    // nothing half-written remains.
    let (_, trials) = read_tsv(&dir.join(TRIALS_FILE));
    assert_eq!(trials.len(), 13);
    let (_, events) = read_tsv(&dir.join(EVENTS_FILE));
    assert_eq!(events.len(), 13);
    let (h, vals) = read_f8(&lever);
    assert_eq!(h.shape, vec![129, 3]);
    assert_eq!(
        std::fs::metadata(&lever).unwrap().len(),
        h.data_offset + 129 * 24
    );
    assert_eq!(vals[128 * 3 + 1], 128.0);
    let h = read_npy_header(&dir.join("dff.npy")).unwrap();
    assert_eq!(h.shape, vec![3, 4]);
    assert_eq!(
        std::fs::metadata(dir.join("dff.npy")).unwrap().len(),
        h.data_offset + 3 * 16
    );
    let t = session_toml(&dir);
    assert_eq!(t["state"].as_str(), Some("recovered"));
    let recorded = t["recovery"].as_array().unwrap();
    assert_eq!(recorded.len(), report.repairs.len());
    check_manifest(&dir);
}

#[test]
fn zero_filled_tail_after_a_power_cut_is_dropped() {
    let root = Scratch::new("zeros");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    // A synced all-zero row is data and stays (t = 0, at rest, count 0).
    w.write_lever(0, 0.0, 0).unwrap();
    w.write_lever(1000, 0.5, 20).unwrap();
    w.sync().unwrap();
    w.write_lever(2000, 0.75, 30).unwrap();
    w.simulate_kill();
    // The file system extended the file with zeros for unwritten blocks.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(LEVER_FILE))
        .unwrap();
    f.write_all(&[1u8; 24]).unwrap(); // one unsynced row that did land
    f.write_all(&[0u8; 3 * 24 + 5]).unwrap();
    let report = recover(&dir).unwrap();
    let (h, vals) = read_f8(&dir.join(LEVER_FILE));
    assert_eq!(h.shape, vec![3, 3], "{report}");
    assert_eq!(&vals[..3], &[0.0, 0.0, 0.0]);
    assert!(
        report.to_string().contains("3 unsynced all-zero rows"),
        "{report}"
    );
    assert!(
        report.to_string().contains("partial last row (5 bytes)"),
        "{report}"
    );
}

#[test]
fn recovery_names_the_reserve_for_what_it_is() {
    let root = Scratch::new("reserve-name");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 3);
    w.simulate_kill();
    std::fs::write(dir.join(crate::RESERVE_FILE), [0u8; 64]).unwrap();
    std::fs::write(dir.join("session.toml.tmp"), b"half").unwrap();
    let report = recover(&dir).unwrap().to_string();
    assert!(
        report.contains(".rigd-reserve.tmp: removed the disk-space reserve"),
        "{report}"
    );
    assert!(
        report.contains("session.toml.tmp: removed an interrupted rewrite"),
        "{report}"
    );
    assert!(
        !report.contains("reserve.tmp: removed an interrupted"),
        "{report}"
    );
}

#[test]
fn recovery_is_idempotent_and_leaves_finished_sessions_alone() {
    let root = Scratch::new("idem");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 3);
    drop(w);
    recover(&dir).unwrap();
    let before = snapshot(&dir);
    let again = recover(&dir).unwrap();
    assert_eq!(again.outcome, RecoveryOutcome::AlreadyRecovered);
    assert!(again.repairs.is_empty());
    assert_eq!(snapshot(&dir), before);
    assert!(again.to_string().ends_with("already recovered"));

    let w = new_writer(&root.0);
    let dir = w
        .finish(start_time(), "done", &serde_json::json!({"trials": 0}))
        .unwrap();
    let before = snapshot(&dir);
    let r = recover(&dir).unwrap();
    assert_eq!(r.outcome, RecoveryOutcome::AlreadyComplete);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn recovery_keeps_or_replaces_the_summary() {
    let root = Scratch::new("summary");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 4);
    drop(w);
    let full = serde_json::json!({"trials": 4, "success_rate": 0.75});
    let mut saw_repaired = false;
    let report = recover_with_summary(&dir, |d| {
        // The callback sees the repaired files.
        saw_repaired = read_npy_header(&d.join(LEVER_FILE)).unwrap().shape[0] == 40;
        Some(full.clone())
    })
    .unwrap();
    assert!(saw_repaired);
    assert!(report.summary_written);
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(s, full);
    check_manifest(&dir);
}

#[test]
fn crash_inside_finish_is_recovered() {
    // finish() got as far as the manifest but not session.toml.
    let root = Scratch::new("midfinish");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 2);
    w.sync().unwrap();
    drop(w);
    std::fs::write(dir.join(SUMMARY_FILE), b"{\"trials\": 2}\n").unwrap();
    std::fs::write(dir.join(MANIFEST_FILE), b"stale\n").unwrap();
    std::fs::write(dir.join(format!("{SESSION_FILE}{TMP_SUFFIX}")), b"half").unwrap();
    // A key from a newer rigd survives recovery.
    let toml_text = std::fs::read_to_string(dir.join(SESSION_FILE)).unwrap();
    std::fs::write(
        dir.join(SESSION_FILE),
        format!("future_key = \"kept\"\n{toml_text}"),
    )
    .unwrap();
    let r = recover(&dir).unwrap();
    assert_eq!(session_toml(&dir)["future_key"].as_str(), Some("kept"));
    assert_eq!(r.outcome, RecoveryOutcome::Recovered);
    assert!(!r.summary_written, "an existing summary is kept");
    assert!(!dir.join(format!("{SESSION_FILE}{TMP_SUFFIX}")).exists());
    assert_eq!(
        std::fs::read(dir.join(SUMMARY_FILE)).unwrap(),
        b"{\"trials\": 2}\n"
    );
    check_manifest(&dir);
}

#[test]
fn recovery_refuses_what_is_not_a_stopped_session() {
    let root = Scratch::new("refuse");
    let err = recover(&root.0).unwrap_err();
    assert!(matches!(err, StorageError::NotASession { .. }));
    assert!(err.to_string().contains("has no session.toml"), "{err}");
    assert!(matches!(
        recover(&root.0.join("nope")).unwrap_err(),
        StorageError::NotASession { .. }
    ));
    std::fs::write(root.0.join(SESSION_FILE), "hello = 1\n").unwrap();
    let err = recover(&root.0).unwrap_err();
    assert!(matches!(err, StorageError::NotASession { .. }), "{err}");
    // A session being recorded right now is left alone.
    let w = new_writer(&root.0);
    let err = recover(w.path()).unwrap_err();
    assert!(err.to_string().contains("being recorded"), "{err}");
    assert_eq!(state(w.path()), "running");
}

#[test]
fn find_running_lists_only_running_sessions() {
    let root = Scratch::new("find");
    let a = new_writer(&root.0);
    let a_dir = a.path().to_owned();
    a.simulate_kill();
    let b = new_writer(&root.0);
    b.finish(start_time(), "done", &serde_json::json!({}))
        .unwrap();
    let dir = SessionDir::create(&root.0, "M99", start_time()).unwrap();
    let c = SessionWriter::create(dir, info(), Duration::from_secs(1), HOUR).unwrap();
    let c_dir = c.path().to_owned();
    drop(c);
    std::fs::create_dir_all(root.0.join("M5/not-a-session")).unwrap();
    std::fs::write(root.0.join("stray-file"), b"").unwrap();
    assert_eq!(find_running(&root.0), vec![a_dir.clone(), c_dir]);
    recover(&a_dir).unwrap();
    assert_eq!(find_running(&root.0).len(), 1);
    assert!(find_running(&root.0.join("missing")).is_empty());
}

// ---- disk errors ----------------------------------------------------------------------

#[test]
fn disk_full_names_the_file_and_leaves_the_session_recoverable() {
    if !has_dev_full() {
        println!("note: no writable /dev/full; disk-full test skipped");
        return;
    }
    let root = Scratch::new("full");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 5);
    w.sync().unwrap();
    let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    w.trials_file_for_test().replace_file_for_test(full);
    w.write_trial(&trial(6)).unwrap(); // buffered
    let err = w.sync().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&*dir.join(TRIALS_FILE).to_string_lossy()),
        "{msg}"
    );
    assert!(msg.contains("os error 28"), "{msg}");
    assert!(msg.contains("disk is full"), "{msg}");
    // The file takes nothing more; the others carry on.
    let err = w.write_trial(&trial(7)).unwrap_err();
    assert!(matches!(err, StorageError::FileClosed { .. }), "{err}");
    w.write_lever(1, 0.0, 0).unwrap();
    // finish() fails naming the file, and the state stays `running`.
    let err = w
        .finish(start_time(), "stop", &serde_json::json!({}))
        .unwrap_err();
    assert!(err.to_string().contains(TRIALS_FILE), "{err}");
    assert_eq!(state(&dir), "running");
    assert!(!dir.join(MANIFEST_FILE).exists());
    assert!(snapshot(&dir).iter().all(|(n, _)| !n.ends_with(TMP_SUFFIX)));
    // Recovery keeps everything synced before the failure.
    recover(&dir).unwrap();
    let (_, trials) = read_tsv(&dir.join(TRIALS_FILE));
    assert_eq!(trials.len(), 5);
    assert_eq!(read_npy_header(&dir.join(LEVER_FILE)).unwrap().shape[0], 51);
}

#[test]
fn abort_after_a_disk_error_marks_the_session_recovered() {
    if !has_dev_full() {
        println!("note: no writable /dev/full; abort test skipped");
        return;
    }
    let root = Scratch::new("abort");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 3);
    w.sync().unwrap();
    let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    w.lever_for_test().replace_file_for_test(full);
    write_some(&mut w, 3, 1);
    assert!(w.sync().is_err());
    let stop = start_time() + Duration::from_secs(60);
    let report = w.abort(stop, "disk error on lever.npy", None).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Recovered);
    assert!(
        report.problems.iter().any(|p| p.contains(LEVER_FILE)),
        "{report}"
    );
    let t = session_toml(&dir);
    assert_eq!(t["state"].as_str(), Some("recovered"));
    assert_eq!(t["stop_reason"].as_str(), Some("disk error on lever.npy"));
    assert_eq!(t["stop_utc"].as_str(), Some("2024-05-01T09:31:12.123456Z"));
    // The trial and event written after the last sync were synced by abort.
    assert_eq!(read_tsv(&dir.join(TRIALS_FILE)).1.len(), 4);
    assert_eq!(read_npy_header(&dir.join(LEVER_FILE)).unwrap().shape[0], 30);
    check_manifest(&dir);
}

// ---- a real reader ----------------------------------------------------------------------

#[test]
fn numpy_loads_the_session_files() {
    let has_numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_numpy {
        println!("note: python3 with numpy not available; numpy check skipped");
        return;
    }
    let root = Scratch::new("numpy");
    let mut w = new_writer(&root.0);
    let frames = w.add_array("frames.npy", NpyDtype::U2, &[2, 3, 4]).unwrap();
    write_some(&mut w, 0, 7);
    w.array(frames)
        .append(&(0..48u16).collect::<Vec<_>>())
        .unwrap();
    w.sync().unwrap();
    write_some(&mut w, 7, 1);
    let dir = w.path().to_owned();
    // Loadable mid-session, after a sync (the unsynced row is not declared).
    let script = r#"
import sys, csv, json, numpy as np
d, mid = sys.argv[1], sys.argv[2] == "mid"
lever = np.load(d + "/lever.npy")
assert lever.dtype == np.float64 and lever.shape == ((70, 3) if mid else (80, 3)), lever.shape
assert lever[69, 0] == 0.069 and lever[69, 1] == 69.0, lever[69]
f = np.load(d + "/frames.npy")
assert f.dtype == np.uint16 and f.shape == (2, 2, 3, 4) and f[1, 1, 2, 3] == 47, f.shape
with open(d + "/trials.tsv", newline="") as fh:
    rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
assert len(rows) == (7 if mid else 8) and rows[0]["outcome"] == "rewarded", rows[0]
if not mid:
    import tomllib
    meta = tomllib.load(open(d + "/session.toml", "rb"))
    assert meta["state"] == "complete" and meta["config"]["rig"]["name"] == "rig1", meta["state"]
print("numpy ok")
"#;
    let run = |phase: &str| {
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(&dir)
            .arg(phase)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python ({phase}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("mid");
    w.finish(start_time(), "done", &serde_json::json!({}))
        .unwrap();
    run("end");
}

// ---- chunks ----------------------------------------------------------------------

/// A writer whose streams roll every `chunk` of session time.
fn chunked_writer(root: &Path, chunk: Duration) -> SessionWriter {
    let dir = SessionDir::create(root, "M12", start_time()).unwrap();
    SessionWriter::create(dir, info(), Duration::from_millis(1000), chunk).unwrap()
}

/// All rows of a stream's chunks, in order, each chunk checked complete.
fn read_stream_f8(dir: &Path, files: &[String]) -> Vec<Vec<f64>> {
    files
        .iter()
        .map(|f| {
            let path = dir.join(f);
            let (h, vals) = read_f8(&path);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                h.data_offset + h.shape[0] * h.row_bytes().unwrap(),
                "{f}: header declares every row in the file"
            );
            vals
        })
        .collect()
}

#[test]
fn every_stream_rolls_into_chunks_at_multiples_of_the_chunk_length() {
    let root = Scratch::new("chunks");
    // One-second chunks; 1 kHz lever for 3.5 s; a "frame" every 100 ms
    // with two row-aligned extra arrays.
    let mut w = chunked_writer(&root.0, Duration::from_secs(1));
    let dir = w.path().to_owned();
    let f = w.add_array("f.npy", NpyDtype::F8, &[2]).unwrap();
    let dff = w.add_array("dff.npy", NpyDtype::F8, &[2]).unwrap();
    for n in 0..3500u64 {
        let t_us = n * 1000 + 250;
        w.write_lever(t_us, n as f64 * 0.01, n as i64).unwrap();
        if n % 100 == 0 {
            let rolled = w.arrays_at(t_us).unwrap();
            assert_eq!(rolled, n > 0 && n % 1000 == 0, "frame at {t_us} µs");
            let frame = n as f64 / 100.0;
            w.array(f).append(&[frame, -frame]).unwrap();
            w.array(dff).append(&[frame * 2.0, 0.5]).unwrap();
        }
        if n % 300 == 0 {
            w.maybe_sync(Instant::now() + Duration::from_secs(n))
                .unwrap();
        }
    }
    assert_eq!(w.lever_rows(), 3500);
    assert_eq!(w.lever_files().len(), 4);
    assert_eq!(w.array(f).rows(), 35);
    // While running, session.toml lists the chunks made so far.
    let running = session_toml(&dir);
    let listed = running["chunks"]["lever"].as_array().unwrap();
    assert_eq!(listed.len(), 4);
    let trace = {
        w.sync().unwrap();
        read_lever_trace(&dir, 5_000_000).unwrap()
    };
    let dir = w
        .finish(start_time(), "done", &serde_json::json!({"trials": 0}))
        .unwrap();

    let lever_files = [
        "lever.npy",
        "lever.001.npy",
        "lever.002.npy",
        "lever.003.npy",
    ];
    let chunks = read_stream_f8(&dir, &lever_files.map(str::to_owned));
    let mut all = Vec::new();
    for (k, vals) in chunks.iter().enumerate() {
        let times: Vec<f64> = vals.chunks_exact(3).map(|r| r[0]).collect();
        assert_eq!(times.len(), if k < 3 { 1000 } else { 500 }, "chunk {k}");
        // Each chunk holds exactly the samples of its second.
        assert!(times.iter().all(|&t| t >= k as f64 && t < (k + 1) as f64));
        all.extend(vals.chunks_exact(3).map(|r| (r[0], r[1], r[2])));
    }
    // Concatenated: every sample once, in order.
    assert_eq!(all.len(), 3500);
    for (n, &(t, mm, raw)) in all.iter().enumerate() {
        assert_eq!(t, (n as u64 * 1000 + 250) as f64 / 1e6);
        assert_eq!(mm, n as f64 * 0.01);
        assert_eq!(raw, n as f64);
    }
    // The lever read back for the summary: rig µs exactly, in order.
    assert_eq!(trace.len(), 3500);
    for (n, &(t, mm)) in trace.iter().enumerate() {
        assert_eq!(t, 5_000_000 + n as u64 * 1000 + 250);
        assert_eq!(mm, n as f64 * 0.01);
    }
    // The extra arrays rolled together, on the same frame.
    for name in ["f", "dff"] {
        let files: Vec<String> = (0..4)
            .map(|n| chunk_file_name(&format!("{name}.npy"), n))
            .collect();
        let rows: Vec<usize> = read_stream_f8(&dir, &files)
            .iter()
            .map(|v| v.len() / 2)
            .collect();
        assert_eq!(rows, vec![10, 10, 10, 5], "{name}");
    }
    let f_all: Vec<f64> = read_stream_f8(
        &dir,
        &(0..4)
            .map(|n| chunk_file_name("f.npy", n))
            .collect::<Vec<_>>(),
    )
    .concat();
    assert_eq!(f_all.len(), 70);
    assert!(f_all
        .chunks_exact(2)
        .enumerate()
        .all(|(i, r)| r[0] == i as f64));
    // session.toml lists every stream's chunks in order; the manifest covers them.
    let t = session_toml(&dir);
    let listed: Vec<&str> = t["chunks"]["lever"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, lever_files);
    assert_eq!(t["chunks"]["dff"].as_array().unwrap().len(), 4);
    assert_eq!(
        t["chunks"]["f"].as_array().unwrap()[3].as_str(),
        Some("f.003.npy")
    );
    let manifest = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    for f in lever_files {
        assert!(
            manifest.contains(&format!("  {f}\n")),
            "{f} in the manifest"
        );
    }
    check_manifest(&dir);
    // A chunk-like name cannot be registered as a stream of its own.
    let mut w = chunked_writer(&root.0, Duration::from_secs(1));
    let err = w.add_array("x.001.npy", NpyDtype::F4, &[1]).unwrap_err();
    assert!(err.to_string().contains("chunk name"), "{err}");
}

#[test]
fn a_short_session_keeps_plain_names_only() {
    let root = Scratch::new("onechunk");
    let mut w = chunked_writer(&root.0, Duration::from_secs(60));
    for n in 0..2000u64 {
        w.write_lever(n * 1000, 0.0, 0).unwrap();
    }
    let dir = w
        .finish(start_time(), "done", &serde_json::json!({}))
        .unwrap();
    let npys: Vec<String> = snapshot(&dir)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".npy"))
        .collect();
    assert_eq!(npys, vec![LEVER_FILE.to_owned()]);
    let t = session_toml(&dir);
    assert_eq!(t["chunks"]["lever"].as_array().unwrap().len(), 1);
}

#[test]
fn recovery_repairs_every_chunk_of_a_session_killed_mid_chunk() {
    let root = Scratch::new("chunkcrash");
    let mut w = chunked_writer(&root.0, Duration::from_secs(1));
    let dir = w.path().to_owned();
    let dff = w.add_array("dff.npy", NpyDtype::F4, &[4]).unwrap();
    for i in 0..5u32 {
        w.write_trial(&trial(i + 1)).unwrap();
    }
    // 2.5 s of lever and frames, synced; then 0.3 s more, never synced.
    let write = |w: &mut SessionWriter, from: u64, to: u64| {
        for n in from..to {
            let t_us = n * 1000;
            w.write_lever(t_us, n as f64, n as i64).unwrap();
            if n % 50 == 0 {
                w.arrays_at(t_us).unwrap();
                w.array(dff).append(&[n as f32; 4]).unwrap();
            }
        }
    };
    write(&mut w, 0, 2500);
    w.sync().unwrap();
    write(&mut w, 2500, 2800);
    // The buffers reach the OS (as after a crash of rigd), headers unsynced.
    w.lever_for_test().flush().unwrap();
    let closed: Vec<(String, Vec<u8>)> = snapshot(&dir)
        .into_iter()
        .filter(|(n, _)| {
            ["lever.npy", "lever.001.npy", "dff.npy", "dff.001.npy"].contains(&n.as_str())
        })
        .collect();
    assert_eq!(closed.len(), 4);
    drop(w);
    // The crash also cut the open chunk mid-row, and came while the next
    // chunk was being started (its header never reached the disk).
    let open = dir.join("lever.002.npy");
    let len = std::fs::metadata(&open).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&open)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert_eq!(read_npy_header(&open).unwrap().shape[0], 500);
    std::fs::write(dir.join("lever.003.npy"), b"").unwrap();
    std::fs::write(dir.join("dff.003.npy"), b"\x93NUMPY\x01\x00").unwrap();

    let report = recover(&dir).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Recovered);
    assert!(report.problems.is_empty(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("lever.002.npy: dropped a partial last row"),
        "{text}"
    );
    assert!(
        text.contains("lever.002.npy: dropped a partial last row (14 bytes)"),
        "{text}"
    );
    assert!(
        text.contains("lever.003.npy: removed a chunk file"),
        "{text}"
    );
    assert!(text.contains("dff.003.npy: removed a chunk file"), "{text}");
    assert!(text.contains("dff.002.npy"), "{text}");
    // The closed chunks are untouched.
    for (name, bytes) in &closed {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    // The open chunk keeps every complete row that reached the OS.
    let (h, vals) = read_f8(&open);
    assert_eq!(h.shape, vec![799, 3]);
    assert_eq!(vals[798 * 3], 2.798);
    // Together: 0 .. 2.798 s, every sample once.
    let trace = read_lever_trace(&dir, 0).unwrap();
    assert_eq!(trace.len(), 2799);
    assert!(trace
        .iter()
        .enumerate()
        .all(|(n, &(t, _))| t == n as u64 * 1000));
    let h = read_npy_header(&dir.join("dff.002.npy")).unwrap();
    assert_eq!(h.shape, vec![16, 4]);
    // session.toml lists what is left; the manifest covers it; the summary
    // has the day's water.
    let t = session_toml(&dir);
    let lever: Vec<&str> = t["chunks"]["lever"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(lever, ["lever.npy", "lever.001.npy", "lever.002.npy"]);
    assert_eq!(t["chunks"]["dff"].as_array().unwrap().len(), 3);
    check_manifest(&dir);
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    let rewards = (1..=5).filter(|n| n % 3 != 0).count();
    assert_eq!(s["water_ul"], rewards as f64 * 2.5);
}

#[test]
fn trials_read_back_equal_the_trials_written_aborted_included() {
    let root = Scratch::new("readback");
    let mut w = new_writer(&root.0);
    let mut written: Vec<TrialRecord> = (1..=9).map(trial).collect();
    written[4].outcome = Outcome::Aborted;
    written[4].t_response_us = None;
    for r in &written {
        w.write_trial(r).unwrap();
    }
    w.sync().unwrap();
    let (back, skipped) = super::read_trials(&w.path().join(super::TRIALS_FILE)).unwrap();
    assert_eq!(skipped, 0);
    assert_eq!(back, written);
}

#[test]
fn qc_reads_losses_faults_stamps_and_latency_from_the_files() {
    let root = Scratch::new("qc");
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 6);
    w.write_event(5_000, EventSource::Link, "sample_gap", 30, "")
        .unwrap();
    w.write_event(6_000, EventSource::Link, "sample_gap", 12, "")
        .unwrap();
    w.write_event(7_000, EventSource::Link, "connected", 1, "reconnect=1")
        .unwrap();
    w.write_event(
        8_000,
        EventSource::Device,
        "fault",
        3,
        "Fault { code: WatchdogTripped, detail: 1200 }",
    )
    .unwrap();
    w.write_event(9_000, EventSource::Daemon, "storage_dropped", 4, "")
        .unwrap();
    w.write_event(9_500, EventSource::Daemon, "producer_stale", 1, "")
        .unwrap();
    w.write_event(
        9_600,
        EventSource::Daemon,
        "producer_anomaly",
        1,
        "number_back: frame 9 after 12 (1 so far)",
    )
    .unwrap();
    w.write_event(
        9_700,
        EventSource::Daemon,
        "producer_anomaly",
        6,
        "number_back: 7 so far",
    )
    .unwrap();
    w.write_event(9_800, EventSource::Daemon, "imaging_qc", 100, "frames=100")
        .unwrap();
    w.write_event(
        9_900,
        EventSource::Link,
        "device_time_backward",
        1,
        "count=1 offset_us=-3000000",
    )
    .unwrap();
    w.write_event(
        9_950,
        EventSource::Link,
        "device_clock_rate",
        5.0,
        "host_heartbeat_us=4000 watchdog_fed=true",
    )
    .unwrap();
    w.write_event(
        0,
        EventSource::Daemon,
        "device_time_anomalies",
        3,
        "kind=device_time_backward total",
    )
    .unwrap();
    w.write_event(100_000, EventSource::Device, "frame_ttl", 1, "")
        .unwrap();
    w.write_event(200_000, EventSource::Device, "frame_ttl", 1, "")
        .unwrap();
    w.sync().unwrap();
    // frames.tsv as the imaging ingest writes it: a drop and a stamp that
    // goes back.
    std::fs::write(
        dir.join(crate::FRAMES_FILE),
        "index\tframe\tt_s\tsource\tdropped\n0\t0\t0.05\tttl\t0\n0\t1\t0.1\tttl\t0\n1\t2\t0.2\tttl\t0\n\
         2\t3\t\t\t1\n3\t4\t0.15\tmapped\t0\n4\t5\t0.3\tttl\t0\n",
    )
    .unwrap();
    let qc = crate::Qc::compute(&dir).unwrap();
    assert_eq!(qc.lever.samples, 60);
    assert_eq!(qc.lever.first_sample_s, Some(0.0));
    assert_eq!((qc.lever.gaps, qc.lever.samples_lost), (2, 42));
    assert_eq!(qc.watchdog_trips, 1);
    assert_eq!(qc.device_faults.get("watchdog_tripped"), Some(&1));
    assert_eq!(qc.storage_dropped, 4);
    assert_eq!(qc.anomalies.get("sample_gap"), Some(&2));
    assert_eq!(qc.anomalies.get("producer_stale"), Some(&1));
    assert!(!qc.anomalies.contains_key("connected"));
    assert!(!qc.anomalies.contains_key("imaging_qc"));
    assert_eq!(qc.anomalies.get("producer_anomaly:number_back"), Some(&7));
    // The rate-limited device-time rows are not counted; their total is.
    assert_eq!(qc.anomalies.get("device_time_backward"), Some(&3));
    assert_eq!(qc.device_clock_rate, Some(5.0));
    let f = qc.frames.as_ref().unwrap();
    assert_eq!((f.rows, f.dropped, f.stamps_not_increasing), (6, 1, 1));
    assert_eq!(f.by_source.get("ttl"), Some(&4));
    assert!((f.ttl_pct - 80.0).abs() < 1e-9);
    // 0.1 and 0.2 s are edges; 0.05 s is before the first; 0.3 s is none.
    assert_eq!(
        (f.ttl_on_an_edge, f.ttl_unverifiable, f.ttl_not_on_an_edge),
        (2, 1, 1)
    );
    // Rewarded trials: response 1.812345 s -> reward 1.812845 s after start.
    assert_eq!(qc.decision_latency.count, 4);
    assert_eq!(qc.decision_latency.p50_us, Some(500.0));
    assert_eq!(qc.decision_latency.max_us, Some(500.0));
    assert!(!qc.clean);
    // A session with nothing wrong is clean.
    let mut w = new_writer(&root.0);
    let dir = w.path().to_owned();
    write_some(&mut w, 0, 3);
    w.sync().unwrap();
    let qc = crate::Qc::compute(&dir).unwrap();
    assert!(qc.clean, "{qc:?}");
    assert!(qc.frames.is_none());
}
