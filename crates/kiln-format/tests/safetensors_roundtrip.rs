//! safetensors writer → reader round trips, sharded folders, and a file written by
//! transformers.

use kiln_format::safetensors::{
    Dtype, SafetensorsFile, SafetensorsWriter, ShardedSafetensors, INDEX_FILE, SINGLE_FILE,
};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("safetensors-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One tensor of every dtype, a scalar and an empty tensor.
fn sample_writer() -> SafetensorsWriter {
    let mut w = SafetensorsWriter::new();
    w.add_metadata("format", "pt");
    w.add_tensor_f32("a.f32", Dtype::F32, &[3, 5], &values(15, 1))
        .unwrap();
    w.add_tensor_f32("b.f16", Dtype::F16, &[4, 2], &values(8, 2))
        .unwrap();
    w.add_tensor_f32("c.bf16", Dtype::BF16, &[7], &values(7, 3))
        .unwrap();
    w.add_tensor_f32("scalar", Dtype::F32, &[], &[2.5]).unwrap();
    w.add_tensor("empty", Dtype::F32, &[0, 4], Vec::new())
        .unwrap();
    for (i, d) in Dtype::ALL.iter().enumerate() {
        let data: Vec<u8> = (0..3 * d.size()).map(|b| (b + i) as u8).collect();
        w.add_tensor(format!("raw.{}", d.name()), *d, &[3], data)
            .unwrap();
    }
    w
}

#[test]
fn every_dtype_reads_back() {
    let w = sample_writer();
    let bytes = w.to_bytes();
    let f = SafetensorsFile::from_bytes("mem.safetensors", bytes).unwrap();
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(f.data_offset() % 8, 0, "data section is 8-byte aligned");
    assert_eq!(f.tensors().len(), 5 + Dtype::ALL.len());

    let a = f.tensor("a.f32").unwrap();
    assert_eq!(
        (a.dtype, a.shape.as_slice(), a.n_elements),
        (Dtype::F32, &[3u64, 5][..], 15)
    );
    assert_eq!(f.tensor_f32(a).unwrap(), values(15, 1));

    let b = f.tensor("b.f16").unwrap();
    let want: Vec<f32> = values(8, 2)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(f.tensor_f32(b).unwrap(), want);

    let c = f.tensor("c.bf16").unwrap();
    let want: Vec<f32> = values(7, 3)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(f.tensor_f32(c).unwrap(), want);

    let s = f.tensor("scalar").unwrap();
    assert!(s.shape.is_empty());
    assert_eq!(f.tensor_f32(s).unwrap(), vec![2.5]);

    let e = f.tensor("empty").unwrap();
    assert_eq!((e.n_elements, e.n_bytes()), (0, 0));
    assert!(f.tensor_data(e).is_empty());

    for (i, d) in Dtype::ALL.iter().enumerate() {
        let t = f.tensor(&format!("raw.{}", d.name())).unwrap();
        assert_eq!(t.dtype, *d);
        let want: Vec<u8> = (0..3 * d.size()).map(|b| (b + i) as u8).collect();
        assert_eq!(f.tensor_data(t), want.as_slice());
    }
}

#[test]
fn written_file_is_atomic_and_mapped() {
    let dir = scratch("single");
    let path = dir.join(SINGLE_FILE);
    sample_writer().write(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != SINGLE_FILE)
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let set = ShardedSafetensors::open_dir(&dir).unwrap();
    assert_eq!(set.origin(), path.as_path());
    assert_eq!(set.len(), 5 + Dtype::ALL.len());
    let (file, t) = set.tensor("a.f32").unwrap();
    assert_eq!(file.tensor_f32(t).unwrap(), values(15, 1));
}

#[test]
fn sharded_folder_reads_back() {
    let dir = scratch("sharded");
    let mut w = SafetensorsWriter::new();
    for i in 0..10 {
        w.add_tensor_f32(format!("t{i}"), Dtype::F32, &[4, 4], &values(16, 10 + i))
            .unwrap();
    }
    // 64 bytes per tensor: three per shard, four shards.
    let shards = w.write_sharded(&dir, 200).unwrap();
    assert_eq!(shards.len(), 4);
    assert!(shards[0].ends_with("model-00001-of-00004.safetensors"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 640);
    assert_eq!(
        index["weight_map"]["t9"],
        "model-00004-of-00004.safetensors"
    );

    let set = ShardedSafetensors::open_dir(&dir).unwrap();
    assert_eq!(set.files().len(), 4);
    assert_eq!(set.len(), 10);
    for i in 0..10u32 {
        let (file, t) = set.tensor(&format!("t{i}")).unwrap();
        assert_eq!(file.tensor_f32(t).unwrap(), values(16, 10 + i));
    }
    let names: Vec<&str> = set.tensors().map(|(_, t)| t.name.as_str()).collect();
    assert_eq!(names.len(), 10);
}

#[test]
fn writer_refuses_what_it_cannot_write() {
    let mut w = SafetensorsWriter::new();
    w.add_tensor_f32("x", Dtype::F32, &[2], &[1.0, 2.0])
        .unwrap();
    let err = w.add_tensor_f32("x", Dtype::F32, &[2], &[1.0, 2.0]);
    assert!(err.unwrap_err().to_string().contains("added twice"));
    let err = w.add_tensor_f32("y", Dtype::F32, &[3], &[1.0, 2.0]);
    assert!(err.unwrap_err().to_string().contains("'y'"));
    let err = w.add_tensor("__metadata__", Dtype::U8, &[1], vec![0]);
    assert!(err.is_err());
    let err = w.add_tensor_f32("z", Dtype::I8, &[1], &[1.0]);
    assert!(err.unwrap_err().to_string().contains("I8"));
    let err = w.add_tensor("big", Dtype::F64, &[u64::MAX, 2], Vec::new());
    assert!(err.unwrap_err().to_string().contains("overflowing"));
}

/// The tiny Llama of the shared references, written by transformers 5.
#[test]
fn reads_a_file_transformers_wrote() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/coreml/tiny_llama_hf/model.safetensors");
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(f.tensors().len(), 21);
    let q = f.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(
        (q.dtype, q.shape.as_slice()),
        (Dtype::F32, &[64u64, 64][..])
    );
    let k = f.tensor("model.layers.1.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape, vec![32, 64]);
    let norm = f.tensor("model.norm.weight").unwrap();
    let v = f.tensor_f32(norm).unwrap();
    assert_eq!(v.len(), 64);
    assert!(v.iter().all(|x| x.is_finite()));
    // Every byte of the data section belongs to exactly one tensor.
    let covered: u64 = f.tensors().iter().map(|t| t.n_bytes()).sum();
    assert_eq!(f.data_offset() + covered, f.bytes().len() as u64);
}
