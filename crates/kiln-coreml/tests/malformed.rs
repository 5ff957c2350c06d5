//! Damaged copies of a reference package: `verify` refuses each with a message naming the
//! op or blob at fault, and loading or predicting never panics.

use kiln_coreml::proto::{self, BindingKind, ModelType, ValueKind};
use kiln_coreml::{CoreMlError, Executor, MlPackage, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../../shared/reference/coreml/tiny_llama_stateful_{name}.mlpackage"
    ))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            // Copy the bytes only: the reference files are read-only.
            std::fs::write(&dst, std::fs::read(e.path()).unwrap()).unwrap();
        }
    }
}

/// A fresh writable copy of a reference package.
fn copy_of(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "kiln-coreml-malformed-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let pkg = dir.join(format!("{name}.mlpackage"));
    copy_dir(&reference(name), &pkg);
    pkg
}

fn model_path(pkg: &Path) -> PathBuf {
    pkg.join("Data/com.apple.CoreML/model.mlmodel")
}

fn weights_path(pkg: &Path) -> PathBuf {
    pkg.join("Data/com.apple.CoreML/weights/weight.bin")
}

fn edit_model(pkg: &Path, f: impl FnOnce(&mut proto::Model)) {
    let bytes = std::fs::read(model_path(pkg)).unwrap();
    let mut m = proto::Model::decode(bytes.as_slice()).unwrap();
    f(&mut m);
    std::fs::write(model_path(pkg), m.encode_to_vec()).unwrap();
}

fn main_ops(m: &mut proto::Model) -> &mut Vec<proto::Operation> {
    let Some(ModelType::MlProgram(p)) = m.r#type.as_mut() else {
        panic!("not a program")
    };
    let f = p.functions.get_mut("main").unwrap();
    let opset = f.opset.clone();
    &mut f.block_specializations.get_mut(&opset).unwrap().operations
}

fn op_name(op: &proto::Operation) -> String {
    op.outputs[0].name.clone()
}

fn prefill() -> HashMap<String, Tensor> {
    let mut h = HashMap::new();
    h.insert(
        "input_ids".to_string(),
        Tensor::i32(vec![1, 2], vec![1, 2]).unwrap(),
    );
    h.insert(
        "causal_mask".to_string(),
        Tensor::f16_from_f32(vec![1, 1, 2, 2], &[0.0, f32::NEG_INFINITY, 0.0, 0.0]).unwrap(),
    );
    h
}

/// Runs verify, load and predict, each under catch_unwind; returns verify's error text.
fn refused(pkg: &Path) -> String {
    let outcome = std::panic::catch_unwind(|| {
        let opened = MlPackage::open(pkg);
        let Ok(p) = opened else {
            return opened.unwrap_err().to_string();
        };
        let v = p.verify();
        if let Ok(mut exec) = Executor::new(&p) {
            let _ = exec.predict(&prefill());
        }
        match v {
            Ok(r) => panic!("verify accepted a damaged package: {r}"),
            Err(e) => e.to_string(),
        }
    });
    outcome.unwrap_or_else(|_| panic!("{}: a panic while reading or running", pkg.display()))
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

#[test]
fn bad_sentinel_names_the_blob_and_its_reader() {
    let pkg = copy_of("int4_block32");
    let mut w = std::fs::read(weights_path(&pkg)).unwrap();
    // The first blob's metadata record is at offset 64.
    w[64] ^= 0xFF;
    std::fs::write(weights_path(&pkg), w).unwrap();
    let msg = refused(&pkg);
    assert_mentions(
        &msg,
        &["blob at offset 64", "weight.bin", "sentinel", "read by op"],
    );
}

#[test]
fn truncated_weights_are_refused() {
    let pkg = copy_of("fp16");
    let w = std::fs::read(weights_path(&pkg)).unwrap();
    std::fs::write(weights_path(&pkg), &w[..w.len() / 2]).unwrap();
    let msg = refused(&pkg);
    assert_mentions(&msg, &["blob at offset", "weight.bin", "bytes)"]);
    // Shorter than the header.
    std::fs::write(weights_path(&pkg), &w[..10]).unwrap();
    assert_mentions(&refused(&pkg), &["header"]);
}

#[test]
fn blob_offset_out_of_bounds_is_refused() {
    let pkg = copy_of("pal4_kmeans_grouped16");
    let mut victim = String::new();
    edit_model(&pkg, |m| {
        for op in main_ops(m).iter_mut() {
            if op.r#type != "constexpr_lut_to_dense" {
                continue;
            }
            for arg in op.inputs.values_mut() {
                for b in arg.arguments.iter_mut() {
                    if let Some(BindingKind::Value(v)) = b.binding.as_mut() {
                        if let Some(ValueKind::BlobFileValue(bf)) = v.value.as_mut() {
                            bf.offset = 1 << 40;
                        }
                    }
                }
            }
            victim = op_name(op);
            break;
        }
    });
    let msg = refused(&pkg);
    assert_mentions(
        &msg,
        &["blob at offset 1099511627776", "outside the file", &victim],
    );
}

#[test]
fn misaligned_blob_offset_is_refused() {
    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        for op in main_ops(m).iter_mut() {
            if let Some(v) = op.attributes.get_mut("val") {
                if let Some(ValueKind::BlobFileValue(bf)) = v.value.as_mut() {
                    bf.offset += 8;
                    return;
                }
            }
        }
    });
    assert_mentions(&refused(&pkg), &["not 64-byte aligned"]);
}

#[test]
fn unknown_op_is_named() {
    let pkg = copy_of("fp16");
    let mut victim = String::new();
    edit_model(&pkg, |m| {
        let op = main_ops(m).iter_mut().find(|o| o.r#type == "silu").unwrap();
        op.r#type = "frobnicate".into();
        victim = op_name(op);
    });
    let msg = refused(&pkg);
    assert_mentions(&msg, &["frobnicate", &victim, "not one kiln can run"]);
}

#[test]
fn undefined_variable_is_named() {
    let pkg = copy_of("fp16");
    let mut victim = String::new();
    edit_model(&pkg, |m| {
        let op = main_ops(m)
            .iter_mut()
            .find(|o| o.r#type == "linear")
            .unwrap();
        let x = op.inputs.get_mut("x").unwrap();
        x.arguments[0].binding = Some(BindingKind::Name("no_such_variable".into()));
        victim = op_name(op);
    });
    let msg = refused(&pkg);
    assert_mentions(
        &msg,
        &["undefined variable", "no_such_variable", &victim, "linear"],
    );
}

#[test]
fn use_before_definition_is_refused() {
    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        let ops = main_ops(m);
        let i = ops.iter().position(|o| o.r#type == "rsqrt").unwrap();
        let op = ops.remove(i);
        ops.insert(0, op);
    });
    assert_mentions(&refused(&pkg), &["undefined variable", "rsqrt"]);
}

#[test]
fn description_disagreeing_with_the_function_is_refused() {
    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        let d = m.description.as_mut().unwrap();
        let t = d.input[1].r#type.as_mut().unwrap();
        if let Some(proto::FeatureTypeKind::MultiArrayType(a)) = t.r#type.as_mut() {
            a.data_type = proto::ArrayDataType::Float32 as i32;
        }
    });
    assert_mentions(
        &refused(&pkg),
        &["description disagrees", "causal_mask", "fp32", "fp16"],
    );

    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        m.description.as_mut().unwrap().output[0].name = "probabilities".into();
    });
    assert_mentions(&refused(&pkg), &["description disagrees", "probabilities"]);

    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        m.description.as_mut().unwrap().state.pop();
    });
    assert_mentions(&refused(&pkg), &["description disagrees", "valueCache"]);
}

#[test]
fn specification_version_too_old_for_states() {
    let pkg = copy_of("int8_perchannel");
    edit_model(&pkg, |m| m.specification_version = 8);
    assert_mentions(
        &refused(&pkg),
        &["specification version 8 is too old", "states", "version 9"],
    );
}

#[test]
fn declared_types_are_enforced() {
    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        let op = main_ops(m)
            .iter_mut()
            .find(|o| o.r#type == "const" && o.outputs[0].name.contains("embed_tokens"))
            .unwrap();
        // Declare a different shape than the blob holds.
        if let Some(proto::ValueTypeKind::TensorType(t)) = op.outputs[0]
            .r#type
            .as_mut()
            .and_then(|t| t.r#type.as_mut())
        {
            if let Some(proto::DimensionKind::Constant(c)) = t.dimensions[0].dimension.as_mut() {
                c.size = 255;
            }
        }
    });
    assert_mentions(&refused(&pkg), &["embed_tokens", "255"]);
}

#[test]
fn broken_manifests_are_refused() {
    let pkg = copy_of("fp16");
    std::fs::write(pkg.join("Manifest.json"), "{").unwrap();
    assert_mentions(&refused(&pkg), &["Manifest.json", "JSON"]);
    let text = std::fs::read_to_string(reference("fp16").join("Manifest.json")).unwrap();
    std::fs::write(
        pkg.join("Manifest.json"),
        text.replace("com.apple.CoreML/model.mlmodel", "../../etc/passwd"),
    )
    .unwrap();
    assert_mentions(&refused(&pkg), &["plain relative path"]);
    std::fs::write(
        pkg.join("Manifest.json"),
        text.replace("rootModelIdentifier", "root"),
    )
    .unwrap();
    assert_mentions(&refused(&pkg), &["rootModelIdentifier"]);
    std::fs::write(pkg.join("Manifest.json"), &text).unwrap();
    std::fs::write(model_path(&pkg), b"\xff\xff\xff\xff not a protobuf").unwrap();
    assert_mentions(&refused(&pkg), &["not a valid Core ML model protobuf"]);
    let e = MlPackage::open(pkg.join("missing.mlpackage")).unwrap_err();
    assert!(matches!(e, CoreMlError::Package { .. }), "{e}");
}

/// A small deterministic generator for the damage below.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_damage_never_panics() {
    let mut rng = Lcg(7);
    let pkg = copy_of("int4_block32");
    let model = std::fs::read(model_path(&pkg)).unwrap();
    let weights = std::fs::read(weights_path(&pkg)).unwrap();
    for round in 0..60 {
        let (target, original) = if round % 2 == 0 {
            (model_path(&pkg), &model)
        } else {
            (weights_path(&pkg), &weights)
        };
        let mut bytes = original.clone();
        for _ in 0..1 + rng.next() % 8 {
            let i = (rng.next() as usize) % bytes.len();
            bytes[i] = rng.next() as u8;
        }
        if rng.next() % 4 == 0 {
            let keep = (rng.next() as usize) % bytes.len();
            bytes.truncate(keep);
        }
        std::fs::write(&target, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(p) = MlPackage::open(&pkg) {
                let _ = p.verify();
                if let Ok(mut exec) = Executor::new(&p) {
                    let _ = exec.predict(&prefill());
                }
            }
        });
        assert!(
            outcome.is_ok(),
            "round {round}: a panic on damaged {}",
            target.display()
        );
        std::fs::write(&target, original).unwrap();
    }
}

#[test]
fn bad_predict_inputs_are_refused() {
    let pkg = MlPackage::open(reference("fp16")).unwrap();
    let mut exec = Executor::new(&pkg).unwrap();
    let cases: Vec<(HashMap<String, Tensor>, &[&str])> = vec![
        (
            {
                let mut h = prefill();
                h.remove("causal_mask");
                h
            },
            &["input causal_mask", "missing"],
        ),
        (
            {
                let mut h = prefill();
                h.insert("extra".into(), Tensor::i32(vec![1], vec![0]).unwrap());
                h
            },
            &["input extra", "no such input"],
        ),
        (
            {
                let mut h = prefill();
                h.insert(
                    "input_ids".into(),
                    Tensor::f32(vec![1, 2], vec![1.0, 2.0]).unwrap(),
                );
                h
            },
            &["input input_ids", "fp32", "int32"],
        ),
        (
            {
                let mut h = prefill();
                h.insert(
                    "input_ids".into(),
                    Tensor::i32(vec![1, 65], vec![1; 65]).unwrap(),
                );
                h
            },
            &["input input_ids", "65"],
        ),
        (
            {
                let mut h = prefill();
                h.insert(
                    "input_ids".into(),
                    Tensor::i32(vec![2], vec![1, 2]).unwrap(),
                );
                h
            },
            &["input input_ids"],
        ),
        (
            {
                let mut h = prefill();
                h.insert(
                    "input_ids".into(),
                    Tensor::i32(vec![1, 2], vec![1, 9999]).unwrap(),
                );
                h
            },
            &["gather", "9999", "out of range"],
        ),
    ];
    for (inputs, needles) in cases {
        let e = exec.predict(&inputs).unwrap_err().to_string();
        assert_mentions(&e, needles);
        exec.reset_states();
    }
    // A mask with more query rows than tokens fails in the op that adds it, by name.
    let mut h = prefill();
    h.insert(
        "causal_mask".into(),
        Tensor::f16_from_f32(vec![1, 1, 3, 3], &[0.0; 9]).unwrap(),
    );
    let e = exec.predict(&h).map(|_| ()).unwrap_err().to_string();
    assert_mentions(&e, &["op ", "(add)", "do not broadcast"]);
}

#[test]
fn huge_declared_shapes_are_refused_without_allocating() {
    let pkg = copy_of("fp16");
    edit_model(&pkg, |m| {
        let Some(ModelType::MlProgram(p)) = m.r#type.as_mut() else {
            panic!()
        };
        let f = p.functions.get_mut("main").unwrap();
        let state = f.inputs.iter_mut().find(|i| i.name == "keyCache").unwrap();
        let Some(proto::ValueTypeKind::StateType(st)) =
            state.r#type.as_mut().and_then(|t| t.r#type.as_mut())
        else {
            panic!()
        };
        let Some(proto::ValueTypeKind::TensorType(t)) =
            st.wrapped_type.as_mut().and_then(|t| t.r#type.as_mut())
        else {
            panic!()
        };
        for d in t.dimensions.iter_mut() {
            d.dimension = Some(proto::DimensionKind::Constant(proto::ConstantDimension {
                size: 1 << 30,
            }));
        }
    });
    assert_mentions(&refused(&pkg), &["keyCache", "exceed"]);
}
