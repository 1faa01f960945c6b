//! ROI outlines for the page from a label image.

/// Outline polygons for ROIs 1..=max label of a row-major `w x h` label image
/// (0 = background, k = ROI k): for ROI k, entry k-1 is the convex hull of its
/// pixels (empty if ROI k has no pixels). Good enough to draw on the mean
/// image; feed it to [`super::PreviewState::set_rois`].
pub fn roi_outlines(labels: &[u32], w: usize, h: usize) -> Vec<Vec<(u16, u16)>> {
    let n = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut rows: Vec<Vec<(u16, u16, u16)>> = vec![Vec::new(); n]; // (y, x_min, x_max)
    for y in 0..h.min(usize::from(u16::MAX)) {
        for x in 0..w.min(usize::from(u16::MAX)) {
            let Some(&k) = labels.get(y * w + x) else {
                continue;
            };
            if k == 0 {
                continue;
            }
            let (xs, ys) = (x as u16, y as u16);
            let r = &mut rows[k as usize - 1];
            match r.last_mut() {
                Some(last) if last.0 == ys => {
                    last.1 = last.1.min(xs);
                    last.2 = last.2.max(xs);
                }
                _ => r.push((ys, xs, xs)),
            }
        }
    }
    rows.into_iter()
        .map(|r| {
            let mut pts: Vec<(i64, i64)> = Vec::with_capacity(r.len() * 2);
            for (y, a, b) in r {
                pts.push((i64::from(a), i64::from(y)));
                if b != a {
                    pts.push((i64::from(b), i64::from(y)));
                }
            }
            convex_hull(pts)
                .into_iter()
                .map(|(x, y)| (u16::try_from(x).unwrap_or(0), u16::try_from(y).unwrap_or(0)))
                .collect()
        })
        .collect()
}

/// Andrew's monotone chain; counter-clockwise, no repeated first point.
fn convex_hull(mut p: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    p.sort_unstable();
    p.dedup();
    if p.len() < 3 {
        return p;
    }
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(p.len() + 1);
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> = if pass == 0 {
            Box::new(p.iter())
        } else {
            Box::new(p.iter().rev())
        };
        for &q in iter {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], q) <= 0
            {
                hull.pop();
            }
            hull.push(q);
        }
        hull.pop();
    }
    hull
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_roi_gives_its_corners() {
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
        assert_eq!(sq, vec![(3, 2), (3, 4), (6, 2), (6, 4)]);
        assert_eq!(o[2], vec![(9, 7)]);
    }
}
