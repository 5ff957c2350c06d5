//! Compile-time weight decompression ops, expanded once when a program is loaded.

use super::{norm_axis, strides, Args};
use crate::value::{Arr, DType, Kind};

/// Expands a `constexpr_*` op whose inputs are all constants.
pub(crate) fn run_constexpr(op_type: &str, a: &Args) -> Result<Arr, String> {
    match op_type {
        "constexpr_blockwise_shift_scale" => blockwise_shift_scale(a),
        "constexpr_lut_to_dense" => lut_to_dense(a),
        "constexpr_affine_dequantize" => affine_dequantize(a),
        "constexpr_cast" => {
            let x = a.arr("source_val")?;
            let to = a.string("output_dtype")?;
            let dt = DType::from_name(to).ok_or_else(|| format!("output_dtype {to:?}"))?;
            match (x.as_f(), dt.kind()) {
                (Some(v), Kind::Float) => Ok(Arr::floats(dt, x.shape.clone(), v.to_vec())),
                _ => Err(format!("constexpr_cast of {} to {to}", x.describe())),
            }
        }
        other => Err(format!("{other} is not a constexpr op kiln knows")),
    }
}

/// The values of `data` as f32 (integers exactly).
fn as_f32(x: &Arr) -> Result<Vec<f32>, String> {
    match (x.as_f(), x.as_i()) {
        (Some(v), _) => Ok(v.to_vec()),
        (_, Some(v)) => Ok(v.iter().map(|&p| p as f32).collect()),
        _ => Err(format!("{} is not numeric", x.describe())),
    }
}

/// For each element of `shape`, the flat index of its block in a tensor of `blocks` shape,
/// where block sizes are `shape[d] / blocks[d]`.
fn block_index(shape: &[usize], blocks: &[usize]) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let bs: Vec<usize> = shape.iter().zip(blocks).map(|(&s, &b)| s / b).collect();
    let ss = strides(shape);
    let bst = strides(blocks);
    (0..n)
        .map(|flat| {
            let mut off = 0;
            for d in 0..shape.len() {
                let c = (flat / ss[d]) % shape[d];
                off += (c / bs[d]) * bst[d];
            }
            off
        })
        .collect()
}

fn check_blocks(what: &str, data: &[usize], blocks: &[usize]) -> Result<(), String> {
    if data.len() != blocks.len() {
        return Err(format!(
            "{what} has rank {}, data has rank {}",
            blocks.len(),
            data.len()
        ));
    }
    for (d, (&n, &b)) in data.iter().zip(blocks).enumerate() {
        if b == 0 || n % b != 0 {
            return Err(format!(
                "dimension {d}: data has {n} but {what} has {b}, which does not divide it"
            ));
        }
    }
    Ok(())
}

/// `output = scale * (data - offset)`, with scale and offset repeated over blocks.
fn blockwise_shift_scale(a: &Args) -> Result<Arr, String> {
    let data = a.arr("data")?;
    let scale = a.arr("scale")?;
    if !matches!(
        data.dt,
        DType::I4 | DType::U4 | DType::I8 | DType::U8 | DType::F16 | DType::F32
    ) {
        return Err(format!(
            "data is {}, expected int4/uint4/int8/uint8/fp16/fp32",
            data.describe()
        ));
    }
    if !matches!(scale.dt, DType::F16 | DType::F32) {
        return Err(format!(
            "scale is {}, expected fp16 or fp32",
            scale.describe()
        ));
    }
    if data.rank() == 0 {
        return Err("data is a scalar".into());
    }
    check_blocks("scale", &data.shape, &scale.shape)?;
    let offset = a.opt("offset")?;
    if let Some(o) = offset {
        if o.shape != scale.shape {
            return Err(format!(
                "offset is {} but scale is {}",
                o.describe(),
                scale.describe()
            ));
        }
        if o.kind() != Kind::Float && o.dt != data.dt {
            return Err(format!(
                "offset is {} but data is {}",
                o.describe(),
                data.describe()
            ));
        }
    }
    let dv = as_f32(data)?;
    let sv = scale.as_f().expect("float scale");
    let ov = offset.map(as_f32).transpose()?;
    let blocks = block_index(&data.shape, &scale.shape);
    let half = scale.dt == DType::F16;
    let out: Vec<f32> = dv
        .iter()
        .zip(&blocks)
        .map(|(&q, &b)| {
            let mut centred = match &ov {
                Some(o) => q - o[b],
                None => q,
            };
            // The reference decompression works in the scale's type, so the difference is
            // rounded to fp16 before scaling when the scale is fp16.
            if half {
                centred = crate::value::round_f16(centred);
            }
            sv[b] * centred
        })
        .collect();
    Ok(Arr::floats(scale.dt, data.shape.clone(), out))
}

/// Looks each index up in the palette of its group (iOS 18 grouped / vector LUT).
fn lut_to_dense(a: &Args) -> Result<Arr, String> {
    let ind = a.arr("indices")?;
    let lut = a.arr("lut")?;
    let iv = ind
        .as_i()
        .ok_or_else(|| format!("indices are {}, expected unsigned integers", ind.describe()))?;
    let bits = match ind.dt {
        DType::U1 => 1,
        DType::U2 => 2,
        DType::U3 => 3,
        DType::U4 => 4,
        DType::U6 => 6,
        DType::U8 => 8,
        _ => {
            return Err(format!(
                "indices are {}, expected uint1/2/3/4/6/8",
                ind.describe()
            ))
        }
    };
    let k = ind.rank();
    if k == 0 || lut.rank() != k + 2 {
        return Err(format!(
            "lut is {} for indices {}: expected rank {}",
            lut.describe(),
            ind.describe(),
            k + 2
        ));
    }
    let palettes = lut.shape[k];
    let vsize = lut.shape[k + 1];
    if palettes != 1 << bits {
        return Err(format!(
            "lut has {palettes} entries per palette but {} indices need {}",
            ind.dt,
            1 << bits
        ));
    }
    check_blocks("lut", &ind.shape, &lut.shape[..k])?;
    let lv = as_f32(lut)?;
    let groups = block_index(&ind.shape, &lut.shape[..k]);
    let axis = match a.opt("vector_axis")? {
        Some(_) => Some(norm_axis(a.int("vector_axis")?, k, "vector_axis")?),
        None if vsize > 1 => return Err("vector_axis is required when VECTOR_SIZE > 1".into()),
        None => None,
    };
    let entry = palettes * vsize;
    let mut out_shape = ind.shape.clone();
    let out_len = iv.len() * vsize;
    let mut out = vec![0f32; out_len];
    if let Some(ax) = axis.filter(|_| vsize > 1) {
        out_shape[ax] *= vsize;
        let os = strides(&out_shape);
        let is = strides(&ind.shape);
        for (flat, (&p, &g)) in iv.iter().zip(&groups).enumerate() {
            let mut base = 0;
            for d in 0..k {
                let c = (flat / is[d]) % ind.shape[d];
                base += if d == ax { c * vsize } else { c } * os[d];
            }
            for v in 0..vsize {
                out[base + v * os[ax]] = lv[g * entry + p as usize * vsize + v];
            }
        }
    } else {
        for ((o, &p), &g) in out.iter_mut().zip(iv).zip(&groups) {
            *o = lv[g * entry + p as usize];
        }
    }
    match lut.kind() {
        Kind::Float => Ok(Arr::floats(lut.dt, out_shape, out)),
        _ => Ok(Arr::ints(
            lut.dt,
            out_shape,
            out.into_iter().map(|v| v as i32).collect(),
        )),
    }
}

/// iOS 16 per-channel affine dequantization: `scale * (q - zero_point)` along `axis`.
fn affine_dequantize(a: &Args) -> Result<Arr, String> {
    let q = a.arr("quantized_data")?;
    let zp = a.arr("zero_point")?;
    let sc = a.arr("scale")?;
    let axis = norm_axis(a.int("axis")?, q.rank(), "axis")?;
    let qv = as_f32(q)?;
    let zv = as_f32(zp)?;
    let sv = sc
        .as_f()
        .ok_or_else(|| format!("scale is {}, expected float", sc.describe()))?;
    let n = q.shape[axis];
    let pick = |v: &[f32], c: usize, what: &str| -> Result<f32, String> {
        match v.len() {
            1 => Ok(v[0]),
            l if l == n => Ok(v[c]),
            l => Err(format!("{what} has {l} elements, expected 1 or {n}")),
        }
    };
    let inner: usize = q.shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(qv.len());
    for (flat, &x) in qv.iter().enumerate() {
        let c = (flat / inner.max(1)) % n.max(1);
        out.push(pick(sv, c, "scale")? * (x - pick(&zv, c, "zero_point")?));
    }
    Ok(Arr::floats(sc.dt, q.shape.clone(), out))
}
