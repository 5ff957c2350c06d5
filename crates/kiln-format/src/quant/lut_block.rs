//! A 16-entry table shared by a tensor, with a scale and an offset per block of input
//! channels: `w = s_b · t[q] + m_b`.
//!
//! The table and the block parameters are learned together by alternating least squares,
//! starting from the uniform table (where the scheme is block-wise int4 with an offset): for
//! the table, the best scale and offset of every block (a small search, each candidate refitted
//! by least squares for its indices); for those, the least-squares table. Each step lowers the
//! squared error. The table is learned on a sample of rows — 16 entries need far fewer weights
//! than a tensor holds — and every block is then fitted to it.
//!
//! [`crate::kiln_types`] stores the result as `LUT4_B32`, with the table on a 7-bit grid and
//! the block parameters as int8 multiples of per-row units.

/// Entries of the table.
pub const ENTRIES: usize = 16;

/// Alternation rounds when learning a table (the error stops falling after about 20 on the
/// models measured in `docs/quantization.md`). Stopping earlier where the error had stopped
/// falling for three rounds cost Gemma 3 0.06 in perplexity (22.09 against 22.02) for a
/// third of the conversion time.
const ROUNDS: usize = 24;

/// Weights the table is learned on at most (whole rows, evenly spaced).
const SAMPLE: usize = 1 << 16;

/// Index of the nearest entry of ascending `t` for each value is the number of midpoints
/// below it (ties go to the lower entry).
fn midpoints(t: &[f32; ENTRIES]) -> [f32; ENTRIES - 1] {
    std::array::from_fn(|k| 0.5 * (t[k] + t[k + 1]))
}

/// Values [`assign`] ranks at once: each midpoint is compared with a whole row of them, which
/// compilers turn into vector compares (this ranking is most of what quantizing to
/// `LUT4_B32` costs).
const LANES: usize = 32;

/// Indices of `x` for `w = s · t[q] + m` (stored into `q`), and the squared error.
pub(crate) fn assign(x: &[f32], t: &[f32; ENTRIES], s: f32, m: f32, q: &mut [u8]) -> f32 {
    let mids = midpoints(t);
    if s == 0.0 {
        // Every weight is `m` plus the entry nearest zero times nothing.
        q.fill(0);
        return x.iter().map(|&v| (v - m) * (v - m)).sum();
    }
    let inv = 1.0 / s;
    let mut err = 0.0;
    for (xc, qc) in x.chunks(LANES).zip(q.chunks_mut(LANES)) {
        let mut u = [0.0f32; LANES];
        for (u, &v) in u.iter_mut().zip(xc) {
            *u = (v - m) * inv;
        }
        let mut rank = [0u32; LANES];
        for &md in &mids {
            for (r, &u) in rank.iter_mut().zip(&u) {
                *r += u32::from(md < u);
            }
        }
        for ((o, &v), &k) in qc.iter_mut().zip(xc).zip(&rank) {
            *o = k as u8;
            let e = v - (s * t[k as usize & (ENTRIES - 1)] + m);
            err += e * e;
        }
    }
    err
}

/// The least-squares scale and offset of `x` for fixed indices `q`.
fn refit(x: &[f32], t: &[f32; ENTRIES], q: &[u8]) -> (f32, f32) {
    let n = x.len() as f64;
    let (mut st, mut stt, mut sx, mut sxt) = (0.0f64, 0.0, 0.0, 0.0);
    for (&v, &k) in x.iter().zip(q) {
        let tk = f64::from(t[k as usize]);
        st += tk;
        stt += tk * tk;
        sx += f64::from(v);
        sxt += f64::from(v) * tk;
    }
    let det = n * stt - st * st;
    if det.abs() <= 1e-12 * (n * stt).max(f64::MIN_POSITIVE) {
        return (0.0, (sx / n) as f32);
    }
    let s = (n * sxt - st * sx) / det;
    ((s) as f32, ((sx - s * st) / n) as f32)
}

/// The scale and offset of one block for table `t` of least squared error among a few
/// candidates, each first passed through `round` (how they are stored); fills `q` and returns
/// `(error, s, m)`.
pub(crate) fn fit_block(
    x: &[f32],
    t: &[f32; ENTRIES],
    round: &dyn Fn(f32, f32) -> (f32, f32),
    q: &mut [u8],
) -> (f32, f32, f32) {
    let mut trial = [0u8; 256];
    let trial = &mut trial[..x.len()];
    let (mn, mx) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let mut best = (f32::INFINITY, 0.0f32, 0.0f32);
    let mut consider = |s: f32, m: f32, best: &mut (f32, f32, f32), q: &mut [u8]| {
        // Nothing beats an exact fit (common where the source is affine per block, as ggml's
        // Q4_1 and Q4_K are).
        if best.0 == 0.0 {
            return;
        }
        let (s, m) = round(s, m);
        let e = assign(x, t, s, m, trial);
        if e < best.0 {
            *best = (e, s, m);
            q.copy_from_slice(trial);
            if e == 0.0 {
                return;
            }
        }
        let (s2, m2) = refit(x, t, trial);
        let (s2, m2) = round(s2, m2);
        let e2 = assign(x, t, s2, m2, trial);
        if e2 < best.0 {
            *best = (e2, s2, m2);
            q.copy_from_slice(trial);
        }
    };
    let (lo, hi) = (t[0], t[ENTRIES - 1]);
    if hi > lo && mx > mn {
        let (mid, tmid) = (0.5 * (mx + mn), 0.5 * (hi + lo));
        for f in [1.0f32, 0.95, 0.9, 0.85, 0.8, 1.05] {
            // The table need not be symmetric: both orientations.
            let s = (mx - mn) / (hi - lo) * f;
            consider(s, mid - s * tmid, &mut best, q);
            consider(-s, mid + s * tmid, &mut best, q);
        }
    } else {
        consider(0.0, 0.5 * (mx + mn), &mut best, q);
    }
    best
}

/// One block of the sample while a table is learned: its indices, scale, offset and squared
/// error for the current table.
struct BlockFit<'a> {
    q: &'a mut [u8],
    s: f32,
    m: f32,
    err: f32,
}

/// The least-squares table for the blocks `fits` of `sample` (blocks of `block` weights),
/// sorted; entries no weight uses keep their value from `t`.
fn table_step(
    sample: &[f32],
    block: usize,
    fits: &[BlockFit],
    t: &[f32; ENTRIES],
) -> [f32; ENTRIES] {
    let (mut num, mut den) = ([0.0f64; ENTRIES], [0.0f64; ENTRIES]);
    for (x, f) in sample.chunks_exact(block).zip(fits) {
        let (sv, mv) = (f64::from(f.s), f64::from(f.m));
        for (&v, &k) in x.iter().zip(f.q.iter()) {
            num[k as usize] += sv * (f64::from(v) - mv);
            den[k as usize] += sv * sv;
        }
    }
    let mut out = *t;
    for k in 0..ENTRIES {
        if den[k] > 0.0 {
            out[k] = (num[k] / den[k]) as f32;
        }
    }
    out.sort_by(f32::total_cmp);
    out
}

/// Learns the table of a `rows` × `cols` matrix `w` (row-major, finite, `cols` a multiple of
/// `block`) with blocks of `block` input channels: alternating least squares from the uniform
/// table `0..16` on evenly spaced rows (about 65 536 weights), 24 rounds or until
/// every block fits exactly. The blocks of a round are fitted on every core. Deterministic.
pub fn learn_table(w: &[f32], rows: usize, cols: usize, block: usize) -> [f32; ENTRIES] {
    assert!(cols % block == 0 && w.len() == rows * cols && block <= 256);
    let stride = (rows * cols / SAMPLE).max(1);
    let sample: Vec<f32> = w
        .chunks_exact(cols)
        .step_by(stride)
        .flatten()
        .copied()
        .collect();
    let uniform: [f32; ENTRIES] = std::array::from_fn(|i| i as f32);
    alternate(&sample, block, uniform, ROUNDS, true)
}

/// Alternation rounds when a group's table is refined from its tensor's ([`refine_tables`]).
/// The tensor's table is already a good start; Gemma 3 (whose blocks do not fit exactly)
/// gains little past these while every extra round costs a fit of every weight.
pub const GROUP_ROUNDS: usize = 4;

/// Tables per group of `group_rows` consecutive rows of the `rows` × `cols` matrix `w`: each
/// refined from `init` (the tensor's table, [`learn_table`]) by alternating least squares on
/// all of the group's weights, [`GROUP_ROUNDS`] times or until every block fits exactly.
/// Groups are refined on every core, one group per core at a time. Deterministic.
pub fn refine_tables(
    w: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
    group_rows: usize,
    init: [f32; ENTRIES],
) -> Vec<[f32; ENTRIES]> {
    assert!(cols % block == 0 && w.len() == rows * cols && block <= 256);
    assert!(group_rows > 0 && rows % group_rows == 0);
    let len = group_rows * cols;
    super::par::map_indices(rows / group_rows, |g| {
        alternate(&w[g * len..(g + 1) * len], block, init, GROUP_ROUNDS, false)
    })
}

/// `rounds` of alternating least squares from table `t` over the blocks of `sample` (blocks
/// of `block` weights), stopping early once every block fits exactly; `parallel`: fit the
/// blocks of a round on every core.
fn alternate(
    sample: &[f32],
    block: usize,
    mut t: [f32; ENTRIES],
    rounds: usize,
    parallel: bool,
) -> [f32; ENTRIES] {
    let mut q = vec![0u8; sample.len()];
    let mut fits: Vec<BlockFit> = q
        .chunks_exact_mut(block)
        .map(|q| BlockFit {
            q,
            s: 0.0,
            m: 0.0,
            err: 0.0,
        })
        .collect();
    let exact = |a: f32, b: f32| (a, b);
    let fit_all = |first: usize, part: &mut [BlockFit], t: &[f32; ENTRIES]| {
        for (i, f) in part.iter_mut().enumerate() {
            let x = &sample[(first + i) * block..(first + i + 1) * block];
            (f.err, f.s, f.m) = fit_block(x, t, &exact, f.q);
        }
    };
    let per_piece = (4096 / block).max(1);
    for _ in 0..rounds {
        if parallel {
            super::par_chunks(&mut fits, per_piece, |first, part| fit_all(first, part, &t));
        } else {
            fit_all(0, &mut fits, &t);
        }
        if fits.iter().all(|f| f.err == 0.0) {
            // Every block fits exactly (an affine source such as ggml's Q4_1): the table is
            // as good as it gets.
            break;
        }
        t = table_step(sample, block, &fits, &t);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_data_keeps_a_uniform_table() {
        // Every block is an exact affine image of 0..16 (a Q4_1-like source): the table stays
        // affine and every block is reconstructed exactly.
        let (rows, cols) = (8, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let b = i / 32;
                let (d, m) = (0.01 * (1 + b % 5) as f32, -0.05 * (b % 3) as f32);
                d * ((i * 7 + b) % 16) as f32 + m
            })
            .collect();
        let t = learn_table(&w, rows, cols, 32);
        for k in 1..ENTRIES - 1 {
            let (a, b) = (t[k] - t[k - 1], t[k + 1] - t[k]);
            assert!((a - b).abs() < 1e-3 * (t[15] - t[0]), "{t:?}");
        }
        let mut q = [0u8; 32];
        for x in w.chunks_exact(32) {
            let (e, _, _) = fit_block(x, &t, &|a, b| (a, b), &mut q);
            let energy: f32 = x.iter().map(|v| v * v).sum();
            assert!(e <= 1e-9 * energy.max(1e-6), "error {e}");
        }
    }

    #[test]
    fn learned_table_beats_the_uniform_one_on_gaussian_blocks() {
        // Gaussian-like weights: the optimal levels are denser near the centre.
        let mut state = 0x1234_5678u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32
        };
        let w: Vec<f32> = (0..64 * 256)
            .map(|_| (0..6).map(|_| next()).sum::<f32>() - 3.0)
            .collect();
        let uniform: [f32; ENTRIES] = std::array::from_fn(|i| i as f32);
        let learned = learn_table(&w, 64, 256, 32);
        let err = |t: &[f32; ENTRIES]| -> f32 {
            let mut q = [0u8; 32];
            w.chunks_exact(32)
                .map(|x| fit_block(x, t, &|a, b| (a, b), &mut q).0)
                .sum()
        };
        let (eu, el) = (err(&uniform), err(&learned));
        assert!(el < 0.9 * eu, "learned {el} vs uniform {eu}");
    }
}
