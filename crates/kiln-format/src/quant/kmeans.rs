//! Weighted 1-D k-means: k-means++ seeding and Lloyd iterations on sorted data.
//!
//! In one dimension every cluster of an optimal or Lloyd assignment is a contiguous run of the
//! sorted values, so the values are sorted (and merged into distinct values with counts) once.
//! With prefix sums of `w`, `w·x` and `w·x²` over the sorted values, a cluster's mean and its
//! squared error are O(1), and an assignment is just the `k − 1` indices where the midpoints
//! between consecutive centroids fall. A Lloyd iteration then costs O(k log m) instead of
//! O(n k), and so does each k-means++ draw, whatever the number of values.
//!
//! Tensors larger than [`EXACT_LIMIT`] values are first binned by the top 23 bits of their
//! order-preserving bit pattern (sign, exponent and 14 mantissa bits: a relative resolution of
//! 6·10⁻⁵), each bin a point at its mean with its count as weight, which keeps the work and
//! memory bounded for a 168-million-weight embedding at a cost far below the quantization
//! step of any table.

/// Groups with more values than this are binned rather than sorted exactly.
pub const EXACT_LIMIT: usize = 1 << 22;

/// Lloyd iterations allowed when the caller sets no cap.
pub const DEFAULT_MAX_ITERATIONS: usize = 300;

/// How [`kmeans_1d`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KMeansOptions {
    /// Lloyd iterations at most; it stops earlier when no assignment changes.
    pub max_iterations: usize,
    /// Record the distortion after every assignment (an extra O(m) pass each).
    pub track_distortion: bool,
}

impl Default for KMeansOptions {
    fn default() -> Self {
        KMeansOptions {
            max_iterations: DEFAULT_MAX_ITERATIONS,
            track_distortion: false,
        }
    }
}

/// The result of [`kmeans_1d`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// The k-means++ starting centroids, ascending.
    pub initial: Vec<f64>,
    /// Final centroids, ascending and distinct. Fewer than `k` when the data has fewer than `k`
    /// distinct values (each then is its own centroid).
    pub centroids: Vec<f64>,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Whether the last iteration left every assignment unchanged.
    pub converged: bool,
    /// With [`KMeansOptions::track_distortion`]: the weighted sum of squared distances to the
    /// assigned centroid, after the initial assignment and after every iteration.
    pub distortion: Vec<f64>,
}

/// Clusters `values` into at most `k` centroids (squared-error k-means).
///
/// Seeding is k-means++ (each new centroid drawn among the values with probability
/// proportional to its weighted squared distance from the nearest centroid so far), driven by
/// a generator seeded with `seed`, so the result is a deterministic function of the inputs.
/// A centroid left with no values is moved onto the value farthest from its centroid in the
/// cluster with the largest error, which never increases the distortion.
///
/// # Panics
/// If `k == 0`, `values` is empty or holds a non-finite value.
pub fn kmeans_1d(values: &[f32], k: usize, seed: u64, options: KMeansOptions) -> KMeans {
    assert!(k > 0, "k must be positive");
    assert!(!values.is_empty(), "no values to cluster");
    assert!(
        values.iter().all(|v| v.is_finite()),
        "values must be finite"
    );
    run(Points::new(values, None), k, seed, options)
}

/// Why [`kmeans_1d_weighted`] refused its weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightError {
    /// The weights and values differ in number.
    #[error("{weights} weights for {values} values")]
    Length {
        /// Weights given.
        weights: usize,
        /// Values given.
        values: usize,
    },
    /// A weight is negative, infinite or NaN.
    #[error("weight {index} is {value}: weights must be finite and non-negative")]
    Invalid {
        /// Its position.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Every weight is zero, so every clustering has the same (zero) error.
    #[error("every weight is zero")]
    AllZero,
}

/// Checks weights for [`kmeans_1d_weighted`]: as many as `n`, each finite and non-negative, not
/// all zero.
pub fn check_weights(weights: &[f32], n: usize) -> Result<(), WeightError> {
    if weights.len() != n {
        return Err(WeightError::Length {
            weights: weights.len(),
            values: n,
        });
    }
    if let Some(index) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(WeightError::Invalid {
            index,
            value: weights[index],
        });
    }
    if weights.iter().all(|&w| w == 0.0) {
        return Err(WeightError::AllZero);
    }
    Ok(())
}

/// Clusters `values` into at most `k` centroids minimising `Σ weights[i] · (values[i] − c(i))²`,
/// where `c(i)` is the centroid nearest `values[i]`: the same algorithm as [`kmeans_1d`] with
/// each value counted `weights[i]` times. Equal weights give [`kmeans_1d`]'s result (exactly,
/// when the weight is a power of two). A value of weight zero does not affect the result.
///
/// Errors: see [`check_weights`].
///
/// # Panics
/// If `k == 0`, `values` is empty or holds a non-finite value.
pub fn kmeans_1d_weighted(
    values: &[f32],
    weights: &[f32],
    k: usize,
    seed: u64,
    options: KMeansOptions,
) -> Result<KMeans, WeightError> {
    assert!(k > 0, "k must be positive");
    assert!(!values.is_empty(), "no values to cluster");
    assert!(
        values.iter().all(|v| v.is_finite()),
        "values must be finite"
    );
    check_weights(weights, values.len())?;
    Ok(run(Points::new(values, Some(weights)), k, seed, options))
}

fn run(pts: Points, k: usize, seed: u64, options: KMeansOptions) -> KMeans {
    let mut rng = SplitMix64(seed);
    if pts.len() <= k {
        return KMeans {
            initial: pts.x.clone(),
            centroids: pts.x.clone(),
            iterations: 0,
            converged: true,
            distortion: if options.track_distortion {
                vec![0.0]
            } else {
                Vec::new()
            },
        };
    }
    let initial = pts.kmeans_pp(k, &mut rng);
    let mut centroids = initial.clone();
    let mut bounds = vec![0usize; centroids.len() + 1];
    pts.assign(&centroids, &mut bounds, true);
    let mut distortion = Vec::new();
    if options.track_distortion {
        distortion.push(pts.distortion(&centroids, &bounds));
    }
    let mut iterations = 0;
    let mut converged = false;
    let mut next = bounds.clone();
    while iterations < options.max_iterations {
        iterations += 1;
        let relocated = pts.update(&mut centroids, &bounds);
        if centroids.len() + 1 != next.len() {
            next = vec![0; centroids.len() + 1];
        }
        next.copy_from_slice(&bounds[..centroids.len() + 1]);
        pts.assign(&centroids, &mut next, relocated);
        if options.track_distortion {
            distortion.push(pts.distortion(&centroids, &next));
        }
        let unchanged = !relocated && next == bounds;
        std::mem::swap(&mut bounds, &mut next);
        if unchanged {
            converged = true;
            break;
        }
    }
    KMeans {
        initial,
        centroids,
        iterations,
        converged,
        distortion,
    }
}

/// Maps a float to a `u32` whose unsigned order is the float order.
#[inline]
fn order_key(v: f32) -> u32 {
    // Adding zero folds −0 into +0.
    let b = (v + 0.0).to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn from_key(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// Sorts keys by least-significant-digit radix sort on 11-bit digits, skipping digits all keys
/// share (the top digit, sign and high exponent bits, usually is). For the tens of thousands of
/// keys of a channel group this is several times faster than a comparison sort.
fn radix_sort(mut keys: Vec<u32>) -> Vec<u32> {
    const BITS: u32 = 11;
    const DIGITS: usize = 1 << BITS;
    if keys.len() < 1024 {
        keys.sort_unstable();
        return keys;
    }
    let mut counts = vec![[0usize; DIGITS]; 3];
    for &k in &keys {
        for (d, c) in counts.iter_mut().enumerate() {
            c[((k >> (BITS * d as u32)) as usize) & (DIGITS - 1)] += 1;
        }
    }
    let mut buf = vec![0u32; keys.len()];
    for (d, c) in counts.iter().enumerate() {
        if c.contains(&keys.len()) {
            continue;
        }
        let mut offsets = [0usize; DIGITS];
        let mut sum = 0;
        for (o, &n) in offsets.iter_mut().zip(c.iter()) {
            *o = sum;
            sum += n;
        }
        let shift = BITS * d as u32;
        for &k in &keys {
            let digit = ((k >> shift) as usize) & (DIGITS - 1);
            buf[offsets[digit]] = k;
            offsets[digit] += 1;
        }
        std::mem::swap(&mut keys, &mut buf);
    }
    keys
}

/// Bits of the order key dropped when binning.
const BIN_SHIFT: u32 = 9;

/// Distinct values ascending, with weights and prefix sums.
struct Points {
    x: Vec<f64>,
    /// Prefix sums of w, w·x, w·x² (length m + 1).
    p0: Vec<f64>,
    p1: Vec<f64>,
    p2: Vec<f64>,
}

impl Points {
    /// The distinct values of `values` with their total weight (their count, or the sum of
    /// their `weights`); values of zero weight are left out.
    fn new(values: &[f32], weights: Option<&[f32]>) -> Points {
        let mut x = Vec::new();
        let mut w = Vec::new();
        if values.len() <= EXACT_LIMIT {
            match weights {
                None => {
                    let keys = radix_sort(values.iter().map(|&v| order_key(v)).collect());
                    let mut i = 0;
                    while i < keys.len() {
                        let mut j = i + 1;
                        while j < keys.len() && keys[j] == keys[i] {
                            j += 1;
                        }
                        x.push(from_key(keys[i]) as f64);
                        w.push((j - i) as f64);
                        i = j;
                    }
                }
                Some(weights) => {
                    // The key in the high half orders by value; a non-negative weight's bits
                    // in the low half only order equal values among themselves.
                    let mut pairs: Vec<u64> = values
                        .iter()
                        .zip(weights)
                        .filter(|&(_, &wt)| wt > 0.0)
                        .map(|(&v, &wt)| (u64::from(order_key(v)) << 32) | u64::from(wt.to_bits()))
                        .collect();
                    pairs.sort_unstable();
                    let mut i = 0;
                    while i < pairs.len() {
                        let key = pairs[i] >> 32;
                        let mut total = 0.0f64;
                        let mut j = i;
                        while j < pairs.len() && pairs[j] >> 32 == key {
                            total += f64::from(f32::from_bits(pairs[j] as u32));
                            j += 1;
                        }
                        x.push(from_key(key as u32) as f64);
                        w.push(total);
                        i = j;
                    }
                }
            }
        } else {
            let bins = 1usize << (32 - BIN_SHIFT);
            let mut weight = vec![0f64; bins];
            let mut sum = vec![0f64; bins];
            for (i, &v) in values.iter().enumerate() {
                let wt = weights.map_or(1.0, |ws| f64::from(ws[i]));
                let b = (order_key(v) >> BIN_SHIFT) as usize;
                weight[b] += wt;
                sum[b] += wt * v as f64;
            }
            for (c, s) in weight.iter().zip(&sum) {
                if *c > 0.0 {
                    x.push(s / c);
                    w.push(*c);
                }
            }
        }
        let m = x.len();
        let (mut p0, mut p1, mut p2) = (vec![0.0; m + 1], vec![0.0; m + 1], vec![0.0; m + 1]);
        // Running sums in locals: reading the previous prefix back from memory would chain
        // every step through a store-to-load forward.
        let (mut s0, mut s1, mut s2) = (0.0, 0.0, 0.0);
        for i in 0..m {
            s0 += w[i];
            s1 += w[i] * x[i];
            s2 += w[i] * x[i] * x[i];
            p0[i + 1] = s0;
            p1[i + 1] = s1;
            p2[i + 1] = s2;
        }
        Points { x, p0, p1, p2 }
    }

    fn len(&self) -> usize {
        self.x.len()
    }

    /// Weighted squared distance of points `l..r` to `c`.
    #[inline]
    fn cost(&self, l: usize, r: usize, c: f64) -> f64 {
        let w = self.p0[r] - self.p0[l];
        let wx = self.p1[r] - self.p1[l];
        let wxx = self.p2[r] - self.p2[l];
        (wxx - 2.0 * c * wx + c * c * w).max(0.0)
    }

    /// First index in `l..r` whose value is at least `t` (`r` if none).
    fn split(&self, l: usize, r: usize, t: f64) -> usize {
        l + self.x[l..r].partition_point(|&v| v < t)
    }

    /// The sub-ranges of a segment between centroids `a` and `b` with the centroid each point
    /// is nearest to.
    fn parts(&self, s: &Segment) -> [(usize, usize, f64); 2] {
        match (s.left, s.right) {
            (Some(a), Some(b)) => {
                let mid = self.split(s.l, s.r, 0.5 * (a + b));
                [(s.l, mid, a), (mid, s.r, b)]
            }
            (Some(a), None) => [(s.l, s.r, a), (s.r, s.r, a)],
            (None, Some(b)) => [(s.l, s.r, b), (s.r, s.r, b)],
            (None, None) => unreachable!("a segment is bounded by a centroid"),
        }
    }

    fn segment_cost(&self, s: &Segment) -> f64 {
        self.parts(s)
            .iter()
            .map(|&(l, r, c)| self.cost(l, r, c))
            .sum()
    }

    fn kmeans_pp(&self, k: usize, rng: &mut SplitMix64) -> Vec<f64> {
        let m = self.len();
        let t = rng.next_f64() * self.p0[m];
        let first = self.p0[1..].partition_point(|&c| c <= t).min(m - 1);
        let c0 = self.x[first];
        let mut segs = vec![
            Segment::new(0, first, None, Some(c0)),
            Segment::new(first, m, Some(c0), None),
        ];
        for s in &mut segs {
            s.cost = self.segment_cost(s);
        }
        let mut centers = vec![c0];
        while centers.len() < k {
            let total: f64 = segs.iter().map(|s| s.cost).sum();
            if total <= 0.0 {
                break;
            }
            let mut t = rng.next_f64() * total;
            let mut si = segs.len() - 1;
            for (i, s) in segs.iter().enumerate() {
                if t < s.cost {
                    si = i;
                    break;
                }
                t -= s.cost;
            }
            let Some(j) = self.draw_in(&segs[si], t) else {
                break;
            };
            let s = segs[si];
            let c = self.x[j];
            let mut lo = Segment::new(s.l, j, s.left, Some(c));
            let mut hi = Segment::new(j, s.r, Some(c), s.right);
            lo.cost = self.segment_cost(&lo);
            hi.cost = self.segment_cost(&hi);
            segs.splice(si..=si, [lo, hi]);
            let at = centers.partition_point(|&v| v < c);
            centers.insert(at, c);
        }
        centers
    }

    /// The point of segment `s` where its cumulative squared distance passes `t`, or the point
    /// farthest from any centroid if rounding lands on a centroid; `None` if every point of the
    /// segment is a centroid.
    fn draw_in(&self, s: &Segment, mut t: f64) -> Option<usize> {
        let d2 = |j: usize| {
            let a = s.left.map_or(f64::INFINITY, |a| (self.x[j] - a).abs());
            let b = s.right.map_or(f64::INFINITY, |b| (self.x[j] - b).abs());
            let d = a.min(b);
            d * d * (self.p0[j + 1] - self.p0[j])
        };
        let mut pick = None;
        for (l, r, c) in self.parts(s) {
            if l == r {
                continue;
            }
            let part = self.cost(l, r, c);
            if t < part {
                // The cumulative cost is non-decreasing in j: bisect for where it passes t.
                let (mut a, mut b) = (l, r);
                while a < b {
                    let mid = (a + b) / 2;
                    if self.cost(l, mid + 1, c) <= t {
                        a = mid + 1;
                    } else {
                        b = mid;
                    }
                }
                pick = Some(a.min(r - 1));
                break;
            }
            t -= part;
        }
        match pick {
            Some(j) if d2(j) > 0.0 => Some(j),
            _ => {
                let j = (s.l..s.r).max_by(|&a, &b| d2(a).total_cmp(&d2(b)))?;
                (d2(j) > 0.0).then_some(j)
            }
        }
    }

    /// Sets `bounds` to the assignment of every point to its nearest centroid: cluster `j` is
    /// `bounds[j]..bounds[j + 1]`; a point exactly between two centroids joins the upper one.
    /// The previous bounds serve as starting guesses unless `fresh`.
    fn assign(&self, centroids: &[f64], bounds: &mut [usize], fresh: bool) {
        let m = self.len();
        let k = centroids.len();
        bounds[0] = 0;
        bounds[k] = m;
        for j in 1..k {
            let t = 0.5 * (centroids[j - 1] + centroids[j]);
            let lo = bounds[j - 1];
            bounds[j] = if fresh {
                self.split(lo, m, t)
            } else {
                lower_bound_from(&self.x, lo, bounds[j], t)
            };
        }
    }

    /// Moves every centroid to the mean of its cluster and relocates those whose cluster is
    /// empty. Returns whether any was relocated (or dropped).
    fn update(&self, centroids: &mut Vec<f64>, bounds: &[usize]) -> bool {
        let k = centroids.len();
        let mut empty = Vec::new();
        for j in 0..k {
            let (l, r) = (bounds[j], bounds[j + 1]);
            if r > l {
                centroids[j] = (self.p1[r] - self.p1[l]) / (self.p0[r] - self.p0[l]);
            } else {
                empty.push(j);
            }
        }
        if empty.is_empty() {
            return false;
        }
        let mut costs: Vec<f64> = (0..k)
            .map(|j| self.cost(bounds[j], bounds[j + 1], centroids[j]))
            .collect();
        let mut dropped = Vec::new();
        for &e in &empty {
            let (best, &c) = costs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("at least one cluster");
            if c <= 0.0 {
                dropped.push(e);
                continue;
            }
            costs[best] = 0.0;
            let (l, r) = (bounds[best], bounds[best + 1]);
            let (lo, hi) = (self.x[l], self.x[r - 1]);
            let mean = centroids[best];
            centroids[e] = if mean - lo >= hi - mean { lo } else { hi };
        }
        for &d in dropped.iter().rev() {
            centroids.remove(d);
        }
        centroids.sort_by(f64::total_cmp);
        true
    }

    /// Weighted squared error of an assignment, summed point by point.
    fn distortion(&self, centroids: &[f64], bounds: &[usize]) -> f64 {
        let mut total = 0.0;
        for (j, &c) in centroids.iter().enumerate() {
            for i in bounds[j]..bounds[j + 1] {
                let d = self.x[i] - c;
                total += (self.p0[i + 1] - self.p0[i]) * d * d;
            }
        }
        total
    }
}

/// Points `l..r` lying between two consecutive centroids (or beyond the outermost one).
#[derive(Debug, Clone, Copy)]
struct Segment {
    l: usize,
    r: usize,
    left: Option<f64>,
    right: Option<f64>,
    cost: f64,
}

impl Segment {
    fn new(l: usize, r: usize, left: Option<f64>, right: Option<f64>) -> Segment {
        Segment {
            l,
            r,
            left,
            right,
            cost: 0.0,
        }
    }
}

/// The smallest `i` in `lo..=x.len()` with `i == x.len()` or `x[i] >= t`, searched outwards from
/// `hint`: Lloyd's boundaries move little between iterations, so this is usually a few steps.
fn lower_bound_from(x: &[f64], lo: usize, hint: usize, t: f64) -> usize {
    let m = x.len();
    let h = hint.clamp(lo, m);
    if h < m && x[h] < t {
        let (mut a, mut step) = (h + 1, 1);
        loop {
            let b = (a + step).min(m);
            if b == m || x[b] >= t {
                return a + x[a..b].partition_point(|&v| v < t);
            }
            a = b + 1;
            step *= 2;
        }
    } else {
        let (mut b, mut step) = (h, 1);
        loop {
            if b == lo {
                return lo;
            }
            let a = b.saturating_sub(step).max(lo);
            if x[a] < t {
                return a + 1 + x[a + 1..b].partition_point(|&v| v < t);
            }
            b = a;
            step *= 2;
        }
    }
}

/// Steele, Lea and Flood's SplitMix64: small, fast and good enough to draw seeds.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_round_trips_and_orders() {
        let vals = [-3.5f32, -1e-30, 0.0, 1e-30, 2.0, f32::MAX, f32::MIN];
        for &v in &vals {
            assert_eq!(from_key(order_key(v)), v);
        }
        for a in vals {
            for b in vals {
                assert_eq!(a < b, order_key(a) < order_key(b), "{a} {b}");
            }
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
    }

    #[test]
    fn radix_sort_sorts() {
        let mut s = 7u64;
        for n in [0usize, 5, 1023, 1024, 5000, 70000] {
            let keys: Vec<u32> = (0..n)
                .map(|i| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    // Narrow and wide key ranges exercise skipped and full digits.
                    if i % 2 == 0 {
                        (s >> 40) as u32
                    } else {
                        (s >> 32) as u32 | 0x8000_0000
                    }
                })
                .collect();
            let mut want = keys.clone();
            want.sort_unstable();
            assert_eq!(radix_sort(keys), want, "{n} keys");
            let narrow: Vec<u32> = (0..n as u32)
                .rev()
                .map(|i| 0xbf80_0000 + (i % 300))
                .collect();
            let mut want = narrow.clone();
            want.sort_unstable();
            assert_eq!(radix_sort(narrow), want);
        }
    }

    #[test]
    fn lower_bound_from_matches_partition_point() {
        let x: Vec<f64> = (0..50).map(|i| (i / 2) as f64).collect();
        for lo in [0, 3, 17] {
            for hint in [0, 5, 20, 49, 50, 80] {
                for t in [-1.0, 0.0, 0.5, 3.0, 10.0, 24.0, 24.5, 30.0] {
                    let want = lo + x[lo..].partition_point(|&v| v < t);
                    assert_eq!(lower_bound_from(&x, lo, hint, t), want, "{lo} {hint} {t}");
                }
            }
        }
    }

    #[test]
    fn few_distinct_values_are_their_own_centroids() {
        let v = [1.0f32, 2.0, 2.0, 5.0, 1.0];
        let km = kmeans_1d(&v, 4, 1, KMeansOptions::default());
        assert_eq!(km.centroids, vec![1.0, 2.0, 5.0]);
    }

    #[test]
    fn binned_path_finds_well_separated_clusters() {
        let n = EXACT_LIMIT + 1000;
        let v: Vec<f32> = (0..n)
            .map(|i| [-3.0f32, 0.5, 7.0][i % 3] + (i % 7) as f32 * 1e-3)
            .collect();
        let km = kmeans_1d(&v, 3, 9, KMeansOptions::default());
        assert!(km.converged);
        for (c, want) in km.centroids.iter().zip([-3.0, 0.5, 7.0]) {
            assert!((c - want - 0.003).abs() < 1e-3, "{:?}", km.centroids);
        }
    }
}
