//! Linear algebra, attention, softmax, reductions and normalization.

use super::{broadcast_shape, broadcast_strides, norm_axis, strides, Args, OpResult};
use crate::value::{Arr, DType, Kind};

/// Dot product with several accumulators so the compiler can vectorize it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn out_float(a: &Args, fallback: DType) -> DType {
    let d = a.out_dt(0);
    if d.kind() == Kind::Float {
        d
    } else {
        fallback
    }
}

pub(super) fn linear(a: &Args) -> OpResult {
    let (x, xv) = a.float("x")?;
    let (w, wv) = a.float("weight")?;
    if w.rank() != 2 {
        return Err(format!("weight is {}, expected rank 2", w.describe()));
    }
    if x.rank() == 0 {
        return Err("x is a scalar, expected rank 1 or more".into());
    }
    let (dout, din) = (w.shape[0], w.shape[1]);
    if x.shape[x.rank() - 1] != din {
        return Err(format!(
            "x is {} but weight is {}: inner dimensions differ",
            x.describe(),
            w.describe()
        ));
    }
    let bias = match a.opt("bias")? {
        None => None,
        Some(b) => {
            let bv = b
                .as_f()
                .ok_or_else(|| format!("bias is {}, expected float", b.describe()))?;
            if bv.len() != dout {
                return Err(format!(
                    "bias is {}, expected {dout} elements",
                    b.describe()
                ));
            }
            Some(bv)
        }
    };
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    let mut out = vec![0f32; rows * dout];
    for r in 0..rows {
        let xr = &xv[r * din..(r + 1) * din];
        let orow = &mut out[r * dout..(r + 1) * dout];
        for (o, slot) in orow.iter_mut().enumerate() {
            let s = dot(xr, &wv[o * din..(o + 1) * din]);
            *slot = s + bias.map_or(0.0, |b| b[o]);
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = dout;
    Ok(vec![Arr::floats(out_float(a, x.dt), shape, out)])
}

/// A batched matrix product over already-validated operands.
struct MatmulPlan {
    out_shape: Vec<usize>,
    batch: Vec<usize>,
    a_bstrides: Vec<isize>,
    b_bstrides: Vec<isize>,
    m: usize,
    n: usize,
    k: usize,
    // Element strides of a (m, k) and b (k, n).
    am: usize,
    ak: usize,
    bk: usize,
    bn: usize,
    squeeze_m: bool,
    squeeze_n: bool,
}

fn plan_matmul(xs: &[usize], ys: &[usize], tx: bool, ty: bool) -> Result<MatmulPlan, String> {
    if xs.is_empty() || ys.is_empty() {
        return Err("matmul operands must be rank 1 or more".into());
    }
    let (mut xs, mut ys) = (xs.to_vec(), ys.to_vec());
    let squeeze_m = xs.len() == 1;
    let squeeze_n = ys.len() == 1;
    // A vector is a matrix of one row (x) or one column (y); transposes do not apply to it.
    let (tx, ty) = (tx && !squeeze_m, ty && !squeeze_n);
    if squeeze_m {
        xs.insert(0, 1);
    }
    if squeeze_n {
        ys.push(1);
    }
    let (xr, xc) = (xs[xs.len() - 2], xs[xs.len() - 1]);
    let (yr, yc) = (ys[ys.len() - 2], ys[ys.len() - 1]);
    let (m, k, am, ak) = if tx { (xc, xr, 1, xc) } else { (xr, xc, xc, 1) };
    let (k2, n, bk, bn) = if ty { (yc, yr, 1, yc) } else { (yr, yc, yc, 1) };
    if k != k2 {
        return Err(format!(
            "inner dimensions differ: x {xs:?} (transpose {tx}) and y {ys:?} (transpose {ty})"
        ));
    }
    let xb = &xs[..xs.len() - 2];
    let yb = &ys[..ys.len() - 2];
    let batch = broadcast_shape(xb, yb)?;
    // Batch strides in elements of the full operand.
    let scale = |b: &[usize], mat: usize| -> Vec<isize> {
        broadcast_strides(b, &batch)
            .into_iter()
            .map(|s| s * mat as isize)
            .collect()
    };
    let a_bstrides = scale(xb, xr * xc);
    let b_bstrides = scale(yb, yr * yc);
    let mut out_shape = batch.clone();
    if !squeeze_m {
        out_shape.push(m);
    }
    if !squeeze_n {
        out_shape.push(n);
    }
    super::check_elements(&[batch.iter().product::<usize>(), m, n])?;
    Ok(MatmulPlan {
        out_shape,
        batch,
        a_bstrides,
        b_bstrides,
        m,
        n,
        k,
        am,
        ak,
        bk,
        bn,
        squeeze_m,
        squeeze_n,
    })
}

fn run_matmul(p: &MatmulPlan, av: &[f32], bv: &[f32]) -> Vec<f32> {
    let nb: usize = p.batch.iter().product();
    let mut out = vec![0f32; nb * p.m * p.n];
    let offs_a = super::strided_offsets(0, &p.a_bstrides, &p.batch);
    let offs_b = super::strided_offsets(0, &p.b_bstrides, &p.batch);
    let single = [0usize];
    let (offs_a, offs_b) = if p.batch.is_empty() {
        (&single[..], &single[..])
    } else {
        (&offs_a[..], &offs_b[..])
    };
    let mn = p.m * p.n;
    for bi in 0..nb {
        let (oa, ob) = (offs_a[bi], offs_b[bi]);
        let o = &mut out[bi * mn..(bi + 1) * mn];
        if p.ak == 1 && p.bk == 1 {
            for i in 0..p.m {
                let ar = &av[oa + i * p.am..oa + i * p.am + p.k];
                for j in 0..p.n {
                    o[i * p.n + j] = dot(ar, &bv[ob + j * p.bn..ob + j * p.bn + p.k]);
                }
            }
        } else if p.bn == 1 {
            for i in 0..p.m {
                let orow = &mut o[i * p.n..(i + 1) * p.n];
                for kk in 0..p.k {
                    let s = av[oa + i * p.am + kk * p.ak];
                    let br = &bv[ob + kk * p.bk..ob + kk * p.bk + p.n];
                    for (d, &b) in orow.iter_mut().zip(br) {
                        *d += s * b;
                    }
                }
            }
        } else {
            for i in 0..p.m {
                for j in 0..p.n {
                    let mut s = 0f32;
                    for kk in 0..p.k {
                        s += av[oa + i * p.am + kk * p.ak] * bv[ob + kk * p.bk + j * p.bn];
                    }
                    o[i * p.n + j] = s;
                }
            }
        }
    }
    let _ = (p.squeeze_m, p.squeeze_n);
    out
}

pub(super) fn matmul(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let y = a.arr("y")?;
    let tx = a.opt_bool("transpose_x", false)?;
    let ty = a.opt_bool("transpose_y", false)?;
    let p = plan_matmul(&x.shape, &y.shape, tx, ty)?;
    match (x.as_f(), y.as_f(), x.as_i(), y.as_i()) {
        (Some(xv), Some(yv), _, _) => {
            let out = run_matmul(&p, xv, yv);
            Ok(vec![Arr::floats(out_float(a, x.dt), p.out_shape, out)])
        }
        (_, _, Some(xv), Some(yv)) => {
            let xf: Vec<f32> = xv.iter().map(|&v| v as f32).collect();
            let yf: Vec<f32> = yv.iter().map(|&v| v as f32).collect();
            let out = run_matmul(&p, &xf, &yf);
            Ok(vec![Arr::ints(
                DType::I32,
                p.out_shape,
                out.into_iter().map(|v| v as i32).collect(),
            )])
        }
        _ => Err(format!(
            "matmul of {} and {}: element kinds differ or are not numeric",
            x.describe(),
            y.describe()
        )),
    }
}

/// Softmax in place over rows of `n` elements spaced `inner` apart.
fn softmax_in_place(v: &mut [f32], n: usize, inner: usize) {
    if n == 0 {
        return;
    }
    let outer = v.len() / (n * inner);
    for o in 0..outer {
        for i in 0..inner {
            let base = o * n * inner + i;
            let mut mx = f32::NEG_INFINITY;
            for j in 0..n {
                mx = mx.max(v[base + j * inner]);
            }
            let mut sum = 0f32;
            for j in 0..n {
                let e = if mx == f32::NEG_INFINITY {
                    // A row masked out entirely: exp(-inf - -inf) is undefined; yield NaN as
                    // the mathematical expression does.
                    f32::NAN
                } else {
                    (v[base + j * inner] - mx).exp()
                };
                v[base + j * inner] = e;
                sum += e;
            }
            for j in 0..n {
                v[base + j * inner] /= sum;
            }
        }
    }
}

pub(super) fn softmax(a: &Args) -> OpResult {
    let (x, xv) = a.float("x")?;
    let axis = norm_axis(a.opt_int("axis", -1)?, x.rank(), "axis")?;
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut v = xv.to_vec();
    softmax_in_place(&mut v, n, inner);
    Ok(vec![Arr::floats(out_float(a, x.dt), x.shape.clone(), v)])
}

pub(super) fn sdpa(a: &Args) -> OpResult {
    let (q, qv) = a.float("query")?;
    let (k, kv) = a.float("key")?;
    let (v, vv) = a.float("value")?;
    if q.rank() < 3 || k.rank() != q.rank() || v.rank() != q.rank() {
        return Err(format!(
            "query {}, key {}, value {}: expected equal ranks of 3 or more",
            q.describe(),
            k.describe(),
            v.describe()
        ));
    }
    let r = q.rank();
    let (l, e) = (q.shape[r - 2], q.shape[r - 1]);
    let s = k.shape[r - 2];
    if k.shape[r - 1] != e || v.shape[r - 2] != s {
        return Err(format!(
            "query {}, key {}, value {} do not agree",
            q.describe(),
            k.describe(),
            v.describe()
        ));
    }
    let p = plan_matmul(&q.shape, &k.shape, false, true)?;
    let mut scores = run_matmul(&p, qv, kv);
    let scale = 1.0 / (e as f32).sqrt();
    for x in scores.iter_mut() {
        *x *= scale;
    }
    if let Some(m) = a.opt("attn_mask")? {
        let shape = broadcast_shape(&p.out_shape, &m.shape)?;
        if shape != p.out_shape {
            return Err(format!(
                "attn_mask {} does not broadcast to the scores {:?}",
                m.describe(),
                p.out_shape
            ));
        }
        match (m.as_f(), m.as_b()) {
            (Some(mv), _) => {
                let mb = super::broadcast_to(mv, &m.shape, &p.out_shape);
                for (x, y) in scores.iter_mut().zip(mb) {
                    *x += y;
                }
            }
            (_, Some(mv)) => {
                let mb = super::broadcast_to(mv, &m.shape, &p.out_shape);
                for (x, keep) in scores.iter_mut().zip(mb) {
                    if !keep {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            _ => return Err(format!("attn_mask is {}", m.describe())),
        }
    }
    softmax_in_place(&mut scores, s, 1);
    let p2 = plan_matmul(&p.out_shape, &v.shape, false, false)?;
    let out = run_matmul(&p2, &scores, vv);
    let _ = l;
    Ok(vec![Arr::floats(out_float(a, q.dt), p2.out_shape, out)])
}

/// Normalized, deduplicated reduction axes; all axes when `axes` is absent.
fn reduce_axes(axes: Option<Vec<i64>>, rank: usize) -> Result<Vec<bool>, String> {
    let mut mask = vec![axes.is_none(); rank];
    for ax in axes.unwrap_or_default() {
        mask[norm_axis(ax, rank, "axis")?] = true;
    }
    Ok(mask)
}

pub(super) fn reduce(op: &str, a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let keep = a.opt_bool("keep_dims", false)?;
    let mask = reduce_axes(a.opt_ints("axes")?, x.rank())?;
    let kept: Vec<usize> = x
        .shape
        .iter()
        .zip(&mask)
        .map(|(&d, &m)| if m { 1 } else { d })
        .collect();
    let count: usize = x
        .shape
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&d, _)| d)
        .product();
    let out_n: usize = kept.iter().product();
    // Map every input element to its output slot with zero strides along reduced axes.
    let ks = strides(&kept);
    let red_strides: Vec<isize> = ks
        .iter()
        .zip(&mask)
        .map(|(&s, &m)| if m { 0 } else { s as isize })
        .collect();
    let slots = super::strided_offsets(0, &red_strides, &x.shape);
    let vals: Vec<f64> = match (x.as_f(), x.as_i()) {
        (Some(v), _) => v.iter().map(|&p| p as f64).collect(),
        (_, Some(v)) => v.iter().map(|&p| p as f64).collect(),
        _ => return Err(format!("{op} of {}", x.describe())),
    };
    let init = match op {
        "reduce_max" => f64::NEG_INFINITY,
        "reduce_min" => f64::INFINITY,
        "reduce_prod" => 1.0,
        _ => 0.0,
    };
    let mut acc = vec![init; out_n];
    for (&slot, &v) in slots.iter().zip(&vals) {
        let t = &mut acc[slot];
        *t = match op {
            "reduce_max" => t.max(v),
            "reduce_min" => t.min(v),
            "reduce_prod" => *t * v,
            _ => *t + v,
        };
    }
    if op == "reduce_mean" {
        for t in acc.iter_mut() {
            *t /= count as f64;
        }
    }
    let shape: Vec<usize> = if keep {
        kept
    } else {
        x.shape
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| !m)
            .map(|(&d, _)| d)
            .collect()
    };
    Ok(vec![match x.kind() {
        Kind::Float => Arr::floats(
            out_float(a, x.dt),
            shape,
            acc.into_iter().map(|v| v as f32).collect(),
        ),
        _ => Arr::ints(x.dt, shape, acc.into_iter().map(|v| v as i32).collect()),
    }])
}

pub(super) fn arg_reduce(op: &str, a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let axis = norm_axis(a.opt_int("axis", -1)?, x.rank(), "axis")?;
    let keep = a.opt_bool("keep_dims", false)?;
    let vals: Vec<f32> = match (x.as_f(), x.as_i()) {
        (Some(v), _) => v.to_vec(),
        (_, Some(v)) => v.iter().map(|&p| p as f32).collect(),
        _ => return Err(format!("{op} of {}", x.describe())),
    };
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0usize;
            for j in 1..n {
                let (c, b) = (
                    vals[(o * n + j) * inner + i],
                    vals[(o * n + best) * inner + i],
                );
                let better = if op == "reduce_argmax" { c > b } else { c < b };
                if better {
                    best = j;
                }
            }
            out.push(best as i32);
        }
    }
    let mut shape = x.shape.clone();
    if keep {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    Ok(vec![Arr::ints(DType::I32, shape, out)])
}

pub(super) fn layer_norm(a: &Args) -> OpResult {
    let (x, xv) = a.float("x")?;
    let eps = a.opt_f32("epsilon", 1e-5)?;
    let mask = reduce_axes(a.opt_ints("axes")?, x.rank())?;
    // The normalized axes must be the trailing ones for the gamma/beta layout to apply.
    let first = mask.iter().position(|&m| m).unwrap_or(x.rank());
    if mask[first..].iter().any(|&m| !m) {
        return Err("layer_norm over non-trailing axes is not supported".into());
    }
    let n: usize = x.shape[first..].iter().product();
    let gamma = match a.opt("gamma")? {
        Some(g) => Some(g.as_f().ok_or("gamma must be float")?),
        None => None,
    };
    let beta = match a.opt("beta")? {
        Some(b) => Some(b.as_f().ok_or("beta must be float")?),
        None => None,
    };
    if gamma.is_some_and(|g| g.len() != n) || beta.is_some_and(|b| b.len() != n) {
        return Err(format!("gamma/beta must hold {n} elements"));
    }
    let mut out = xv.to_vec();
    if n > 0 {
        for row in out.chunks_mut(n) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, v) in row.iter_mut().enumerate() {
                let mut y = ((*v as f64 - mean) * inv) as f32;
                if let Some(g) = gamma {
                    y *= g[i];
                }
                if let Some(b) = beta {
                    y += b[i];
                }
                *v = y;
            }
        }
    }
    Ok(vec![Arr::floats(out_float(a, x.dt), x.shape.clone(), out)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_shapes_and_values() {
        let p = plan_matmul(&[2, 3], &[3, 2], false, false).unwrap();
        let out = run_matmul(&p, &[1., 2., 3., 4., 5., 6.], &[1., 0., 0., 1., 1., 1.]);
        assert_eq!(p.out_shape, vec![2, 2]);
        assert_eq!(out, vec![4., 5., 10., 11.]);
        // Transposed y gives the same answer from the transposed storage.
        let p = plan_matmul(&[2, 3], &[2, 3], false, true).unwrap();
        let out = run_matmul(&p, &[1., 2., 3., 4., 5., 6.], &[1., 0., 1., 0., 1., 1.]);
        assert_eq!(out, vec![4., 5., 10., 11.]);
        // Transposed x.
        let p = plan_matmul(&[3, 2], &[3, 2], true, false).unwrap();
        let out = run_matmul(&p, &[1., 4., 2., 5., 3., 6.], &[1., 0., 0., 1., 1., 1.]);
        assert_eq!(out, vec![4., 5., 10., 11.]);
        // Broadcast batch and vector promotion.
        let p = plan_matmul(&[3], &[2, 3, 1], false, false).unwrap();
        assert_eq!(p.out_shape, vec![2, 1]);
        let p = plan_matmul(&[4, 1, 2, 3], &[5, 3, 2], false, false).unwrap();
        assert_eq!(p.out_shape, vec![4, 5, 2, 2]);
        assert!(plan_matmul(&[2, 3], &[2, 3], false, false).is_err());
    }

    #[test]
    fn softmax_rows() {
        let mut v = vec![0.0, 0.0, f32::NEG_INFINITY, 1.0];
        softmax_in_place(&mut v, 2, 1);
        assert_eq!(v[0], 0.5);
        assert_eq!(v[2], 0.0);
        assert_eq!(v[3], 1.0);
    }
}
