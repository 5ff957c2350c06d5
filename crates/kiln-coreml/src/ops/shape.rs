//! Ops that move elements without arithmetic: gather, concat, slicing, reshapes, tiling.

use super::{norm_axis, strided_offsets, strides, Args, OpResult};
use crate::value::{volume, Arr, DType, Data, Kind};
use std::sync::Arc;

/// The elements of `x` at flat positions `idx`, under `shape`.
fn take(x: &Arr, idx: &[usize], shape: Vec<usize>) -> Arr {
    let data = match &x.data {
        Data::F(v) => Data::F(Arc::new(idx.iter().map(|&i| v[i]).collect())),
        Data::I(v) => Data::I(Arc::new(idx.iter().map(|&i| v[i]).collect())),
        Data::B(v) => Data::B(Arc::new(idx.iter().map(|&i| v[i]).collect())),
        Data::S(v) => Data::S(Arc::new(idx.iter().map(|&i| v[i].clone()).collect())),
    };
    Arr {
        dt: x.dt,
        shape,
        data,
    }
}

/// Concatenates the flat data of several arrays of one kind, in the order given by
/// `pieces` (array index, start, length).
fn assemble(
    parts: &[&Arr],
    pieces: &[(usize, usize, usize)],
    shape: Vec<usize>,
) -> Result<Arr, String> {
    let first = parts.first().ok_or("no values")?;
    for p in parts {
        if p.kind() != first.kind() {
            return Err(format!(
                "values {} and {} have different element kinds",
                first.describe(),
                p.describe()
            ));
        }
    }
    macro_rules! build {
        ($variant:ident, $get:ident) => {{
            let srcs: Vec<&[_]> = parts.iter().map(|p| p.$get().unwrap()).collect();
            let mut out = Vec::with_capacity(volume(&shape).unwrap_or(0));
            for &(i, s, n) in pieces {
                out.extend_from_slice(&srcs[i][s..s + n]);
            }
            Data::$variant(Arc::new(out))
        }};
    }
    let data = match first.kind() {
        Kind::Float => build!(F, as_f),
        Kind::Int => build!(I, as_i),
        Kind::Bool => build!(B, as_b),
        Kind::Str => build!(S, as_s),
    };
    Ok(Arr {
        dt: first.dt,
        shape,
        data,
    })
}

fn index_value(i: i64, n: usize, what: &str) -> Result<usize, String> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        return Err(format!("{what} {i} is out of range for a dimension of {n}"));
    }
    Ok(j as usize)
}

pub(super) fn gather(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let ind = a.arr("indices")?;
    let iv = ind
        .as_i()
        .ok_or_else(|| format!("indices are {}, expected integers", ind.describe()))?;
    if x.rank() == 0 {
        return Err("x is a scalar".into());
    }
    let axis = norm_axis(a.opt_int("axis", 0)?, x.rank(), "axis")?;
    let bd = a.opt_int("batch_dims", 0)?;
    if bd < 0 || bd as usize > axis || bd as usize > ind.rank() {
        return Err(format!(
            "batch_dims {bd} must lie in [0, min(axis {axis}, rank of indices {})]",
            ind.rank()
        ));
    }
    let bd = bd as usize;
    if x.shape[..bd] != ind.shape[..bd] {
        return Err(format!(
            "batch dimensions of x {} and indices {} differ",
            x.describe(),
            ind.describe()
        ));
    }
    let batch: usize = x.shape[..bd].iter().product();
    let outer: usize = x.shape[bd..axis].iter().product();
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let per_batch: usize = ind.shape[bd..].iter().product();
    super::check_elements(&[batch, outer, per_batch, inner])?;
    let mut idx = Vec::with_capacity(batch * outer * per_batch * inner);
    for b in 0..batch {
        for o in 0..outer {
            for k in 0..per_batch {
                let j = index_value(iv[b * per_batch + k] as i64, n, "index")?;
                let base = ((b * outer + o) * n + j) * inner;
                idx.extend(base..base + inner);
            }
        }
    }
    let mut shape = x.shape[..axis].to_vec();
    shape.extend_from_slice(&ind.shape[bd..]);
    shape.extend_from_slice(&x.shape[axis + 1..]);
    Ok(vec![take(x, &idx, shape)])
}

pub(super) fn gather_along_axis(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let ind = a.arr("indices")?;
    let iv = ind
        .as_i()
        .ok_or_else(|| format!("indices are {}, expected integers", ind.describe()))?;
    let axis = norm_axis(a.opt_int("axis", 0)?, x.rank(), "axis")?;
    if ind.rank() != x.rank() || (0..x.rank()).any(|d| d != axis && ind.shape[d] != x.shape[d]) {
        return Err(format!(
            "indices {} must match x {} except along axis {axis}",
            ind.describe(),
            x.describe()
        ));
    }
    let xs = strides(&x.shape);
    let is = strides(&ind.shape);
    let mut idx = Vec::with_capacity(iv.len());
    for (flat, &v) in iv.iter().enumerate() {
        let mut off = 0;
        for d in 0..x.rank() {
            let c = (flat / is[d]) % ind.shape[d];
            let c = if d == axis {
                index_value(v as i64, x.shape[axis], "index")?
            } else {
                c
            };
            off += c * xs[d];
        }
        idx.push(off);
    }
    Ok(vec![take(x, &idx, ind.shape.clone())])
}

pub(super) fn concat(a: &Args) -> OpResult {
    let vals = a.list("values")?;
    // Scalars concatenate as one-element vectors (programs build shapes this way).
    let promoted: Vec<Arr>;
    let vals: Vec<&Arr> = if vals.iter().any(|v| v.rank() == 0) {
        promoted = vals
            .iter()
            .map(|v| {
                if v.rank() == 0 {
                    v.reshaped(vec![1])
                } else {
                    (*v).clone()
                }
            })
            .collect();
        promoted.iter().collect()
    } else {
        vals
    };
    let interleave = a.opt_bool("interleave", false)?;
    let first = vals.first().ok_or("concat of no values")?;
    let rank = first.rank();
    let axis = norm_axis(a.int("axis")?, rank, "axis")?;
    for v in &vals {
        if v.rank() != rank
            || (0..rank).any(|d| d != axis && v.shape[d] != first.shape[d])
            || (interleave && v.shape != first.shape)
        {
            return Err(format!(
                "values {} and {} cannot be concatenated along axis {axis}{}",
                first.describe(),
                v.describe(),
                if interleave { " (interleaved)" } else { "" }
            ));
        }
    }
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let mut pieces = Vec::new();
    for o in 0..outer {
        if interleave {
            let n = first.shape[axis];
            for j in 0..n {
                for i in 0..vals.len() {
                    pieces.push((i, (o * n + j) * inner, inner));
                }
            }
        } else {
            for (i, v) in vals.iter().enumerate() {
                let chunk = v.shape[axis] * inner;
                pieces.push((i, o * chunk, chunk));
            }
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = vals.iter().map(|v| v.shape[axis]).sum();
    Ok(vec![assemble(&vals, &pieces, shape)?])
}

pub(super) fn stack(a: &Args) -> OpResult {
    let vals = a.list("values")?;
    let first = vals.first().ok_or("stack of no values")?;
    let axis = norm_axis(a.int("axis")?, first.rank() + 1, "axis")?;
    if vals.iter().any(|v| v.shape != first.shape) {
        return Err("stacked values must have equal shapes".into());
    }
    let inner: usize = first.shape[axis..].iter().product();
    let outer: usize = first.shape[..axis].iter().product();
    let mut pieces = Vec::new();
    for o in 0..outer {
        for i in 0..vals.len() {
            pieces.push((i, o * inner, inner));
        }
    }
    let mut shape = first.shape.clone();
    shape.insert(axis, vals.len());
    Ok(vec![assemble(&vals, &pieces, shape)?])
}

pub(super) fn split(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let axis = norm_axis(a.int("axis")?, x.rank(), "axis")?;
    let n = x.shape[axis];
    let sizes: Vec<usize> = match a.opt_ints("split_sizes")? {
        Some(s) => s
            .iter()
            .map(|&v| usize::try_from(v).map_err(|_| format!("split size {v}")))
            .collect::<Result<_, _>>()?,
        None => {
            let k = a.opt_int("num_splits", a.outputs.len() as i64)?;
            if k <= 0 {
                return Err(format!("num_splits {k}"));
            }
            let k = k as usize;
            let each = n.div_ceil(k);
            (0..k)
                .map(|i| each.min(n.saturating_sub(i * each)))
                .collect()
        }
    };
    if sizes.iter().sum::<usize>() != n {
        return Err(format!("split sizes {sizes:?} do not add up to {n}"));
    }
    let st = strides(&x.shape);
    let mut outs = Vec::new();
    let mut start = 0;
    for s in sizes {
        let mut shape = x.shape.clone();
        shape[axis] = s;
        let strd: Vec<isize> = st.iter().map(|&v| v as isize).collect();
        let idx = strided_offsets((start * st[axis]) as isize, &strd, &shape);
        outs.push(take(x, &idx, shape));
        start += s;
    }
    Ok(outs)
}

/// One dimension of a resolved numpy-style slice.
struct Dim {
    start: isize,
    step: isize,
    len: usize,
    squeeze: bool,
}

fn resolve_slice(a: &Args, shape: &[usize]) -> Result<Vec<Dim>, String> {
    let r = shape.len();
    let begin = a.ints("begin")?;
    let end = a.ints("end")?;
    let stride = a.opt_ints("stride")?.unwrap_or_else(|| vec![1; r]);
    let bm = a.bools("begin_mask")?.unwrap_or_else(|| vec![false; r]);
    let em = a.bools("end_mask")?.unwrap_or_else(|| vec![false; r]);
    let sm = a.bools("squeeze_mask")?.unwrap_or_else(|| vec![false; r]);
    for (name, len) in [
        ("begin", begin.len()),
        ("end", end.len()),
        ("stride", stride.len()),
        ("begin_mask", bm.len()),
        ("end_mask", em.len()),
        ("squeeze_mask", sm.len()),
    ] {
        if len != r {
            return Err(format!("{name} has {len} entries for a rank-{r} input"));
        }
    }
    let mut dims = Vec::with_capacity(r);
    for d in 0..r {
        let n = shape[d] as i64;
        let s = stride[d];
        if s == 0 {
            return Err(format!("stride 0 in dimension {d}"));
        }
        if sm[d] {
            let i = index_value(begin[d], shape[d], "squeezed index")?;
            dims.push(Dim {
                start: i as isize,
                step: 1,
                len: 1,
                squeeze: true,
            });
            continue;
        }
        let clamp = |v: i64| -> i64 {
            let v = if v < 0 { v + n } else { v };
            if s > 0 {
                v.clamp(0, n)
            } else {
                v.clamp(-1, n - 1)
            }
        };
        let b = if bm[d] {
            if s > 0 {
                0
            } else {
                n - 1
            }
        } else {
            clamp(begin[d])
        };
        let e = if em[d] {
            if s > 0 {
                n
            } else {
                -1
            }
        } else {
            clamp(end[d])
        };
        let len = if s > 0 {
            if e > b {
                (e - b + s - 1) / s
            } else {
                0
            }
        } else if b > e {
            (b - e + (-s) - 1) / (-s)
        } else {
            0
        };
        dims.push(Dim {
            start: b as isize,
            step: s as isize,
            len: len as usize,
            squeeze: false,
        });
    }
    Ok(dims)
}

/// Flat offsets of the sliced elements, and the result's shape.
fn slice_offsets(shape: &[usize], dims: &[Dim]) -> (Vec<usize>, Vec<usize>) {
    let st = strides(shape);
    let base: isize = dims
        .iter()
        .zip(&st)
        .map(|(d, &s)| if d.len > 0 { d.start * s as isize } else { 0 })
        .sum();
    let strd: Vec<isize> = dims
        .iter()
        .zip(&st)
        .map(|(d, &s)| d.step * s as isize)
        .collect();
    let lens: Vec<usize> = dims.iter().map(|d| d.len).collect();
    let idx = strided_offsets(base, &strd, &lens);
    let out: Vec<usize> = dims.iter().filter(|d| !d.squeeze).map(|d| d.len).collect();
    (idx, out)
}

pub(super) fn slice_by_index(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let dims = resolve_slice(a, &x.shape)?;
    let (idx, shape) = slice_offsets(&x.shape, &dims);
    Ok(vec![take(x, &idx, shape)])
}

pub(super) fn slice_by_size(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let begin = a.ints("begin")?;
    let size = a.ints("size")?;
    if begin.len() != x.rank() || size.len() != x.rank() {
        return Err("begin and size need one entry per dimension".into());
    }
    let mut dims = Vec::new();
    for d in 0..x.rank() {
        let n = x.shape[d];
        let b = index_value(begin[d], n.max(1), "begin")?;
        let len = if size[d] == -1 {
            n.saturating_sub(b)
        } else {
            usize::try_from(size[d]).map_err(|_| format!("size {}", size[d]))?
        };
        if b + len > n {
            return Err(format!("slice [{b}, {}) exceeds dimension {n}", b + len));
        }
        dims.push(Dim {
            start: b as isize,
            step: 1,
            len,
            squeeze: false,
        });
    }
    let (idx, shape) = slice_offsets(&x.shape, &dims);
    Ok(vec![take(x, &idx, shape)])
}

pub(super) fn slice_update(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let u = a.arr("update")?;
    if u.kind() != x.kind() {
        return Err(format!(
            "update {} and x {} have different element kinds",
            u.describe(),
            x.describe()
        ));
    }
    let dims = resolve_slice(a, &x.shape)?;
    let (idx, shape) = slice_offsets(&x.shape, &dims);
    let squeeze_ones =
        |s: &[usize]| -> Vec<usize> { s.iter().copied().filter(|&d| d != 1).collect() };
    if u.shape != shape && squeeze_ones(&u.shape) != squeeze_ones(&shape) {
        return Err(format!(
            "update is {} but the slice is {shape:?}",
            u.describe()
        ));
    }
    let data = match (&x.data, &u.data) {
        (Data::F(xv), Data::F(uv)) => {
            let mut v = xv.as_ref().clone();
            for (&i, &p) in idx.iter().zip(uv.iter()) {
                v[i] = p;
            }
            Data::F(Arc::new(v))
        }
        (Data::I(xv), Data::I(uv)) => {
            let mut v = xv.as_ref().clone();
            for (&i, &p) in idx.iter().zip(uv.iter()) {
                v[i] = p;
            }
            Data::I(Arc::new(v))
        }
        (Data::B(xv), Data::B(uv)) => {
            let mut v = xv.as_ref().clone();
            for (&i, &p) in idx.iter().zip(uv.iter()) {
                v[i] = p;
            }
            Data::B(Arc::new(v))
        }
        _ => return Err(format!("slice_update of {}", x.describe())),
    };
    Ok(vec![Arr {
        dt: x.dt,
        shape: x.shape.clone(),
        data,
    }])
}

pub(super) fn reshape(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let spec = a.ints("shape")?;
    let k = spec.len();
    let r = x.rank();
    let mut shape = Vec::with_capacity(k);
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        shape.push(match s {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(format!("shape {spec:?} has more than one -1"));
                }
                1
            }
            // A zero copies the input dimension at the same distance from the right.
            0 => {
                if k - i <= r {
                    x.shape[r - (k - i)]
                } else {
                    1
                }
            }
            s if s > 0 => s as usize,
            s => return Err(format!("shape entry {s} is invalid")),
        });
    }
    let total = x.len();
    let known = volume(&shape).ok_or("the shape overflows")?;
    if let Some(i) = infer {
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {} to {spec:?}", x.describe()));
        }
        shape[i] = total / known;
    } else if known != total {
        return Err(format!("cannot reshape {} to {spec:?}", x.describe()));
    }
    Ok(vec![x.reshaped(shape)])
}

pub(super) fn transpose(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let perm = a.ints("perm")?;
    let r = x.rank();
    if perm.len() != r {
        return Err(format!("perm {perm:?} for a rank-{r} input"));
    }
    let mut seen = vec![false; r];
    let mut p = Vec::with_capacity(r);
    for &v in &perm {
        let d = norm_axis(v, r, "perm entry")?;
        if std::mem::replace(&mut seen[d], true) {
            return Err(format!("perm {perm:?} repeats {v}"));
        }
        p.push(d);
    }
    let st = strides(&x.shape);
    let shape: Vec<usize> = p.iter().map(|&d| x.shape[d]).collect();
    let strd: Vec<isize> = p.iter().map(|&d| st[d] as isize).collect();
    let idx = strided_offsets(0, &strd, &shape);
    Ok(vec![take(x, &idx, shape)])
}

pub(super) fn expand_dims(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let axes = a.ints("axes")?;
    let out_rank = x.rank() + axes.len();
    let mut pos = Vec::with_capacity(axes.len());
    for &ax in &axes {
        let p = norm_axis(ax, out_rank, "axis")?;
        if pos.contains(&p) {
            return Err(format!("axes {axes:?} repeat an axis"));
        }
        pos.push(p);
    }
    let mut shape = Vec::with_capacity(out_rank);
    let mut src = x.shape.iter();
    for i in 0..out_rank {
        if pos.contains(&i) {
            shape.push(1);
        } else {
            shape.push(*src.next().expect("counted"));
        }
    }
    Ok(vec![x.reshaped(shape)])
}

pub(super) fn squeeze(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let shape: Vec<usize> = match a.opt_ints("axes")? {
        None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
        Some(axes) => {
            let mut drop = vec![false; x.rank()];
            for ax in axes {
                let d = norm_axis(ax, x.rank(), "axis")?;
                if x.shape[d] != 1 {
                    return Err(format!(
                        "cannot squeeze axis {d} of {}: its size is not 1",
                        x.describe()
                    ));
                }
                drop[d] = true;
            }
            x.shape
                .iter()
                .zip(drop)
                .filter(|(_, dr)| !dr)
                .map(|(&d, _)| d)
                .collect()
        }
    };
    Ok(vec![x.reshaped(shape)])
}

pub(super) fn tile(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let reps = a.ints("reps")?;
    if reps.len() != x.rank() {
        return Err(format!(
            "reps {reps:?} for {}: one entry per dimension expected",
            x.describe()
        ));
    }
    // Reading [rep_0, d_0, rep_1, d_1, ...] with zero strides on the reps lays out the tiling.
    let st = strides(&x.shape);
    let mut ishape = Vec::new();
    let mut istr = Vec::new();
    let mut shape = Vec::new();
    for d in 0..x.rank() {
        let r = usize::try_from(reps[d]).map_err(|_| format!("negative rep {}", reps[d]))?;
        ishape.extend([r, x.shape[d]]);
        istr.extend([0isize, st[d] as isize]);
        shape.push(r.checked_mul(x.shape[d]).ok_or("tile size overflows")?);
    }
    let total = volume(&shape).ok_or("tile size overflows")?;
    if total > (1 << 31) {
        return Err(format!("tile would produce {total} elements"));
    }
    let idx = strided_offsets(0, &istr, &ishape);
    Ok(vec![take(x, &idx, shape)])
}

pub(super) fn shape(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let v: Vec<i32> = x.shape.iter().map(|&d| d as i32).collect();
    Ok(vec![Arr::ints(DType::I32, vec![v.len()], v)])
}

pub(super) fn range_1d(a: &Args) -> OpResult {
    let s = a.arr("start")?;
    let limit = 1usize << 31;
    if s.kind() == Kind::Int {
        let (start, end, step) = (a.int("start")?, a.int("end")?, a.int("step")?);
        if step == 0 {
            return Err("step is 0".into());
        }
        let n = ((end - start) as f64 / step as f64).ceil().max(0.0) as usize;
        if n > limit {
            return Err(format!("range of {n} elements"));
        }
        let v: Vec<i32> = (0..n).map(|i| (start + i as i64 * step) as i32).collect();
        Ok(vec![Arr::ints(DType::I32, vec![n], v)])
    } else {
        let start = a.opt_f32("start", 0.0)?;
        let end = a.opt_f32("end", 0.0)?;
        let step = a.opt_f32("step", 1.0)?;
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(format!("range from {start} to {end} by {step}"));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        if n > limit {
            return Err(format!("range of {n} elements"));
        }
        let v: Vec<f32> = (0..n).map(|i| start + i as f32 * step).collect();
        Ok(vec![Arr::floats(s.dt, vec![n], v)])
    }
}

pub(super) fn fill(a: &Args) -> OpResult {
    let spec = a.ints("shape")?;
    let shape: Vec<usize> = spec
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("shape entry {d}")))
        .collect::<Result<_, _>>()?;
    let n = volume(&shape)
        .filter(|&n| n <= 1 << 31)
        .ok_or("fill is too large")?;
    let value = a.opt("value")?;
    Ok(vec![match value {
        Some(v) if v.kind() == Kind::Int => Arr::ints(v.dt, shape, vec![v.as_i().unwrap()[0]; n]),
        Some(v) if v.kind() == Kind::Bool => Arr::bools(shape, vec![v.as_b().unwrap()[0]; n]),
        _ => {
            let x = a.opt_f32("value", 0.0)?;
            let dt = a.out_dt(0);
            let dt = if dt.kind() == Kind::Float {
                dt
            } else {
                DType::F32
            };
            Arr::floats(dt, shape, vec![x; n])
        }
    }])
}

pub(super) fn band_part(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let lower = a.opt_int("lower", -1)?;
    let upper = a.opt_int("upper", -1)?;
    if x.rank() < 2 {
        return Err("band_part needs rank 2 or more".into());
    }
    let (m, n) = (x.shape[x.rank() - 2], x.shape[x.rank() - 1]);
    let keep = |flat: usize| -> bool {
        let i = ((flat / n) % m) as i64;
        let j = (flat % n) as i64;
        (lower < 0 || i - j <= lower) && (upper < 0 || j - i <= upper)
    };
    Ok(vec![match &x.data {
        Data::F(v) => Arr::floats(
            x.dt,
            x.shape.clone(),
            v.iter()
                .enumerate()
                .map(|(f, &p)| if keep(f) { p } else { 0.0 })
                .collect(),
        ),
        Data::I(v) => Arr::ints(
            x.dt,
            x.shape.clone(),
            v.iter()
                .enumerate()
                .map(|(f, &p)| if keep(f) { p } else { 0 })
                .collect(),
        ),
        _ => return Err(format!("band_part of {}", x.describe())),
    }])
}
