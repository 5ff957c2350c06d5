//! Element-wise ops: binary arithmetic and comparisons with numpy broadcasting, unary math,
//! `cast` and `select`.

use super::{broadcast_shape, broadcast_strides, broadcast_to, same_kind, Args, OpResult};
use crate::value::{Arr, DType, Kind};

/// Applies `f` to `a` and `b` broadcast to `out`.
fn bcast2<A: Copy, B: Copy, R>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> R,
) -> Vec<R> {
    let n: usize = out.iter().product();
    if ash == out && bsh == out {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    if bsh.iter().product::<usize>() == 1 && ash == out {
        let y = b[0];
        return a.iter().map(|&x| f(x, y)).collect();
    }
    if ash.iter().product::<usize>() == 1 && bsh == out {
        let x = a[0];
        return b.iter().map(|&y| f(x, y)).collect();
    }
    let mut res = Vec::with_capacity(n);
    if n == 0 {
        return res;
    }
    let r = out.len();
    let sa = broadcast_strides(ash, out);
    let sb = broadcast_strides(bsh, out);
    let inner = out[r - 1];
    let (ia, ib) = (sa[r - 1], sb[r - 1]);
    let mut idx = vec![0usize; r - 1];
    let (mut oa, mut ob) = (0isize, 0isize);
    loop {
        let (mut pa, mut pb) = (oa, ob);
        for _ in 0..inner {
            res.push(f(a[pa as usize], b[pb as usize]));
            pa += ia;
            pb += ib;
        }
        let mut d = r - 1;
        loop {
            if d == 0 {
                return res;
            }
            d -= 1;
            idx[d] += 1;
            oa += sa[d];
            ob += sb[d];
            if idx[d] < out[d] {
                break;
            }
            oa -= sa[d] * idx[d] as isize;
            ob -= sb[d] * idx[d] as isize;
            idx[d] = 0;
        }
    }
}

fn int_div(x: i32, y: i32, floor: bool) -> Result<i32, String> {
    if y == 0 {
        return Err("integer division by zero".into());
    }
    let q = x as i64 / y as i64;
    let q = if floor && (x as i64 % y as i64 != 0) && ((x < 0) != (y < 0)) {
        q - 1
    } else {
        q
    };
    Ok(q as i32)
}

pub(super) fn binary(op: &str, a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let y = a.arr("y")?;
    let out = broadcast_shape(&x.shape, &y.shape)?;
    let kind = same_kind(x, y, op)?;
    let cmp = matches!(
        op,
        "equal" | "not_equal" | "less" | "less_equal" | "greater" | "greater_equal"
    );
    if cmp {
        let v = match kind {
            Kind::Float => {
                let (xs, ys) = (x.as_f().unwrap(), y.as_f().unwrap());
                let f: fn(f32, f32) -> bool = match op {
                    "equal" => |p, q| p == q,
                    "not_equal" => |p, q| p != q,
                    "less" => |p, q| p < q,
                    "less_equal" => |p, q| p <= q,
                    "greater" => |p, q| p > q,
                    _ => |p, q| p >= q,
                };
                bcast2(xs, &x.shape, ys, &y.shape, &out, f)
            }
            Kind::Int => {
                let (xs, ys) = (x.as_i().unwrap(), y.as_i().unwrap());
                let f: fn(i32, i32) -> bool = match op {
                    "equal" => |p, q| p == q,
                    "not_equal" => |p, q| p != q,
                    "less" => |p, q| p < q,
                    "less_equal" => |p, q| p <= q,
                    "greater" => |p, q| p > q,
                    _ => |p, q| p >= q,
                };
                bcast2(xs, &x.shape, ys, &y.shape, &out, f)
            }
            Kind::Bool if matches!(op, "equal" | "not_equal") => {
                let (xs, ys) = (x.as_b().unwrap(), y.as_b().unwrap());
                let ne = op == "not_equal";
                bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| (p == q) != ne)
            }
            _ => return Err(format!("{op} does not apply to {}", x.describe())),
        };
        return Ok(vec![Arr::bools(out, v)]);
    }
    if op.starts_with("logical_") {
        let (Some(xs), Some(ys)) = (x.as_b(), y.as_b()) else {
            return Err(format!(
                "{op} needs bool inputs, found {} and {}",
                x.describe(),
                y.describe()
            ));
        };
        let f: fn(bool, bool) -> bool = match op {
            "logical_and" => |p, q| p && q,
            "logical_or" => |p, q| p || q,
            _ => |p, q| p != q,
        };
        return Ok(vec![Arr::bools(
            out.clone(),
            bcast2(xs, &x.shape, ys, &y.shape, &out, f),
        )]);
    }
    match kind {
        Kind::Float => {
            let (xs, ys) = (x.as_f().unwrap(), y.as_f().unwrap());
            let f: fn(f32, f32) -> f32 = match op {
                "add" => |p, q| p + q,
                "sub" => |p, q| p - q,
                "mul" => |p, q| p * q,
                "real_div" => |p, q| p / q,
                "floor_div" => |p, q| (p / q).floor(),
                "mod" => |p, q| p - (p / q).floor() * q,
                "pow" => |p, q| if q == 2.0 { p * p } else { p.powf(q) },
                "maximum" => |p: f32, q| if p.is_nan() || p > q { p } else { q },
                "minimum" => |p: f32, q| if p.is_nan() || p < q { p } else { q },
                _ => return Err(format!("{op} is not a float binary op")),
            };
            let v = bcast2(xs, &x.shape, ys, &y.shape, &out, f);
            Ok(vec![Arr::floats(float_dt(a.out_dt(0), x.dt), out, v)])
        }
        Kind::Int => {
            let (xs, ys) = (x.as_i().unwrap(), y.as_i().unwrap());
            let v: Vec<Result<i32, String>> = match op {
                "add" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    Ok(p.wrapping_add(q))
                }),
                "sub" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    Ok(p.wrapping_sub(q))
                }),
                "mul" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    Ok(p.wrapping_mul(q))
                }),
                "real_div" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    int_div(p, q, false)
                }),
                "floor_div" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| int_div(p, q, true)),
                "mod" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    let d = int_div(p, q, true)?;
                    Ok(p.wrapping_sub(d.wrapping_mul(q)))
                }),
                "pow" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| {
                    if q < 0 {
                        Err("integer pow with a negative exponent".to_string())
                    } else {
                        Ok(p.wrapping_pow(q as u32))
                    }
                }),
                "maximum" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| Ok(p.max(q))),
                "minimum" => bcast2(xs, &x.shape, ys, &y.shape, &out, |p, q| Ok(p.min(q))),
                _ => return Err(format!("{op} is not an integer binary op")),
            };
            let v: Result<Vec<i32>, String> = v.into_iter().collect();
            Ok(vec![Arr::ints(int_dt(a.out_dt(0), x.dt), out, v?)])
        }
        _ => Err(format!("{op} does not apply to {}", x.describe())),
    }
}

/// The declared output type when it is a float type, else the input's.
fn float_dt(declared: DType, input: DType) -> DType {
    if declared.kind() == Kind::Float {
        declared
    } else {
        input
    }
}

fn int_dt(declared: DType, input: DType) -> DType {
    if declared.kind() == Kind::Int {
        declared
    } else {
        input
    }
}

/// The error function, to within about 1e-7 (Abramowitz and Stegun 7.1.26 refined in f64).
pub(crate) fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    // Numerical Recipes' erfc approximation (fractional error below 1.2e-7).
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    (if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }) as f32
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub(super) fn unary_float(op: &str, a: &Args) -> OpResult {
    let x = a.arr("x")?;
    if x.kind() == Kind::Int && matches!(op, "abs" | "square" | "sign" | "relu") {
        let v = x.as_i().unwrap();
        let f: fn(i32) -> i32 = match op {
            "abs" => |p| p.wrapping_abs(),
            "square" => |p| p.wrapping_mul(p),
            "sign" => |p| p.signum(),
            _ => |p| p.max(0),
        };
        return Ok(vec![Arr::ints(
            x.dt,
            x.shape.clone(),
            v.iter().map(|&p| f(p)).collect(),
        )]);
    }
    let (_, v) = a.float("x")?;
    let out: Vec<f32> = match op {
        "rsqrt" => {
            let eps = a.opt_f32("epsilon", 1e-12)?;
            v.iter().map(|&p| 1.0 / (p + eps).sqrt()).collect()
        }
        "inverse" => {
            let eps = a.opt_f32("epsilon", 1e-4)?;
            v.iter().map(|&p| 1.0 / (p + eps)).collect()
        }
        "log" => {
            let eps = a.opt_f32("epsilon", 1e-45)?;
            v.iter().map(|&p| (p + eps).ln()).collect()
        }
        "clip" => {
            let lo = a.opt_f32("alpha", f32::NEG_INFINITY)?;
            let hi = a.opt_f32("beta", f32::INFINITY)?;
            v.iter().map(|&p| p.max(lo).min(hi)).collect()
        }
        "leaky_relu" => {
            let alpha = a.opt_f32("alpha", 0.01)?;
            v.iter()
                .map(|&p| if p >= 0.0 { p } else { alpha * p })
                .collect()
        }
        "gelu" => {
            let mode = a.opt_string("mode")?.unwrap_or("EXACT");
            match mode {
                "EXACT" => v
                    .iter()
                    .map(|&p| 0.5 * p * (1.0 + erf(p / std::f32::consts::SQRT_2)))
                    .collect(),
                "TANH_APPROXIMATION" => {
                    let c = (2.0 / std::f32::consts::PI).sqrt();
                    v.iter()
                        .map(|&p| 0.5 * p * (1.0 + (c * (p + 0.044715 * p * p * p)).tanh()))
                        .collect()
                }
                "SIGMOID_APPROXIMATION" => v.iter().map(|&p| p * sigmoid(1.702 * p)).collect(),
                m => return Err(format!("gelu mode {m:?} is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")),
            }
        }
        _ => {
            let f: fn(f32) -> f32 = match op {
                "abs" => f32::abs,
                "ceil" => f32::ceil,
                "floor" => f32::floor,
                "round" => f32::round_ties_even,
                "sign" => |p| {
                    if p == 0.0 || p.is_nan() {
                        p
                    } else {
                        p.signum()
                    }
                },
                "exp" => f32::exp,
                "exp2" => f32::exp2,
                "sin" => f32::sin,
                "cos" => f32::cos,
                "tan" => f32::tan,
                "tanh" => f32::tanh,
                "atan" => f32::atan,
                "asin" => f32::asin,
                "acos" => f32::acos,
                "sinh" => f32::sinh,
                "cosh" => f32::cosh,
                "sqrt" => f32::sqrt,
                "square" => |p| p * p,
                "erf" => erf,
                "sigmoid" => sigmoid,
                "silu" => |p| p * sigmoid(p),
                "relu" => |p| if p > 0.0 { p } else { 0.0 },
                "softplus" => |p: f32| p.max(0.0) + (-p.abs()).exp().ln_1p(),
                _ => return Err(format!("{op} is not a unary float op")),
            };
            v.iter().map(|&p| f(p)).collect()
        }
    };
    Ok(vec![Arr::floats(
        float_dt(a.out_dt(0), x.dt),
        x.shape.clone(),
        out,
    )])
}

pub(super) fn logical_not(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let v = x
        .as_b()
        .ok_or_else(|| format!("logical_not needs bool, found {}", x.describe()))?;
    Ok(vec![Arr::bools(
        x.shape.clone(),
        v.iter().map(|&p| !p).collect(),
    )])
}

/// Saturating float to integer conversion, truncating toward zero.
fn f2i(p: f32, lo: i64, hi: i64) -> i32 {
    if p.is_nan() {
        0
    } else {
        (p.trunc() as i64).clamp(lo, hi) as i32
    }
}

pub(super) fn cast(a: &Args) -> OpResult {
    let x = a.arr("x")?;
    let name = a.string("dtype")?;
    let to = DType::from_name(name).ok_or_else(|| format!("cast to unknown dtype {name:?}"))?;
    let shape = x.shape.clone();
    Ok(vec![match (to.kind(), &x.kind()) {
        (Kind::Float, Kind::Float) => Arr::floats(to, shape, x.as_f().unwrap().to_vec()),
        (Kind::Float, Kind::Int) => Arr::floats(
            to,
            shape,
            x.as_i().unwrap().iter().map(|&p| p as f32).collect(),
        ),
        (Kind::Float, Kind::Bool) => Arr::floats(
            to,
            shape,
            x.as_b().unwrap().iter().map(|&p| p as i32 as f32).collect(),
        ),
        (Kind::Int, k) => {
            let (lo, hi) = to.int_range().expect("integer type");
            let v: Vec<i32> = match k {
                Kind::Float => x.as_f().unwrap().iter().map(|&p| f2i(p, lo, hi)).collect(),
                Kind::Int => x
                    .as_i()
                    .unwrap()
                    .iter()
                    .map(|&p| (p as i64).clamp(lo, hi) as i32)
                    .collect(),
                Kind::Bool => x.as_b().unwrap().iter().map(|&p| p as i32).collect(),
                Kind::Str => return Err("cannot cast a string".into()),
            };
            Arr::ints(to, shape, v)
        }
        (Kind::Bool, k) => {
            let v: Vec<bool> = match k {
                Kind::Float => x.as_f().unwrap().iter().map(|&p| p != 0.0).collect(),
                Kind::Int => x.as_i().unwrap().iter().map(|&p| p != 0).collect(),
                Kind::Bool => x.as_b().unwrap().to_vec(),
                Kind::Str => return Err("cannot cast a string".into()),
            };
            Arr::bools(shape, v)
        }
        _ => return Err(format!("cannot cast {} to {to}", x.describe())),
    }])
}

pub(super) fn select(a: &Args) -> OpResult {
    let c = a.arr("cond")?;
    let x = a.arr("a")?;
    let y = a.arr("b")?;
    let out = broadcast_shape(&broadcast_shape(&c.shape, &x.shape)?, &y.shape)?;
    let cond: Vec<bool> = match (c.as_b(), c.as_f(), c.as_i()) {
        (Some(v), _, _) => broadcast_to(v, &c.shape, &out),
        (_, Some(v), _) => broadcast_to(v, &c.shape, &out)
            .into_iter()
            .map(|p| p != 0.0)
            .collect(),
        (_, _, Some(v)) => broadcast_to(v, &c.shape, &out)
            .into_iter()
            .map(|p| p != 0)
            .collect(),
        _ => return Err(format!("select's cond is {}", c.describe())),
    };
    same_kind(x, y, "select")?;
    fn pick<T: Copy>(c: &[bool], x: Vec<T>, y: Vec<T>) -> Vec<T> {
        c.iter()
            .zip(x.into_iter().zip(y))
            .map(|(&c, (p, q))| if c { p } else { q })
            .collect()
    }
    Ok(vec![match x.kind() {
        Kind::Float => Arr::floats(
            float_dt(a.out_dt(0), x.dt),
            out.clone(),
            pick(
                &cond,
                broadcast_to(x.as_f().unwrap(), &x.shape, &out),
                broadcast_to(y.as_f().unwrap(), &y.shape, &out),
            ),
        ),
        Kind::Int => Arr::ints(
            int_dt(a.out_dt(0), x.dt),
            out.clone(),
            pick(
                &cond,
                broadcast_to(x.as_i().unwrap(), &x.shape, &out),
                broadcast_to(y.as_i().unwrap(), &y.shape, &out),
            ),
        ),
        Kind::Bool => Arr::bools(
            out.clone(),
            pick(
                &cond,
                broadcast_to(x.as_b().unwrap(), &x.shape, &out),
                broadcast_to(y.as_b().unwrap(), &y.shape, &out),
            ),
        ),
        Kind::Str => return Err("select over strings".into()),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcast2_general() {
        let v = bcast2(&[1, 2, 3], &[3, 1], &[10, 20], &[1, 2], &[3, 2], |p, q| {
            p + q
        });
        assert_eq!(v, vec![11, 21, 12, 22, 13, 23]);
    }

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn integer_division_rounds_as_documented() {
        assert_eq!(int_div(-7, 2, true).unwrap(), -4);
        assert_eq!(int_div(-7, 2, false).unwrap(), -3);
        assert!(int_div(1, 0, false).is_err());
    }
}
