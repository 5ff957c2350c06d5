//! Writer → reader round trips.

use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::{GgufFile, GgufWriter, MetadataValue};

fn sample_values(n: usize, seed: u32) -> Vec<f32> {
    // A small deterministic generator is enough for layout tests.
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn all_value_kinds() -> Vec<(&'static str, MetadataValue)> {
    vec![
        (
            "general.architecture",
            MetadataValue::String("llama".into()),
        ),
        ("test.u8", MetadataValue::U8(200)),
        ("test.i8", MetadataValue::I8(-100)),
        ("test.u16", MetadataValue::U16(60000)),
        ("test.i16", MetadataValue::I16(-30000)),
        ("test.u32", MetadataValue::U32(4_000_000_000)),
        ("test.i32", MetadataValue::I32(-2_000_000_000)),
        ("test.u64", MetadataValue::U64(u64::MAX)),
        ("test.i64", MetadataValue::I64(i64::MIN)),
        ("test.f32", MetadataValue::F32(1.5e-5)),
        ("test.f64", MetadataValue::F64(-2.25)),
        ("test.bool", MetadataValue::Bool(true)),
        ("test.string", MetadataValue::String("héllo ✓".into())),
        ("test.empty_string", MetadataValue::String(String::new())),
        (
            "test.strings",
            MetadataValue::from(vec!["a", "bb", "", "ccc"]),
        ),
        ("test.floats", MetadataValue::from(vec![1.0f32, -2.0, 0.5])),
        ("test.ints", MetadataValue::from(vec![1i32, -2, 3])),
        ("test.empty_array", MetadataValue::Array(vec![])),
        (
            "test.nested",
            MetadataValue::Array(vec![
                MetadataValue::from(vec![1u8, 2]),
                MetadataValue::from(vec!["x"]),
                MetadataValue::Array(vec![]),
            ]),
        ),
    ]
}

#[test]
fn metadata_round_trips_in_order() {
    for version in [2, 3] {
        let mut w = GgufWriter::new();
        w.set_version(version);
        for (k, v) in all_value_kinds() {
            w.add_metadata(k, v);
        }
        let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
        assert_eq!(f.version(), version);
        let expected: Vec<(String, MetadataValue)> = all_value_kinds()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(f.metadata(), expected.as_slice());
        assert!(f.tensors().is_empty());
    }
}

#[test]
fn typed_getters() {
    let mut w = GgufWriter::new();
    for (k, v) in all_value_kinds() {
        w.add_metadata(k, v);
    }
    let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
    assert_eq!(f.get_u64("test.u8").unwrap(), Some(200));
    assert_eq!(f.get_u64("test.u64").unwrap(), Some(u64::MAX));
    assert_eq!(f.get_u64("absent").unwrap(), None);
    assert!(f.get_u64("test.i8").is_err()); // negative
    assert_eq!(f.get_f32("test.f64").unwrap(), Some(-2.25));
    assert_eq!(f.get_f32("test.u16").unwrap(), Some(60000.0));
    assert_eq!(f.get_bool("test.bool").unwrap(), Some(true));
    assert_eq!(f.get_str("test.string").unwrap(), Some("héllo ✓"));
    assert_eq!(
        f.get_str_array("test.strings").unwrap(),
        Some(vec!["a", "bb", "", "ccc"])
    );
    assert_eq!(
        f.get_f32_array("test.floats").unwrap(),
        Some(vec![1.0, -2.0, 0.5])
    );
    assert_eq!(f.get_i64_array("test.ints").unwrap(), Some(vec![1, -2, 3]));
    assert_eq!(f.get_str_array("test.empty_array").unwrap(), Some(vec![]));
    assert_eq!(f.require_u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.require_f32("test.f32").unwrap(), 1.5e-5);
    assert_eq!(f.require_str("general.architecture").unwrap(), "llama");

    let e = f.get_str("test.u32").unwrap_err().to_string();
    assert_eq!(
        e,
        "mem.gguf: metadata key 'test.u32' is u32 4000000000, expected a string"
    );
    let e = f.get_str_array("test.floats").unwrap_err().to_string();
    assert_eq!(
        e,
        "mem.gguf: metadata key 'test.floats' element 0 is f32 1, expected strings"
    );
    let e = f.get_f32_array("test.string").unwrap_err().to_string();
    assert!(
        e.contains("'test.string'") && e.contains("expected an array of numbers"),
        "{e}"
    );
    let e = f.get_bool("test.u8").unwrap_err().to_string();
    assert!(e.contains("expected a bool"), "{e}");
    let e = f.require_str("llama.block_count").unwrap_err().to_string();
    assert_eq!(
        e,
        "mem.gguf: missing required metadata key 'llama.block_count'"
    );
    let e = f
        .require_tensor("blk.3.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "mem.gguf: missing tensor 'blk.3.ffn_up.weight'");
}

#[test]
fn tensors_round_trip_for_every_type() {
    for alignment in [32u64, 64, 1, 4096] {
        let mut w = GgufWriter::new();
        w.set_alignment(alignment);
        w.add_metadata("general.architecture", "test".into());
        let mut expected = Vec::new();
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            let row = ty.block_len().max(3) * 2;
            let dims = [row as u64, 3];
            let data: Vec<u8> = (0..ty.row_bytes(row * 3).unwrap())
                .map(|b| (b * 7 + i) as u8)
                .collect();
            let name = format!("t.{}", ty.name());
            w.add_tensor(&name, &dims, ty, data.clone()).unwrap();
            expected.push((name, dims, ty, data));
        }
        let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
        assert_eq!(f.alignment(), alignment);
        assert_eq!(f.data_offset() % alignment, 0);
        assert_eq!(f.tensors().len(), expected.len());
        for ((name, dims, ty, data), t) in expected.iter().zip(f.tensors()) {
            assert_eq!(&t.name, name);
            assert_eq!(t.dims, dims);
            assert_eq!(t.ty, *ty);
            assert_eq!(t.offset % alignment, 0);
            assert_eq!(f.tensor_data(t), data.as_slice());
            assert_eq!(f.tensor(name).unwrap(), t);
        }
    }
}

#[test]
fn add_tensor_f32_quantizes_and_tensor_f32_dequantizes() {
    let mut w = GgufWriter::new();
    let values = sample_values(64 * 4, 3);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        w.add_tensor_f32(format!("w.{ty}"), &[64, 4], ty, &values)
            .unwrap();
    }
    let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
    for t in f.tensors() {
        let got = f.tensor_f32(t).unwrap();
        let mut want = vec![0.0; values.len()];
        ggml::dequantize(t.ty, &ggml::quantize(t.ty, &values).unwrap(), &mut want).unwrap();
        assert_eq!(got, want, "{}", t.name);
    }
    assert_eq!(f.tensor_f32(f.tensor("w.F32").unwrap()).unwrap(), values);
}

#[test]
fn writer_refuses_bad_tensors() {
    let mut w = GgufWriter::new();
    let e = w
        .add_tensor("a", &[32], GgmlType::Q4_0, vec![0; 17])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor 'a'") && e.contains("needs 18 bytes, got 17"),
        "{e}"
    );
    assert!(w.add_tensor("a", &[31], GgmlType::Q4_0, vec![]).is_err());
    assert!(w.add_tensor("a", &[], GgmlType::F32, vec![]).is_err());
    assert!(w
        .add_tensor("a", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
        .is_err());
    assert!(w.add_tensor("a", &[0], GgmlType::F32, vec![]).is_err());
    assert!(w.add_tensor("", &[1], GgmlType::F32, vec![0; 4]).is_err());
    assert!(w
        .add_tensor("a", &[u64::MAX, 2], GgmlType::F32, vec![])
        .is_err());
    w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let e = w
        .add_tensor("a", &[1], GgmlType::F32, vec![0; 4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor 'a' added twice"), "{e}");
    assert!(w
        .add_tensor_f32("b", &[64], GgmlType::Q4_K, &[0.0; 64])
        .is_err()); // rows shorter than a K-quant super-block
    assert!(w
        .add_tensor_f32("b", &[32], GgmlType::Q8_0, &[0.0; 31])
        .is_err());
    let e = w
        .try_add_metadata(
            "k",
            MetadataValue::Array(vec![MetadataValue::U8(1), MetadataValue::I8(1)]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("'k'") && e.contains("mixes u8 and i8"), "{e}");
}

#[test]
fn add_metadata_replaces_in_place() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", 1u32.into());
    w.add_metadata("b", 2u32.into());
    w.add_metadata("a", "x".into());
    let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
    assert_eq!(f.metadata()[0], ("a".to_string(), "x".into()));
    assert_eq!(f.metadata().len(), 2);
}

#[test]
fn write_is_atomic_and_readable() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-format-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "test".into());
    w.add_tensor_f32("x", &[32, 2], GgmlType::Q8_0, &sample_values(64, 9))
        .unwrap();
    w.write(&path).unwrap();
    // Overwriting while the old file is open leaves the open one intact.
    let first = GgufFile::open(&path).unwrap();
    let mut w2 = GgufWriter::new();
    w2.add_metadata("general.architecture", "other".into());
    w2.write(&path).unwrap();
    assert_eq!(first.architecture().unwrap(), "test");
    assert_eq!(
        first
            .tensor_f32(first.require_tensor("x").unwrap())
            .unwrap()
            .len(),
        64
    );
    let second = GgufFile::open(&path).unwrap();
    assert_eq!(second.architecture().unwrap(), "other");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    // A write into a missing directory fails naming the path.
    let e = w2
        .write(dir.join("missing/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
