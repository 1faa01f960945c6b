//! ROI outlines for the page from a label image: each ROI's contour, the
//! closed polygon along the pixel edges between the ROI and the rest, with
//! its vertices at pixel corners (`x` in `0..=width`, `y` in `0..=height`).
//! Drawn as lines, contours cover only the ROIs' borders, so the mean image
//! shows through.

use std::collections::HashMap;

/// Contours of ROIs 1..=max label of a row-major `w x h` label image (0 =
/// background, k = ROI k): entry k-1 is ROI k's contour (empty if ROI k has
/// no pixels). Feed it to [`super::PreviewState::set_rois`].
pub fn roi_outlines(labels: &[u32], w: usize, h: usize) -> Vec<Vec<(u16, u16)>> {
    let n = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut pixels: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, &k) in labels.iter().enumerate().take(w * h) {
        if k != 0 {
            pixels[k as usize - 1].push(i as u32);
        }
    }
    pixels
        .iter()
        .enumerate()
        .map(|(k, px)| roi_contour(labels, w, h, k as u32 + 1, px))
        .collect()
}

/// The contour of ROI `id` (its `pixels`, flat indices into the row-major
/// `w x h` `labels`): the longest closed loop of pixel edges between the
/// ROI and the rest (the outer border of its largest part; holes and other
/// parts are left out), its straight runs merged, vertices at pixel corners.
/// Where two of its pixels touch only at a corner the loop separates them.
pub fn roi_contour(labels: &[u32], w: usize, h: usize, id: u32, pixels: &[u32]) -> Vec<(u16, u16)> {
    let inside = |x: i64, y: i64| -> bool {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && labels.get(y as usize * w + x as usize) == Some(&id)
    };
    // Directed edges, the ROI on their right (y down): start -> end.
    let mut out_of: HashMap<(i64, i64), Vec<(i64, i64)>> = HashMap::new();
    let mut add = |a: (i64, i64), b: (i64, i64)| out_of.entry(a).or_default().push(b);
    for &p in pixels {
        let p = p as usize;
        if p >= w * h || labels[p] != id {
            continue;
        }
        let (x, y) = ((p % w) as i64, (p / w) as i64);
        if !inside(x, y - 1) {
            add((x, y), (x + 1, y));
        }
        if !inside(x + 1, y) {
            add((x + 1, y), (x + 1, y + 1));
        }
        if !inside(x, y + 1) {
            add((x + 1, y + 1), (x, y + 1));
        }
        if !inside(x - 1, y) {
            add((x, y + 1), (x, y));
        }
    }
    let mut best: Vec<(i64, i64)> = Vec::new();
    // Loops in a fixed order (the smallest start vertex first), so the
    // result does not depend on the hash map's order.
    let mut starts: Vec<(i64, i64)> = out_of.keys().copied().collect();
    starts.sort_unstable_by_key(|&(x, y)| (y, x));
    for s in starts {
        while let Some(first) = out_of.get_mut(&s).and_then(Vec::pop) {
            let mut lp = vec![s];
            let (mut prev, mut cur) = (s, first);
            while cur != s {
                lp.push(cur);
                let Some(nexts) = out_of.get_mut(&cur) else {
                    break;
                };
                // Two ways on (pixels touching at a corner): turn right,
                // towards the ROI, which keeps the two pixels apart.
                let d = (cur.0 - prev.0, cur.1 - prev.1);
                let right = (-d.1, d.0);
                let i = nexts
                    .iter()
                    .position(|&n| (n.0 - cur.0, n.1 - cur.1) == right)
                    .unwrap_or(0);
                if nexts.is_empty() {
                    break;
                }
                let next = nexts.swap_remove(i);
                prev = cur;
                cur = next;
            }
            if lp.len() > best.len() {
                best = lp;
            }
        }
    }
    // Merge straight runs: keep the corners only.
    let n = best.len();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b, c) = (best[(i + n - 1) % n], best[i], best[(i + 1) % n]);
        let (d1, d2) = ((b.0 - a.0, b.1 - a.1), (c.0 - b.0, c.1 - b.1));
        if d1 != d2 {
            out.push((
                u16::try_from(b.0).unwrap_or(u16::MAX),
                u16::try_from(b.1).unwrap_or(u16::MAX),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rectangle_gives_its_four_corners() {
        let (w, h) = (10, 8);
        let mut labels = vec![0u32; w * h];
        for y in 2..5 {
            for x in 3..7 {
                labels[y * w + x] = 2;
            }
        }
        labels[7 * w + 9] = 3;
        let o = roi_outlines(&labels, w, h);
        assert_eq!(o.len(), 3);
        assert!(o[0].is_empty());
        let mut sq = o[1].clone();
        sq.sort_unstable();
        assert_eq!(sq, vec![(3, 2), (3, 5), (7, 2), (7, 5)]);
        let mut one = o[2].clone();
        one.sort_unstable();
        assert_eq!(one, vec![(9, 7), (9, 8), (10, 7), (10, 8)]);
    }

    /// Twice the area of a polygon (shoelace), with its sign.
    fn area2(p: &[(u16, u16)]) -> i64 {
        (0..p.len())
            .map(|i| {
                let (a, b) = (p[i], p[(i + 1) % p.len()]);
                i64::from(a.0) * i64::from(b.1) - i64::from(b.0) * i64::from(a.1)
            })
            .sum()
    }

    #[test]
    fn a_contour_follows_a_concave_roi_and_encloses_exactly_its_pixels() {
        // An L and a plus sign: the contour's area is the pixel count (a
        // convex hull or a chain of border pixels would not be), every edge
        // is along a pixel edge, and no vertex repeats.
        let (w, h) = (12, 12);
        let mut labels = vec![0u32; w * h];
        let mut set = |x: usize, y: usize, k: u32| labels[y * w + x] = k;
        for y in 1..7 {
            set(1, y, 1);
        }
        for x in 1..6 {
            set(x, 6, 1);
        }
        for i in 0..5 {
            set(8, 6 + i, 2);
            set(6 + i, 8, 2);
        }
        let o = roi_outlines(&labels, w, h);
        for (k, count) in [(0usize, 10i64), (1, 9)] {
            let p = &o[k];
            assert_eq!(area2(p).abs(), 2 * count, "ROI {}: {p:?}", k + 1);
            for i in 0..p.len() {
                let (a, b) = (p[i], p[(i + 1) % p.len()]);
                assert!(a.0 == b.0 || a.1 == b.1, "axis-aligned: {a:?} {b:?}");
            }
            let mut v = p.clone();
            v.sort_unstable();
            v.dedup();
            assert_eq!(v.len(), p.len(), "no vertex twice: {p:?}");
        }
        assert_eq!(o[0].len(), 6, "an L has six corners: {:?}", o[0]);
        assert_eq!(o[1].len(), 12, "a plus has twelve: {:?}", o[1]);
    }

    #[test]
    fn pixels_touching_at_a_corner_are_kept_apart_and_the_largest_part_wins() {
        // A 2x2 block and a single pixel touching it at a corner, same ROI:
        // the contour is the block's square alone.
        let (w, h) = (6, 6);
        let mut labels = vec![0u32; w * h];
        for (x, y) in [(1, 1), (2, 1), (1, 2), (2, 2), (3, 3)] {
            labels[y * w + x] = 1;
        }
        let mut o = roi_outlines(&labels, w, h).remove(0);
        o.sort_unstable();
        assert_eq!(o, vec![(1, 1), (1, 3), (3, 1), (3, 3)]);
    }
}
