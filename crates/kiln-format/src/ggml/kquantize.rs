//! Reference quantizers for the K-quantizations, following ggml's `quantize_row_*_K_ref`.
//!
//! These search, per sub-block, for the scale (and minimum) that minimise a weighted error,
//! then quantize the sub-block scales themselves against one f16 super-block scale. The
//! arithmetic is kept in the same order as ggml's so that the bytes match; the blocks are
//! what `llama-quantize` would write without an importance matrix.

use super::kquants::{
    scale_min_k4, Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BYTES,
};
use super::{f16_at, f32_to_f16, QK_K};

/// Below this, a group is treated as all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even (ggml gets it from the FPU's rounding mode).
#[inline]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// The element of largest magnitude, with its sign (the first on ties), and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
}

/// Symmetric codes in `-nmax..nmax` for one group, weighted by `x^2`, trying 18 scales
/// around `nmax / max` (ggml's `make_qx_quants` with `rmse_type = 1`). Writes codes biased
/// by `nmax` into `codes` and returns the group scale.
fn symmetric_codes(x: &[f32], nmax: i32, codes: &mut [u8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, codes: &mut [u8]| {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = (code(iscale, v) + nmax) as u8;
        }
    };

    let iscale = -(nmax as f32) / max;
    fill(iscale, codes);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, codes);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Symmetric 3-bit codes in `-nmax..nmax` for one group, refined coordinate by coordinate to
/// maximise the `x^2`-weighted fit (ggml's `make_q3_quants` with `do_rmse`). Writes codes
/// biased by `nmax`; returns the group scale.
fn q3_codes(x: &[f32], nmax: i32, codes: &mut [u8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut l = [0i32; 16];
    let l = &mut l[..x.len()];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *li as f32;
        suml2 += w * *li as f32 * *li as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *li as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *li as f32 * *li as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (c, &li) in codes.iter_mut().zip(l.iter()) {
        *c = (li + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Parameters of the affine (scale and minimum) search.
struct AffineSearch {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    /// Minimise absolute rather than squared error.
    use_mad: bool,
}

/// Affine codes in `0..=nmax` for one group: `x ≈ scale * code - min`, searching
/// `nstep + 1` candidate scales for the least `weights`-weighted error and refitting scale and
/// minimum by least squares for each (ggml's `make_qkx2_quants`). Returns `(scale, min)`
/// with `min >= 0` subtracted.
fn affine_codes(
    x: &[f32],
    weights: &[f32],
    p: &AffineSearch,
    codes: &mut [u8],
    aux: &mut [u8],
) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let nmax = p.nmax as f32;
    let code = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, p.nmax);
    let error = |scale: f32, min: f32, codes: &[u8]| {
        let mut err = 0.0f32;
        for ((&c, &v), &w) in codes.iter().zip(x).zip(weights) {
            let diff = scale * f32::from(c) + min - v;
            err += w * if p.use_mad { diff.abs() } else { diff * diff };
        }
        err
    };

    let iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = code(iscale, v, min) as u8;
    }
    let mut best_error = error(scale, min, codes);
    if p.nstep < 1 {
        return (scale, -min);
    }
    // Later candidates are measured from the best minimum found so far, as in ggml.
    for is in 0..=p.nstep {
        let iscale = (p.rmin + p.rdelta * is as f32 + nmax) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((a, &v), &w) in aux.iter_mut().zip(x).zip(weights) {
            let l = code(iscale, v, min);
            *a = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, aux);
            if cur_error < best_error {
                codes.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 2-bit codes: element n*128 + j*32 + b goes to bits 2j of qs[n*32 + b].
fn pack_2bit(codes: &[u8; QK_K], qs: &mut [u8]) {
    for (half, out) in codes.chunks_exact(128).zip(qs.chunks_exact_mut(32)) {
        for (b, o) in out.iter_mut().enumerate() {
            *o = half[b] | (half[b + 32] << 2) | (half[b + 64] << 4) | (half[b + 96] << 6);
        }
    }
}

pub(crate) fn quant_q2_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q2_K_BYTES);
    let mut codes = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let params = AffineSearch {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for (j, (xs, cs)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
        (scales[j], mins[j]) = affine_codes(xs, &weights, &params, cs, &mut aux);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let (sc, rest) = y.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    // 4-bit sub-block scales in the low nibble, 4-bit minimums in the high nibble.
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (b, &s) in sc.iter_mut().zip(&scales) {
            *b = nearest_int(iscale * s) as u8;
        }
        put_f16(dd, 0, max_scale / 15.0);
    } else {
        sc.fill(0);
        put_f16(dd, 0, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (b, &m) in sc.iter_mut().zip(&mins) {
            *b |= (nearest_int(iscale * m) << 4) as u8;
        }
        put_f16(dd, 2, max_min / 15.0);
    } else {
        put_f16(dd, 2, 0.0);
    }
    let d_all = f16_at(dd, 0);
    let dmin_all = f16_at(dd, 2);
    for ((xs, cs), &s) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .zip(sc.iter())
    {
        let d = d_all * f32::from(s & 0x0f);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(s >> 4);
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = nearest_int((v + dm) / d).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&codes, qs);
}

pub(crate) fn quant_q3_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q3_K_BYTES);
    let mut codes = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for (j, (xs, cs)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = q3_codes(xs, 4, cs);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(12);
    sc.fill(0);
    // 6-bit signed sub-block scales, biased by 32: low nibbles in bytes 0..8, top two bits
    // in bytes 8..12.
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let l = (i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = l & 0x0f;
            } else {
                sc[j - 8] |= (l & 0x0f) << 4;
            }
            sc[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
        }
        put_f16(dd, 0, 1.0 / iscale);
    } else {
        put_f16(dd, 0, 0.0);
    }
    let d_all = f16_at(dd, 0);
    for (j, (xs, cs)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let low = if j < 8 { sc[j] & 0x0f } else { sc[j - 8] >> 4 };
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        let d = d_all * (i32::from(low | (high << 4)) - 32) as f32;
        if d == 0.0 {
            continue;
        }
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = (nearest_int(v / d).clamp(-4, 3) + 4) as u8;
        }
    }
    // The third bit of element e goes to bit e/32 of hmask[e % 32].
    hmask.fill(0);
    for (e, c) in codes.iter_mut().enumerate() {
        if *c > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            *c -= 4;
        }
    }
    pack_2bit(&codes, qs);
}

/// Scales and minimums of eight 32-element sub-blocks, quantized to 6 bits against the
/// super-block `d` and `dmin`, packed as `scale_min_k4` unpacks them. Writes `d`, `dmin`
/// and the 12 scale bytes at the start of `y`.
fn pack_k4_scales(y: &mut [u8], scales: &[f32; 8], mins: &[f32; 8]) {
    let max_scale = scales
        .iter()
        .fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
}

/// Shared by Q4_K and Q5_K: affine codes in `0..=nmax` for eight 32-element sub-blocks,
/// weighted by `rms(x) + |x|`, with scales packed into `y[..16]`.
fn k4_codes(x: &[f32], y: &mut [u8], params: &AffineSearch, codes: &mut [u8; QK_K]) {
    let mut aux = [0u8; 32];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (j, (xs, cs)) in x
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        (scales[j], mins[j]) = affine_codes(xs, &weights, params, cs, &mut aux);
    }
    pack_k4_scales(y, &scales, &mins);
    let d_all = f16_at(y, 0);
    let dmin_all = f16_at(y, 2);
    for (j, (xs, cs)) in x
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &y[4..16]);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = nearest_int((v + dm) / d).clamp(0, params.nmax) as u8;
        }
    }
}

pub(crate) fn quant_q4_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q4_K_BYTES);
    let mut codes = [0u8; QK_K];
    let params = AffineSearch {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    k4_codes(x, y, &params, &mut codes);
    let qs = &mut y[16..];
    for (group, out) in codes.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for (l, o) in out.iter_mut().enumerate() {
            *o = group[l] | (group[l + 32] << 4);
        }
    }
}

pub(crate) fn quant_q5_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q5_K_BYTES);
    let mut codes = [0u8; QK_K];
    let params = AffineSearch {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    k4_codes(x, y, &params, &mut codes);
    let (qh, qs) = y[16..].split_at_mut(32);
    qh.fill(0);
    for (g, (group, out)) in codes
        .chunks_exact(64)
        .zip(qs.chunks_exact_mut(32))
        .enumerate()
    {
        for (l, o) in out.iter_mut().enumerate() {
            let (lo, hi) = (group[l], group[l + 32]);
            qh[l] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1));
            *o = (lo & 0x0f) | ((hi & 0x0f) << 4);
        }
    }
}

pub(crate) fn quant_q6_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q6_K_BYTES);
    let mut codes = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for (j, (xs, cs)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = symmetric_codes(xs, 32, cs);
        if scales[j].abs() > max_abs {
            max_abs = scales[j].abs();
            max_scale = scales[j];
        }
    }
    y.fill(0);
    if max_abs < GROUP_MAX_EPS {
        return;
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(16);
    let iscale = -128.0 / max_scale;
    put_f16(dd, 0, 1.0 / iscale);
    for (b, &s) in sc.iter_mut().zip(&scales) {
        *b = nearest_int(iscale * s).min(127) as i8 as u8;
    }
    let d_all = f16_at(dd, 0);
    for ((xs, cs), &s) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .zip(sc.iter())
    {
        let d = d_all * f32::from(s as i8);
        if d == 0.0 {
            continue;
        }
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = (nearest_int(v / d).clamp(-32, 31) + 32) as u8;
        }
    }
    // Element n*128 + k*32 + l: low nibble into nibble k/2 of ql[n*64 + (k%2)*32 + l], top
    // two bits into bits 2k of qh[n*32 + l].
    for ((half, ql), qh) in codes
        .chunks_exact(128)
        .zip(ql.chunks_exact_mut(64))
        .zip(qh.chunks_exact_mut(32))
    {
        for l in 0..32 {
            let q = [half[l], half[l + 32], half[l + 64], half[l + 96]];
            ql[l] = (q[0] & 0x0f) | ((q[2] & 0x0f) << 4);
            ql[l + 32] = (q[1] & 0x0f) | ((q[3] & 0x0f) << 4);
            qh[l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}

pub(crate) fn quant_q8_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(y.len(), Q8_K_BYTES);
    y.fill(0);
    let (max, amax) = signed_absmax(x);
    if amax == 0.0 {
        return;
    }
    let iscale = -127.0 / max;
    let mut codes = [0i8; QK_K];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = nearest_int(iscale * v).min(127) as i8;
    }
    y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (o, &c) in y[4..4 + QK_K].iter_mut().zip(&codes) {
        *o = c as u8;
    }
    for (j, group) in codes.chunks_exact(16).enumerate() {
        let sum: i16 = group.iter().map(|&c| i16::from(c)).sum();
        let at = 4 + QK_K + 2 * j;
        y[at..at + 2].copy_from_slice(&sum.to_le_bytes());
    }
}
