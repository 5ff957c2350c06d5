//! Ops the reference packages do not exercise, each in a tiny program written here, checked
//! against values worked out from the op documentation.

use kiln_coreml::proto::*;
use kiln_coreml::{Executor, MlPackage, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

const F32: DataType = DataType::Float32;
const I32: DataType = DataType::Int32;

fn tensor_type(dt: DataType, dims: &[i64]) -> ValueType {
    ValueType {
        r#type: Some(ValueTypeKind::TensorType(TensorType {
            data_type: dt as i32,
            rank: dims.len() as i64,
            dimensions: dims
                .iter()
                .map(|&d| Dimension {
                    dimension: Some(if d < 0 {
                        DimensionKind::Unknown(UnknownDimension { variadic: false })
                    } else {
                        DimensionKind::Constant(ConstantDimension { size: d as u64 })
                    }),
                })
                .collect(),
            attributes: Default::default(),
        })),
    }
}

fn literal(dt: DataType, dims: &[i64], v: TensorValueKind) -> Value {
    Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dt, dims)),
        value: Some(ValueKind::ImmediateValue(ImmediateValue {
            value: Some(ImmediateValueKind::Tensor(TensorValue { value: Some(v) })),
        })),
    }
}

fn floats(dims: &[i64], v: &[f32]) -> Value {
    literal(
        F32,
        dims,
        TensorValueKind::Floats(RepeatedFloats { values: v.to_vec() }),
    )
}

fn ints_of(dt: DataType, dims: &[i64], v: &[i32]) -> Value {
    literal(
        dt,
        dims,
        TensorValueKind::Ints(RepeatedInts { values: v.to_vec() }),
    )
}

fn ints(dims: &[i64], v: &[i32]) -> Value {
    ints_of(I32, dims, v)
}

fn int(v: i32) -> Value {
    ints(&[], &[v])
}

fn boolean(v: bool) -> Value {
    literal(
        DataType::Bool,
        &[],
        TensorValueKind::Bools(RepeatedBools { values: vec![v] }),
    )
}

fn bools(v: &[bool]) -> Value {
    literal(
        DataType::Bool,
        &[v.len() as i64],
        TensorValueKind::Bools(RepeatedBools { values: v.to_vec() }),
    )
}

fn string(s: &str) -> Value {
    literal(
        DataType::String,
        &[],
        TensorValueKind::Strings(RepeatedStrings {
            values: vec![s.to_string()],
        }),
    )
}

enum Arg {
    Var(&'static str),
    Vars(Vec<&'static str>),
    Lit(Value),
}

/// One op: its type, inputs and (name, type, dims) outputs.
fn op(ty: &str, inputs: Vec<(&str, Arg)>, outputs: &[(&str, DataType, &[i64])]) -> Operation {
    Operation {
        r#type: ty.to_string(),
        inputs: inputs
            .into_iter()
            .map(|(k, a)| {
                let bindings = match a {
                    Arg::Var(n) => vec![BindingKind::Name(n.into())],
                    Arg::Vars(ns) => ns
                        .into_iter()
                        .map(|n| BindingKind::Name(n.into()))
                        .collect(),
                    Arg::Lit(v) => vec![BindingKind::Value(v)],
                };
                (
                    k.to_string(),
                    Argument {
                        arguments: bindings
                            .into_iter()
                            .map(|b| Binding { binding: Some(b) })
                            .collect(),
                    },
                )
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|(n, dt, dims)| NamedValueType {
                name: n.to_string(),
                r#type: Some(tensor_type(*dt, dims)),
            })
            .collect(),
        blocks: vec![],
        attributes: Default::default(),
    }
}

fn array_feature(name: &str, dt: ArrayDataType, shape: &[i64]) -> FeatureDescription {
    FeatureDescription {
        name: name.into(),
        short_description: String::new(),
        r#type: Some(FeatureType {
            r#type: Some(FeatureTypeKind::MultiArrayType(ArrayFeatureType {
                shape: shape.to_vec(),
                data_type: dt as i32,
                shape_flexibility: None,
            })),
            is_optional: false,
        }),
    }
}

/// Writes a package whose main function takes fp32 inputs of the given shapes, runs `ops`,
/// and returns the fp32 values `outputs`.
fn package(
    inputs: &[(&str, &[i64])],
    ops: Vec<Operation>,
    outputs: &[&str],
    output_types: &[DataType],
) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "kiln-coreml-ops-{}-{}.mlpackage",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("Data/com.apple.CoreML")).unwrap();
    std::fs::write(
        dir.join("Manifest.json"),
        r#"{"fileFormatVersion": "1.0.0", "rootModelIdentifier": "m",
            "itemInfoEntries": {"m": {"path": "com.apple.CoreML/model.mlmodel"}}}"#,
    )
    .unwrap();
    let block = Block {
        inputs: vec![],
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        operations: ops,
        attributes: Default::default(),
    };
    let function = Function {
        inputs: inputs
            .iter()
            .map(|(n, d)| NamedValueType {
                name: n.to_string(),
                r#type: Some(tensor_type(F32, d)),
            })
            .collect(),
        opset: "CoreML8".into(),
        block_specializations: [("CoreML8".to_string(), block)].into_iter().collect(),
        attributes: Default::default(),
    };
    let out_dt = |dt: &DataType| match dt {
        DataType::Int32 | DataType::Bool => ArrayDataType::Int32,
        DataType::Float16 => ArrayDataType::Float16,
        _ => ArrayDataType::Float32,
    };
    let model = Model {
        specification_version: 9,
        description: Some(ModelDescription {
            input: inputs
                .iter()
                .map(|(n, d)| array_feature(n, ArrayDataType::Float32, d))
                .collect(),
            output: outputs
                .iter()
                .zip(output_types)
                .map(|(n, dt)| array_feature(n, out_dt(dt), &[]))
                .collect(),
            ..Default::default()
        }),
        is_updatable: false,
        r#type: Some(ModelType::MlProgram(Program {
            version: 1,
            functions: [("main".to_string(), function)].into_iter().collect(),
            doc_string: String::new(),
            attributes: Default::default(),
        })),
    };
    std::fs::write(
        dir.join("Data/com.apple.CoreML/model.mlmodel"),
        model.encode_to_vec(),
    )
    .unwrap();
    dir
}

/// Runs a single-output program on fp32 inputs and returns the output's shape and values.
fn run(
    inputs: &[(&str, &[i64], &[f32])],
    ops: Vec<Operation>,
    out: &str,
    out_dt: DataType,
) -> (Vec<usize>, Vec<f32>) {
    let shapes: Vec<(&str, &[i64])> = inputs.iter().map(|(n, d, _)| (*n, *d)).collect();
    let dir = package(&shapes, ops, &[out], &[out_dt]);
    let pkg = MlPackage::open(&dir).unwrap();
    pkg.verify().unwrap_or_else(|e| panic!("{e}"));
    let mut exec = Executor::new(&pkg).unwrap();
    let mut feed = HashMap::new();
    for (n, d, v) in inputs {
        let shape: Vec<usize> = d.iter().map(|&x| x as usize).collect();
        feed.insert(n.to_string(), Tensor::f32(shape, v.to_vec()).unwrap());
    }
    let res = exec.predict(&feed).unwrap_or_else(|e| panic!("{e}"));
    let t = &res[out];
    (t.shape().to_vec(), t.to_f32_vec())
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

fn iota(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn scaled_dot_product_attention_matches_its_definition() {
    let (b, h, l, s, e) = (1usize, 2usize, 3usize, 4usize, 5usize);
    let q: Vec<f32> = (0..b * h * l * e)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0)
        .collect();
    let k: Vec<f32> = (0..b * h * s * e)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) / 9.0)
        .collect();
    let v: Vec<f32> = (0..b * h * s * e)
        .map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0)
        .collect();
    let mask: Vec<f32> = (0..l * s)
        .map(|i| {
            if i % s > 1 + i / s {
                f32::NEG_INFINITY
            } else {
                0.1 * (i % 3) as f32
            }
        })
        .collect();
    let dims = |a, b2| vec![b as i64, h as i64, a, b2];
    let (qd, kd) = (dims(l as i64, e as i64), dims(s as i64, e as i64));
    let md = [1i64, 1, l as i64, s as i64];
    let ops = vec![op(
        "scaled_dot_product_attention",
        vec![
            ("query", Arg::Var("q")),
            ("key", Arg::Var("k")),
            ("value", Arg::Var("v")),
            ("attn_mask", Arg::Var("m")),
        ],
        &[("y", F32, &[1, 2, 3, 5])],
    )];
    let (shape, got) = run(
        &[
            ("q", &qd, &q),
            ("k", &kd, &k),
            ("v", &kd, &v),
            ("m", &md, &mask),
        ],
        ops,
        "y",
        F32,
    );
    assert_eq!(shape, vec![1, 2, 3, 5]);
    let mut want = vec![0f32; b * h * l * e];
    for hh in 0..h {
        for i in 0..l {
            let mut w: Vec<f64> = (0..s)
                .map(|j| {
                    let dot: f64 = (0..e)
                        .map(|x| (q[(hh * l + i) * e + x] * k[(hh * s + j) * e + x]) as f64)
                        .sum();
                    dot / (e as f64).sqrt() + mask[i * s + j] as f64
                })
                .collect();
            let mx = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = w.iter().map(|x| (x - mx).exp()).sum();
            for x in w.iter_mut() {
                *x = (*x - mx).exp() / sum;
            }
            for x in 0..e {
                want[(hh * l + i) * e + x] = (0..s)
                    .map(|j| w[j] * v[(hh * s + j) * e + x] as f64)
                    .sum::<f64>() as f32;
            }
        }
    }
    close(&got, &want, 1e-5);
}

#[test]
fn layer_norm_and_reductions() {
    let x = [1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 6.0];
    let ops = vec![op(
        "layer_norm",
        vec![
            ("x", Arg::Var("x")),
            ("axes", Arg::Lit(ints(&[1], &[-1]))),
            ("gamma", Arg::Lit(floats(&[4], &[1.0, 2.0, 1.0, 1.0]))),
            ("beta", Arg::Lit(floats(&[4], &[0.0, 0.0, 0.5, 0.0]))),
            ("epsilon", Arg::Lit(floats(&[], &[0.0]))),
        ],
        &[("y", F32, &[2, 4])],
    )];
    let (_, got) = run(&[("x", &[2, 4], &x)], ops, "y", F32);
    let norm = |r: &[f32]| -> Vec<f32> {
        let m = r.iter().sum::<f32>() / 4.0;
        let var = r.iter().map(|v| (v - m).powi(2)).sum::<f32>() / 4.0;
        r.iter().map(|v| (v - m) / var.sqrt()).collect()
    };
    let mut want = norm(&x[..4]);
    want.extend(norm(&x[4..]));
    for row in want.chunks_mut(4) {
        row[1] *= 2.0;
        row[2] += 0.5;
    }
    close(&got, &want, 1e-5);

    let ops = vec![
        op(
            "reduce_max",
            vec![
                ("x", Arg::Var("x")),
                ("axes", Arg::Lit(ints(&[1], &[0]))),
                ("keep_dims", Arg::Lit(boolean(true))),
            ],
            &[("m", F32, &[1, 4])],
        ),
        op("reduce_sum", vec![("x", Arg::Var("m"))], &[("s", F32, &[])]),
    ];
    let (shape, got) = run(&[("x", &[2, 4], &x)], ops, "s", F32);
    assert!(shape.is_empty());
    assert_eq!(got, vec![1.0 + 2.0 + 3.0 + 6.0]);
}

#[test]
fn slicing_with_negative_strides_masks_and_squeeze() {
    let x = iota(24);
    // x[1, ::-2, 1:] on a [2, 3, 4] tensor.
    let ops = vec![op(
        "slice_by_index",
        vec![
            ("x", Arg::Var("x")),
            ("begin", Arg::Lit(ints(&[3], &[1, -1, 1]))),
            ("end", Arg::Lit(ints(&[3], &[0, 0, 0]))),
            ("stride", Arg::Lit(ints(&[3], &[1, -2, 1]))),
            ("begin_mask", Arg::Lit(bools(&[false, false, false]))),
            ("end_mask", Arg::Lit(bools(&[false, true, true]))),
            ("squeeze_mask", Arg::Lit(bools(&[true, false, false]))),
        ],
        &[("y", F32, &[2, 3])],
    )];
    let (shape, got) = run(&[("x", &[2, 3, 4], &x)], ops, "y", F32);
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(got, vec![21.0, 22.0, 23.0, 13.0, 14.0, 15.0]);

    // slice_update writes every other column of row 0.
    let ops = vec![op(
        "slice_update",
        vec![
            ("x", Arg::Var("x")),
            ("update", Arg::Lit(floats(&[1, 2], &[-1.0, -2.0]))),
            ("begin", Arg::Lit(ints(&[2], &[0, 0]))),
            ("end", Arg::Lit(ints(&[2], &[1, 4]))),
            ("stride", Arg::Lit(ints(&[2], &[1, 2]))),
        ],
        &[("y", F32, &[2, 4])],
    )];
    let (_, got) = run(&[("x", &[2, 4], &iota(8))], ops, "y", F32);
    assert_eq!(got, vec![-1.0, 1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
}

#[test]
fn shape_ops() {
    let x = iota(6);
    // transpose -> reshape with 0 and -1 -> tile -> concat interleaved -> split -> stack
    let ops = vec![
        op(
            "transpose",
            vec![
                ("x", Arg::Var("x")),
                ("perm", Arg::Lit(ints(&[2], &[1, 0]))),
            ],
            &[("t", F32, &[3, 2])],
        ),
        op(
            "reshape",
            vec![
                ("x", Arg::Var("t")),
                ("shape", Arg::Lit(ints(&[3], &[1, -1, 0]))),
            ],
            &[("r", F32, &[1, 3, 2])],
        ),
        op(
            "tile",
            vec![
                ("x", Arg::Var("r")),
                ("reps", Arg::Lit(ints(&[3], &[2, 1, 1]))),
            ],
            &[("tl", F32, &[2, 3, 2])],
        ),
        op(
            "concat",
            vec![
                ("values", Arg::Vars(vec!["tl", "tl"])),
                ("axis", Arg::Lit(int(2))),
                ("interleave", Arg::Lit(boolean(true))),
            ],
            &[("c", F32, &[2, 3, 4])],
        ),
        op(
            "split",
            vec![
                ("x", Arg::Var("c")),
                ("axis", Arg::Lit(int(0))),
                ("num_splits", Arg::Lit(int(2))),
            ],
            &[("s0", F32, &[1, 3, 4]), ("s1", F32, &[1, 3, 4])],
        ),
        op(
            "stack",
            vec![
                ("values", Arg::Vars(vec!["s1", "s0"])),
                ("axis", Arg::Lit(int(-1))),
            ],
            &[("st", F32, &[1, 3, 4, 2])],
        ),
        op(
            "squeeze",
            vec![("x", Arg::Var("st")), ("axes", Arg::Lit(ints(&[1], &[0])))],
            &[("y", F32, &[3, 4, 2])],
        ),
    ];
    let (shape, got) = run(&[("x", &[2, 3], &x)], ops, "y", F32);
    assert_eq!(shape, vec![3, 4, 2]);
    // t = [[0,3],[1,4],[2,5]]; interleaving t with itself doubles each element in place.
    let row = |a: f32, b: f32| vec![a, a, a, a, b, b, b, b];
    let want: Vec<f32> = [row(0.0, 3.0), row(1.0, 4.0), row(2.0, 5.0)].concat();
    assert_eq!(got, want);
}

#[test]
fn gathers_select_cast_and_ranges() {
    let x = iota(6);
    let ops = vec![
        op(
            "gather_along_axis",
            vec![
                ("x", Arg::Var("x")),
                ("indices", Arg::Lit(ints(&[2, 2], &[2, 0, 1, 1]))),
                ("axis", Arg::Lit(int(1))),
            ],
            &[("g", F32, &[2, 2])],
        ),
        op(
            "greater",
            vec![("x", Arg::Var("g")), ("y", Arg::Lit(floats(&[], &[1.5])))],
            &[("c", DataType::Bool, &[2, 2])],
        ),
        op(
            "select",
            vec![
                ("cond", Arg::Var("c")),
                ("a", Arg::Var("g")),
                ("b", Arg::Lit(floats(&[1, 2], &[-1.0, -2.0]))),
            ],
            &[("y", F32, &[2, 2])],
        ),
    ];
    let (_, got) = run(&[("x", &[2, 3], &x)], ops, "y", F32);
    // g = [[2, 0], [4, 4]]
    assert_eq!(got, vec![2.0, -2.0, 4.0, 4.0]);

    let ops = vec![
        op(
            "cast",
            vec![("x", Arg::Var("x")), ("dtype", Arg::Lit(string("int32")))],
            &[("i", I32, &[4])],
        ),
        op(
            "reduce_argmax",
            vec![("x", Arg::Var("x")), ("axis", Arg::Lit(int(0)))],
            &[("a", I32, &[])],
        ),
        op(
            "range_1d",
            vec![
                ("start", Arg::Lit(int(10))),
                ("end", Arg::Lit(int(2))),
                ("step", Arg::Lit(int(-3))),
            ],
            &[("r", I32, &[-1])],
        ),
        op(
            "concat",
            vec![
                ("values", Arg::Vars(vec!["i", "a", "r"])),
                ("axis", Arg::Lit(int(0))),
            ],
            &[("y", I32, &[-1])],
        ),
    ];
    let (_, got) = run(&[("x", &[4], &[1.7, -2.5, 9.2, 3.0])], ops, "y", I32);
    assert_eq!(got, vec![1.0, -2.0, 9.0, 3.0, 2.0, 10.0, 7.0, 4.0]);
}

#[test]
fn activations() {
    let x = [-2.0f32, -0.5, 0.0, 0.5, 3.0];
    for (mode, f) in [
        (
            "EXACT",
            (|v: f32| 0.5 * v * (1.0 + erf64(v as f64 / 2f64.sqrt()) as f32)) as fn(f32) -> f32,
        ),
        ("TANH_APPROXIMATION", |v: f32| {
            0.5 * v
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        }),
        ("SIGMOID_APPROXIMATION", |v: f32| {
            v / (1.0 + (-1.702 * v).exp())
        }),
    ] {
        let ops = vec![op(
            "gelu",
            vec![("x", Arg::Var("x")), ("mode", Arg::Lit(string(mode)))],
            &[("y", F32, &[5])],
        )];
        let (_, got) = run(&[("x", &[5], &x)], ops, "y", F32);
        let want: Vec<f32> = x.iter().map(|&v| f(v)).collect();
        close(&got, &want, 1e-6);
    }
    let ops = vec![op(
        "clip",
        vec![
            ("x", Arg::Var("x")),
            ("alpha", Arg::Lit(floats(&[], &[-1.0]))),
            ("beta", Arg::Lit(floats(&[], &[1.0]))),
        ],
        &[("y", F32, &[5])],
    )];
    let (_, got) = run(&[("x", &[5], &x)], ops, "y", F32);
    assert_eq!(got, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
}

/// erf by its series, for checking (converges fast on the small arguments used here).
fn erf64(x: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..60 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

#[test]
fn lut_vector_palettization_follows_the_documented_examples() {
    // Case 2 of the constexpr_lut_to_dense documentation: uint1 indices [2, 2, 2], two
    // 3-vectors a = (1, 2, 3) and b = (10, 20, 30).
    let indices = [0, 0, 1, 0, 1, 1, 0, 0];
    let lut = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
    for (axis, out_dims, want) in [
        (
            1,
            [2i64, 6, 2],
            vec![
                1., 1., 2., 2., 3., 3., 10., 1., 20., 2., 30., 3., //
                10., 10., 20., 20., 30., 30., 1., 1., 2., 2., 3., 3.,
            ],
        ),
        (
            2,
            [2, 2, 6],
            vec![
                1., 2., 3., 1., 2., 3., 10., 20., 30., 1., 2., 3., //
                10., 20., 30., 10., 20., 30., 1., 2., 3., 1., 2., 3.,
            ],
        ),
    ] {
        let ops = vec![
            op(
                "constexpr_lut_to_dense",
                vec![
                    (
                        "indices",
                        Arg::Lit(ints_of(DataType::Uint1, &[2, 2, 2], &indices)),
                    ),
                    ("lut", Arg::Lit(floats(&[1, 1, 1, 2, 3], &lut))),
                    ("vector_axis", Arg::Lit(int(axis))),
                ],
                &[("w", F32, &out_dims)],
            ),
            op(
                "add",
                vec![("x", Arg::Var("w")), ("y", Arg::Var("z"))],
                &[("y", F32, &out_dims)],
            ),
        ];
        let (_, got) = run(&[("z", &[1], &[0.0])], ops, "y", F32);
        assert_eq!(got, want, "vector_axis {axis}");
    }
}

#[test]
fn grouped_lut_and_blockwise_offsets() {
    // Case 1 of the documentation: two groups of three rows with 2-bit palettes.
    let ops = vec![
        op(
            "constexpr_lut_to_dense",
            vec![
                (
                    "indices",
                    Arg::Lit(ints_of(
                        DataType::Uint2,
                        &[6, 2],
                        &[2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3],
                    )),
                ),
                (
                    "lut",
                    Arg::Lit(floats(
                        &[2, 1, 4, 1],
                        &[1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0],
                    )),
                ),
            ],
            &[("w", F32, &[6, 2])],
        ),
        op(
            "constexpr_blockwise_shift_scale",
            vec![
                (
                    "data",
                    Arg::Lit(ints_of(
                        DataType::Int8,
                        &[2, 4],
                        &[1, 2, 3, 4, -1, -2, -3, -4],
                    )),
                ),
                ("scale", Arg::Lit(floats(&[2, 2], &[1.0, 10.0, 0.5, 2.0]))),
                (
                    "offset",
                    Arg::Lit(ints_of(DataType::Int8, &[2, 2], &[1, 0, 0, -4])),
                ),
            ],
            &[("d", F32, &[2, 4])],
        ),
        op(
            "reshape",
            vec![
                ("x", Arg::Var("d")),
                ("shape", Arg::Lit(ints(&[2], &[4, 2]))),
            ],
            &[("d2", F32, &[4, 2])],
        ),
        op(
            "concat",
            vec![
                ("values", Arg::Vars(vec!["w", "d2"])),
                ("axis", Arg::Lit(int(0))),
            ],
            &[("c", F32, &[10, 2])],
        ),
        op(
            "add",
            vec![("x", Arg::Var("c")), ("y", Arg::Var("z"))],
            &[("y", F32, &[10, 2])],
        ),
    ];
    let (_, got) = run(&[("z", &[1], &[0.0])], ops, "y", F32);
    let lut_part = [9., 13., 13., 1., 5., 1., 26., 2., 18., 10., 2., 26.];
    // Blocks of 2 columns: row 0 scales (1, 10) offsets (1, 0); row 1 scales (0.5, 2)
    // offsets (0, -4).
    let shift_part = [0., 1., 30., 40., -0.5, -1., 2., 0.];
    assert_eq!(got, [&lut_part[..], &shift_part[..]].concat());
}
