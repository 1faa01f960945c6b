use std::path::PathBuf;
use std::time::{Duration, Instant};

use protocol::ring::{PixelType, PollOutcome, RingGeometry, RingReader, RingRegion, RingWriter};

use super::files::{FrameRow, MicroscopeTruth};
use super::live::{FrameSink, FrameTick, LiveMicroscope};
use super::{Microscope, MicroscopeSpec};

const RATE: f64 = 28.7;

fn small(seed: u64) -> MicroscopeSpec {
    let mut s = MicroscopeSpec::new(128, 128);
    s.neurons = 60;
    s.seed = seed;
    s
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("microscope-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn render_run(
    spec: &MicroscopeSpec,
    frames: u64,
    presses: &[f64],
) -> (Vec<Vec<u16>>, Vec<Vec<f32>>) {
    let mut m = Microscope::new(spec.clone()).expect("spec");
    for &p in presses {
        m.add_press(p);
    }
    let mut out = Vec::new();
    let mut dffs = Vec::new();
    for k in 0..frames {
        let mut px = vec![0u16; m.frame_pixels()];
        let mut dff = vec![0f32; m.neurons().len()];
        m.render(k, k as f64 / RATE, &mut px, &mut dff);
        out.push(px);
        dffs.push(dff);
    }
    (out, dffs)
}

#[test]
fn render_is_deterministic() {
    let mut spec = small(7);
    spec.channels = 2;
    let presses = [0.5, 2.0, 3.1];
    let (a, da) = render_run(&spec, 40, &presses);
    let (b, db) = render_run(&spec, 40, &presses);
    assert!(a == b && da == db, "same seed, same frames");
    // The press order relative to rendering does not matter (within the
    // lookahead): add the presses one by one as the frames go by.
    let mut m = Microscope::new(spec.clone()).expect("spec");
    let mut next = 0;
    for k in 0..40u64 {
        let t = k as f64 / RATE;
        while next < presses.len() && presses[next] - spec.lookahead_s() <= t {
            m.add_press(presses[next]);
            next += 1;
        }
        let mut px = vec![0u16; m.frame_pixels()];
        let mut dff = vec![0f32; m.neurons().len()];
        m.render(k, t, &mut px, &mut dff);
        assert_eq!(px, a[k as usize], "frame {k}");
    }
    let (c, _) = render_run(&small(8), 3, &presses);
    assert_ne!(
        a[..3].iter().map(|f| &f[..128 * 128]).collect::<Vec<_>>(),
        c.iter().map(|f| &f[..]).collect::<Vec<_>>()
    );
    // Channel 2 is bright where the inhibitory neurons are.
    let m = Microscope::new(spec).expect("spec");
    let plane = 128 * 128;
    let (mut inh, mut exc, mut ni, mut ne) = (0.0, 0.0, 0, 0);
    for (p, &l) in m.labels().iter().enumerate() {
        if l == 0 {
            continue;
        }
        let red = f64::from(a[0][plane + p]);
        if m.neurons()[usize::from(l) - 1].inhibitory {
            inh += red;
            ni += 1;
        } else {
            exc += red;
            ne += 1;
        }
    }
    assert!(ni > 0 && ne > 0);
    assert!(
        inh / ni as f64 > 1.5 * exc / ne as f64,
        "red in inhibitory neurons"
    );
}

#[test]
fn labels_agree_with_footprints() {
    for (w, h, n) in [(512, 512, 200), (128, 96, 60)] {
        let mut spec = MicroscopeSpec::new(w, h).clean();
        spec.neurons = n;
        let m = Microscope::new(spec).expect("spec");
        assert_eq!(m.neurons().len(), n);
        assert_eq!(m.labels().len(), (w * h) as usize);
        let mut px = vec![0u16; m.frame_pixels()];
        let mut dff = vec![0f32; n];
        m.clone().render(0, 0.0, &mut px, &mut dff);
        let offset = m.spec().offset as u16;
        for nrn in m.neurons() {
            let (mut cnt, mut sx, mut sy) = (0usize, 0.0, 0.0);
            for (p, &l) in m.labels().iter().enumerate() {
                if l == nrn.id {
                    cnt += 1;
                    sx += (p % w as usize) as f64;
                    sy += (p / w as usize) as f64;
                    // Every labelled pixel is lit by its neuron.
                    assert!(px[p] > offset, "label {} at {p} is dark", nrn.id);
                }
            }
            assert!(cnt >= 3, "neuron {} has {cnt} label pixels", nrn.id);
            let area = std::f64::consts::PI * nrn.radius * nrn.radius;
            assert!(
                (cnt as f64) < 2.0 * area + 4.0 && (cnt as f64) > 0.4 * area,
                "neuron {}: {cnt} px for radius {}",
                nrn.id,
                nrn.radius
            );
            let (cx, cy) = (sx / cnt as f64, sy / cnt as f64);
            assert!(
                (cx - nrn.x).hypot(cy - nrn.y) < 0.5 * nrn.radius + 0.5,
                "neuron {}: centroid ({cx:.1}, {cy:.1}) vs ({:.1}, {:.1})",
                nrn.id,
                nrn.x,
                nrn.y
            );
        }
        // Background is dark (no neuropil in a clean spec).
        let bg = m
            .labels()
            .iter()
            .zip(&px)
            .filter(|(&l, &v)| l == 0 && v > offset + 20)
            .count();
        assert!(bg < (w * h) as usize / 4, "{bg} bright background pixels");
    }
    // Radii scale with the frame.
    let big = Microscope::new(MicroscopeSpec::new(512, 512)).expect("spec");
    let r: f64 = big.neurons().iter().map(|n| n.radius).sum::<f64>() / 200.0;
    assert!((5.0..7.5).contains(&r), "{r}");
    let lags: Vec<f64> = big
        .neurons()
        .iter()
        .filter_map(|n| n.preferred_lag_s)
        .collect();
    assert!(lags.iter().all(|l| (-0.2..=1.5).contains(l)));
    let frac = lags.len() as f64 / 200.0;
    assert!((0.2..0.4).contains(&frac), "movement fraction {frac}");
    let inh = big.neurons().iter().filter(|n| n.inhibitory).count() as f64 / 200.0;
    assert!((0.08..0.25).contains(&inh), "inhibitory fraction {inh}");
}

#[test]
fn noiseless_footprint_average_recovers_the_true_dff() {
    let spec = small(3).clean();
    let presses: Vec<f64> = (0..6).map(|i| 0.5 + 1.5 * f64::from(i)).collect();
    let (frames, dffs) = render_run(&spec, 300, &presses);
    let m = Microscope::new(spec.clone()).expect("spec");
    let offset = spec.offset;
    // Frame 0 is at t = 0, before any spike: the baseline F0.
    assert!(dffs[0].iter().all(|&d| d == 0.0));
    let f0 = &frames[0];
    let n = m.neurons().len();
    let mut worst: f64 = 0.0;
    let mut active = 0;
    for (frame, dff) in frames.iter().zip(&dffs) {
        for (k, &truth) in dff.iter().enumerate().take(n) {
            let id = (k + 1) as u16;
            let (mut num, mut den) = (0.0, 0.0);
            for (p, &l) in m.labels().iter().enumerate() {
                if l == id {
                    num += f64::from(frame[p]) - f64::from(f0[p]);
                    den += f64::from(f0[p]) - offset;
                }
            }
            let est = num / den;
            let truth = f64::from(truth);
            if truth > 0.1 {
                active += 1;
            }
            let err = (est - truth).abs() / (0.02 + 0.05 * truth.abs());
            worst = worst.max(err);
            assert!(
                err <= 1.0,
                "neuron {id}: estimated dF/F {est:.4}, true {truth:.4}"
            );
        }
    }
    assert!(active > 100, "only {active} active neuron-frames");
    eprintln!("worst error / tolerance: {worst:.3}");
}

/// Mean over movement neurons of the mean pairwise Pearson r between
/// press-aligned dF/F traces (-0.5..2 s); flat traces count as r = 0.
fn press_locking(day: u8) -> f64 {
    let mut spec = MicroscopeSpec::new(128, 128);
    spec.day = day;
    spec.seed = 11;
    let mut m = Microscope::new(spec).expect("spec");
    let presses: Vec<f64> = (0..30).map(|i| 5.0 + 6.0 * f64::from(i)).collect();
    for &p in &presses {
        m.add_press(p);
    }
    let n = m.neurons().len();
    let frames = (190.0 * RATE) as usize;
    let mut dff = vec![0f32; n];
    let mut traces = vec![Vec::with_capacity(frames); n];
    for k in 0..frames {
        m.truth_at(k as f64 / RATE, &mut dff);
        for (t, &d) in traces.iter_mut().zip(&dff) {
            t.push(f64::from(d));
        }
    }
    let (pre, post) = ((0.5 * RATE) as usize, (2.0 * RATE) as usize);
    let mut scores = Vec::new();
    for (k, nrn) in m.neurons().iter().enumerate() {
        if !nrn.movement_related {
            continue;
        }
        let trials: Vec<&[f64]> = presses
            .iter()
            .map(|&p| {
                let c = (p * RATE).round() as usize;
                &traces[k][c - pre..c + post]
            })
            .collect();
        let mut sum = 0.0;
        let mut pairs = 0;
        for i in 0..trials.len() {
            for j in i + 1..trials.len() {
                sum += pearson(trials[i], trials[j]);
                pairs += 1;
            }
        }
        scores.push(sum / f64::from(pairs));
    }
    scores.iter().sum::<f64>() / scores.len() as f64
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa < 1e-12 || sbb < 1e-12 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

#[test]
fn expert_movement_neurons_are_more_press_locked() {
    let naive = press_locking(1);
    let mid = press_locking(7);
    let expert = press_locking(14);
    eprintln!("trial-to-trial r: day 1 {naive:.3}, day 7 {mid:.3}, day 14 {expert:.3}");
    assert!(
        expert > naive + 0.2,
        "day 14 {expert:.3} vs day 1 {naive:.3}"
    );
    assert!(mid > naive && expert > mid);
    assert!(expert > 0.4);
}

#[test]
fn motion_is_smooth_and_bounded() {
    let spec = MicroscopeSpec::new(512, 512);
    assert_eq!(spec.motion_px, 2.0);
    let mut m = Microscope::new(spec.clone()).expect("spec");
    for i in 0..100 {
        m.add_press(3.0 + 5.0 * f64::from(i));
    }
    let mut prev = m.shift_at(0.0);
    let (mut sum2, mut count) = (0.0, 0);
    for k in 1..(500.0 * RATE) as usize {
        let (x, y) = m.shift_at(k as f64 / RATE);
        assert!(x.abs() <= spec.motion_px && y.abs() <= spec.motion_px);
        let step = (x - prev.0).hypot(y - prev.1);
        assert!(step < 0.15, "jump of {step} px at frame {k}");
        prev = (x, y);
        sum2 += x * x + y * y;
        count += 1;
    }
    let rms = (sum2 / f64::from(count)).sqrt();
    assert!(rms > 0.3, "the brain hardly moves: rms {rms}");
    // No motion when switched off.
    let still = Microscope::new(spec.clean()).expect("spec");
    assert_eq!(still.shift_at(12.3), (0.0, 0.0));
}

#[test]
fn rendered_frames_are_shifted_by_the_true_shift() {
    let mut moving = small(5).clean();
    moving.motion_px = 3.0;
    let mut still = moving.clone();
    still.motion_px = 0.0;
    let mut a = Microscope::new(moving).expect("spec");
    let mut b = Microscope::new(still).expect("spec");
    assert_eq!(a.neurons(), b.neurons());
    let mut pa = vec![0u16; a.frame_pixels()];
    let mut pb = vec![0u16; b.frame_pixels()];
    let mut dff = vec![0f32; a.neurons().len()];
    for t in [3.0, 17.0, 40.0, 77.7] {
        let sh = a.render(0, t, &mut pa, &mut dff);
        b.render(0, t, &mut pb, &mut dff);
        assert!(sh.shift_x_px.hypot(sh.shift_y_px) > 0.2, "t={t}: {sh:?}");
        // The moving frame is the still one shifted by the true shift
        // (bilinear), to within the rounding of both to counts.
        let err = |sx: f64, sy: f64| {
            let mut worst: f64 = 0.0;
            for y in 8..120usize {
                for x in 8..120usize {
                    let (fx, fy) = (x as f64 - sx, y as f64 - sy);
                    let (ix, iy) = (fx.floor() as usize, fy.floor() as usize);
                    let (ax, ay) = (fx - fx.floor(), fy - fy.floor());
                    let v = |xx: usize, yy: usize| f64::from(pb[yy * 128 + xx]);
                    let want = (1.0 - ax) * (1.0 - ay) * v(ix, iy)
                        + ax * (1.0 - ay) * v(ix + 1, iy)
                        + (1.0 - ax) * ay * v(ix, iy + 1)
                        + ax * ay * v(ix + 1, iy + 1);
                    worst = worst.max((f64::from(pa[y * 128 + x]) - want).abs());
                }
            }
            worst
        };
        let right = err(sh.shift_x_px, sh.shift_y_px);
        let wrong = err(sh.shift_x_px + 0.5, sh.shift_y_px - 0.5);
        assert!(
            right <= 1.01,
            "t={t}: {right} counts off with the true shift"
        );
        assert!(
            wrong > 20.0 * right.max(1.0),
            "t={t}: a wrong shift fits too ({wrong})"
        );
    }
}

#[test]
fn render_speed() {
    for (w, h, frames) in [(128u32, 128u32, 20u64), (512, 512, 5)] {
        let mut spec = MicroscopeSpec::new(w, h);
        spec.channels = 1;
        let mut m = Microscope::new(spec).expect("spec");
        for i in 0..20 {
            m.add_press(0.2 * f64::from(i));
        }
        let mut px = vec![0u16; m.frame_pixels()];
        let mut dff = vec![0f32; m.neurons().len()];
        let t0 = Instant::now();
        for k in 0..frames {
            m.render(k, 1.0 + k as f64 / RATE, &mut px, &mut dff);
        }
        let per = t0.elapsed() / frames as u32;
        eprintln!(
            "render {w}x{h}: {:.2} ms per frame",
            per.as_secs_f64() * 1e3
        );
        if w == 128 {
            assert!(per < Duration::from_millis(35), "{per:?} per 128x128 frame");
        } else {
            assert!(per < Duration::from_secs(2), "{per:?} per 512x512 frame");
        }
    }
}

fn npy_shape(bytes: &[u8]) -> (usize, usize) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hl = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + hl]).expect("ascii");
    assert_eq!((10 + hl) % 64, 0, "aligned");
    assert!(header.ends_with('\n'));
    let shape = &header[header.find("'shape': (").expect("shape") + 10..];
    let shape = &shape[..shape.find(')').expect("close")];
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("dim"))
        .collect();
    (dims[0], dims.get(1).copied().unwrap_or(1))
}

#[test]
fn truth_files_are_well_formed() {
    let dir = temp_dir("files");
    let m = Microscope::new(small(2)).expect("spec");
    let mut t = MicroscopeTruth::create(&dir, &m).expect("create");
    let n = m.neurons().len();
    for k in 0..10u64 {
        let row = FrameRow {
            frame_number: k + 1,
            true_us: k as f64 * 1e6 / RATE,
            device_us: 1000 + k,
            host_ns: 5 + k,
            truth: super::FrameTruth {
                shift_x_px: 0.5,
                shift_y_px: -0.25,
            },
            dropped: k == 4,
        };
        t.push(&row, &vec![k as f32; n]).expect("push");
        if k == 6 {
            t.flush().expect("flush");
            // A killed simulator leaves a loadable file: the header counts
            // the rows flushed so far.
            let b = std::fs::read(dir.join("dff_truth.npy")).expect("read");
            assert_eq!(npy_shape(&b), (7, n));
            assert_eq!(b.len(), 128 + 7 * n * 4);
        }
    }
    t.finish().expect("finish");
    let b = std::fs::read(dir.join("dff_truth.npy")).expect("read");
    assert_eq!(npy_shape(&b), (10, n));
    assert_eq!(b.len(), 128 + 10 * n * 4);
    let last = f32::from_le_bytes(
        b[128 + 9 * n * 4..128 + 9 * n * 4 + 4]
            .try_into()
            .expect("4"),
    );
    assert_eq!(last, 9.0);
    let tsv = std::fs::read_to_string(dir.join("frames_truth.tsv")).expect("read");
    let lines: Vec<&str> = tsv.lines().collect();
    assert_eq!(lines.len(), 11);
    assert_eq!(lines[0], super::files::FRAMES_TRUTH_HEADER);
    assert!(
        lines[5].starts_with("4\t5\t") && lines[5].ends_with("\t1"),
        "{}",
        lines[5]
    );
    let labels = std::fs::read(dir.join("labels.npy")).expect("read");
    assert_eq!(npy_shape(&labels), (128, 128));
    let from_npy: Vec<u16> = labels[128..]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(from_npy, m.labels());
    let tif = std::fs::read(dir.join("labels.tif")).expect("read");
    assert_eq!(&tif[..4], b"II*\0");
    let off = 8 + 2 + 10 * 12 + 4;
    let from_tif: Vec<u16> = tif[off..]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(from_tif, m.labels());
    let neurons = std::fs::read_to_string(dir.join("neurons.tsv")).expect("read");
    assert_eq!(neurons.lines().count(), n + 1);
    assert!(neurons.lines().skip(1).all(|l| l.split('\t').count() == 7));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sink that takes its time, so the renderer falls behind.
struct SlowSink {
    writer: RingWriter,
    delay: Duration,
}

impl FrameSink for SlowSink {
    fn publish(
        &mut self,
        frame_number: u64,
        host_ns: u64,
        pixels: &[u16],
    ) -> Result<(), super::live::PublishError> {
        std::thread::sleep(self.delay);
        FrameSink::publish(&mut self.writer, frame_number, host_ns, pixels)
    }
}

fn ring(w: u32, h: u32, slots: u32) -> (RingRegion, RingWriter) {
    let g = RingGeometry::new(w, h, 1, PixelType::U16Le, slots).expect("geometry");
    let region = RingRegion::new_owned(g.region_len_usize().expect("len"));
    let writer = RingWriter::init(region.clone(), g, 1, 1, 0).expect("init");
    (region, writer)
}

#[test]
fn live_microscope_publishes_every_frame_in_order() {
    let dir = temp_dir("live");
    let spec = {
        let mut s = MicroscopeSpec::new(64, 64);
        s.neurons = 30;
        s
    };
    let m = Microscope::new(spec.clone()).expect("spec");
    let truth = MicroscopeTruth::create(&dir, &m).expect("truth");
    let (region, writer) = ring(64, 64, 256);
    // The queue holds every frame, so a renderer slowed by a busy machine
    // delays frames but never drops one: this test is about order and
    // completeness, not speed.
    let frames = 100u64;
    let mut live =
        LiveMicroscope::spawn(m, Box::new(writer), Some(truth), frames as usize).expect("spawn");
    for k in 0..frames {
        let true_us = 1e4 + k as f64 * 1e6 / RATE;
        if k % 20 == 5 {
            live.press(true_us + 1e5);
        }
        assert!(live.frame(FrameTick {
            frame_number: k + 1,
            true_us,
            device_us: 7 + k,
            host_ns: 1_000_000 + k * 1000,
        }));
        std::thread::sleep(Duration::from_micros(200));
    }
    let stats = live.finish();
    assert_eq!(stats.frames, frames);
    assert_eq!(stats.frames_published, frames);
    assert_eq!(stats.frames_dropped, 0);
    assert_eq!(stats.truth_rows, frames);
    let mut reader = RingReader::attach(region).expect("attach");
    reader.seek(0);
    let mut px = vec![0u16; 64 * 64];
    let mut got = Vec::new();
    while let PollOutcome::Frame(meta) = reader.poll(&mut px).expect("poll") {
        got.push((meta.frame_number, meta.host_monotonic_ns));
    }
    let want: Vec<(u64, u64)> = (0..frames).map(|k| (k + 1, 1_000_000 + k * 1000)).collect();
    assert_eq!(got, want);
    // The frames are the generator's, with the presses applied.
    let mut m = Microscope::new(spec).expect("spec");
    for k in (0..frames).filter(|k| k % 20 == 5) {
        m.add_press((1e4 + k as f64 * 1e6 / RATE + 1e5) / 1e6);
    }
    let mut dff = vec![0f32; 30];
    let mut last = vec![0u16; 64 * 64];
    for k in 0..frames {
        m.render(k, (1e4 + k as f64 * 1e6 / RATE) / 1e6, &mut last, &mut dff);
    }
    assert_eq!(px, last, "the last published frame");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_renderer_drops_frames_and_says_so() {
    let dir = temp_dir("drops");
    let mut spec = MicroscopeSpec::new(32, 32);
    spec.neurons = 10;
    let m = Microscope::new(spec).expect("spec");
    let truth = MicroscopeTruth::create(&dir, &m).expect("truth");
    let (region, writer) = ring(32, 32, 64);
    let sink = SlowSink {
        writer,
        delay: Duration::from_millis(5),
    };
    let mut live = LiveMicroscope::spawn(m, Box::new(sink), Some(truth), 2).expect("spawn");
    let frames = 40u64;
    let mut refused = 0;
    for k in 0..frames {
        if !live.frame(FrameTick {
            frame_number: k + 1,
            true_us: k as f64 * 1e6 / RATE,
            device_us: k,
            host_ns: k,
        }) {
            refused += 1;
        }
    }
    let stats = live.finish();
    assert!(refused > 0, "no frame was dropped");
    assert_eq!(stats.frames_dropped, refused);
    assert_eq!(stats.frames_published + stats.frames_dropped, frames);
    assert_eq!(
        stats.truth_rows, frames,
        "dropped frames are in the truth too"
    );
    let tsv = std::fs::read_to_string(dir.join("frames_truth.tsv")).expect("read");
    let flagged: Vec<u64> = tsv
        .lines()
        .skip(1)
        .filter(|l| l.ends_with("\t1"))
        .map(|l| l.split('\t').nth(1).expect("col").parse().expect("n"))
        .collect();
    assert_eq!(flagged.len() as u64, refused);
    // The ring holds exactly the frames that were not dropped.
    let mut reader = RingReader::attach(region).expect("attach");
    reader.seek(0);
    let mut px = vec![0u16; 32 * 32];
    let mut published = Vec::new();
    while let PollOutcome::Frame(meta) = reader.poll(&mut px).expect("poll") {
        published.push(meta.frame_number);
    }
    assert_eq!(published.len() as u64, stats.frames_published);
    assert!(published.iter().all(|n| !flagged.contains(n)));
    assert!(published.windows(2).all(|w| w[0] < w[1]));
    let _ = std::fs::remove_dir_all(&dir);
}
