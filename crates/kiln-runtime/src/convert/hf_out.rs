//! `--to safetensors`: the converted model written as a Hugging Face folder — `config.json`
//! in transformers' naming, `model.safetensors` with transformers' tensor names and layouts —
//! for the Llama family (`LlamaForCausalLM`) and Gemma 3 (`Gemma3ForCausalLM`).
//!
//! What differs from the GGUF view, and is undone here:
//! - Layout: a ggml `[in, out]` tensor is, byte for byte, a row-major `[out, in]` safetensors
//!   tensor: the data is kept, the dimensions reversed.
//! - Rotary pairs: GGUF llama files hold q/k rows permuted so rotary embedding rotates
//!   adjacent pairs (llama.cpp's converter permutes them); transformers rotates the halves of
//!   each head. Row `h·d + s·d/2 + j` of the checkpoint is row `h·d + 2j + s` of the GGUF
//!   tensor (head `h` of `d` rows, `s` ∈ {0, 1}, `j` < `d/2`), so rows are moved back.
//! - Gemma norms: GGUF stores `1 + w`, transformers `w` (and adds the one itself).
//!
//! safetensors holds float tensors, so the output takes `--quant f32`, `f16` or `bf16` (or
//! `keep` when the source holds only float tensors). A tokenizer is carried only when the
//! source is a Hugging Face folder (its `tokenizer.json` and companions are copied); a GGUF
//! tokenizer is not converted, and the report says so.

use super::{convert_tensor, ConvertOptions, ConvertReport, QuantTarget, Source, TensorOutcome};
use crate::config::{ModelConfig, RopeStyle};
use crate::error::ModelError;
use crate::hf::checkpoint_name;
use kiln_format::ggml::{self, GgmlType};
use kiln_format::safetensors::{Dtype, SafetensorsWriter};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The weights file of the folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

fn dtype(ty: GgmlType) -> Option<Dtype> {
    match ty {
        GgmlType::F32 => Some(Dtype::F32),
        GgmlType::F16 => Some(Dtype::F16),
        GgmlType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// Writes the Hugging Face folder `out`.
pub(crate) fn write(
    src: &Path,
    out: &Path,
    source: &Source,
    options: &ConvertOptions,
    on_tensor: &mut dyn FnMut(&TensorOutcome, usize, usize),
) -> Result<ConvertReport, ModelError> {
    if !matches!(
        options.quant,
        QuantTarget::Keep | QuantTarget::F32 | QuantTarget::F16 | QuantTarget::Bf16
    ) {
        return Err(ModelError::Request(format!(
            "--to safetensors stores float tensors; --quant {} is not one (use f32, f16 or bf16)",
            options.quant
        )));
    }
    let config = &source.config;
    let arch = config.architecture.as_str();
    let hf_config = hf_config(config, source, src, options)?;
    if out.exists() && !(out.is_dir() && out.join(crate::hf::CONFIG_FILE).is_file()) {
        return Err(ModelError::Request(format!(
            "{}: exists and is not a Hugging Face model folder; refusing to replace it",
            out.display()
        )));
    }
    let mut writer = SafetensorsWriter::new();
    writer.add_metadata("format", "pt");
    let names = source.tensors.names();
    let mut outcomes = Vec::with_capacity(names.len());
    let mut bytes = 0u64;
    for (i, name) in names.iter().enumerate() {
        let stored = convert_tensor(source.tensors.as_ref(), name, options, None)?;
        let outcome = stored.outcome.clone();
        let ty = outcome.to.ggml().and_then(|t| dtype(t).map(|d| (t, d)));
        let Some((ty, dt)) = ty else {
            return Err(ModelError::Request(format!(
                "tensor '{name}' is stored as {} in {}, which safetensors cannot hold; convert \
                 with --quant f32, f16 or bf16",
                outcome.from,
                src.display()
            )));
        };
        let Some((hf_name, norm)) = checkpoint_name(name, arch) else {
            return Err(ModelError::unsupported(
                src,
                format!("tensor '{name}' has no transformers name for {arch}"),
            ));
        };
        let mut data = stored.into_bytes();
        if config.rope_style == RopeStyle::Interleaved {
            let heads = match name.rsplit_once('.').map(|(base, _)| base) {
                Some(b) if b.ends_with(".attn_q") => Some(config.n_heads),
                Some(b) if b.ends_with(".attn_k") => Some(config.n_kv_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                data = halves_from_pairs(&data, heads, config.head_dim).ok_or_else(|| {
                    ModelError::bad(
                        src,
                        format!(
                            "tensor '{name}' does not hold {heads} heads of {} rows",
                            config.head_dim
                        ),
                    )
                })?;
            }
        }
        if norm && arch == "gemma3" {
            data = minus_one(ty, &data)
                .map_err(|e| ModelError::bad(src, format!("tensor '{name}': {e}")))?;
        }
        let shape: Vec<u64> = outcome.shape.iter().rev().copied().collect();
        bytes += data.len() as u64;
        writer.add_tensor(hf_name, dt, &shape, data)?;
        on_tensor(&outcome, i + 1, names.len());
        outcomes.push(outcome);
    }
    let mut notes = Vec::new();
    if source.files.is_empty() {
        notes.push(
            "no tokenizer.json written: the source's tokenizer (GGUF metadata) is not converted; \
             run the folder with --token-ids or add a tokenizer"
                .to_string(),
        );
    }
    let files = write_folder(out, &writer, &hf_config, &source.files)?;
    Ok(ConvertReport {
        manifest: None,
        tensors: outcomes,
        files,
        bytes,
        notes,
        fp16: None,
        calibration: None,
    })
}

/// Rows of `heads` heads of `head_dim` rows each, from the adjacent-pairs order to the
/// halves order (see the module documentation); `None` if `data` is not such a tensor.
fn halves_from_pairs(data: &[u8], heads: usize, head_dim: usize) -> Option<Vec<u8>> {
    let rows = heads * head_dim;
    if rows == 0 || head_dim % 2 != 0 || data.len() % rows != 0 {
        return None;
    }
    let row = data.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let to = h * head_dim + s * half + j;
                let from = h * head_dim + 2 * j + s;
                out[to * row..(to + 1) * row].copy_from_slice(&data[from * row..(from + 1) * row]);
            }
        }
    }
    Some(out)
}

/// `w - 1` for every element of float data of type `ty`, kept in `ty`.
fn minus_one(ty: GgmlType, data: &[u8]) -> Result<Vec<u8>, String> {
    let n = data.len() / ty.block_bytes();
    let mut v = vec![0.0f32; n];
    ggml::dequantize(ty, data, &mut v).map_err(|e| e.to_string())?;
    v.iter_mut().for_each(|x| *x -= 1.0);
    ggml::quantize(ty, &v).map_err(|e| e.to_string())
}

/// An f32 as JSON with its shortest decimal form (`1e-5`, not `9.999999747378752e-6`).
fn num(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
        .unwrap_or(Value::Null)
}

fn torch_dtype(options: &ConvertOptions) -> &'static str {
    match options.quant {
        QuantTarget::F16 => "float16",
        QuantTarget::Bf16 => "bfloat16",
        _ => "float32",
    }
}

/// `config.json` for `config`, in transformers' naming.
fn hf_config(
    config: &ModelConfig,
    source: &Source,
    src: &Path,
    options: &ConvertOptions,
) -> Result<Value, ModelError> {
    let refuse = |what: &str| {
        Err(ModelError::unsupported(
            src,
            format!(
                "--to safetensors cannot describe this {} model: {what}",
                config.architecture
            ),
        ))
    };
    let tied = source.tensors.tensor("output.weight").is_none();
    let first = &config.layers[0];
    let (bos, eos) = source
        .gguf
        .as_ref()
        .and_then(|f| kiln_tokenizer::TokenizerSpec::from_gguf(f).ok())
        .map_or((None, None), |s| (s.bos_id, s.eos_id));
    let linear = |scale: f32| -> Value {
        if scale == 1.0 {
            Value::Null
        } else {
            json!({"rope_type": "linear", "factor": num(1.0 / scale)})
        }
    };
    let mut c = match config.architecture.as_str() {
        "llama" => {
            if config.rope_freq_factors.is_some() {
                return refuse("llama3 rope frequency factors");
            }
            if config.rope_dim != config.head_dim {
                return refuse("partial rotary embedding");
            }
            if config
                .layers
                .iter()
                .any(|l| l.sliding_window.is_some() || l != first)
            {
                return refuse("per-layer attention settings");
            }
            if config.qk_norm || config.post_norms || config.embedding_scale.is_some() {
                return refuse("norms or scales the Llama architecture does not have");
            }
            json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "attention_bias": config.qkv_bias,
                "mlp_bias": false,
                "rope_theta": num(first.rope_base),
                "rope_scaling": linear(first.rope_freq_scale),
            })
        }
        "gemma3" => {
            let global = config.layers.iter().find(|l| l.sliding_window.is_none());
            let local = config.layers.iter().find(|l| l.sliding_window.is_some());
            let window = local.and_then(|l| l.sliding_window).unwrap_or(4096);
            if local.is_some_and(|l| l.rope_freq_scale != 1.0) {
                return refuse("scaled rotary embedding on sliding-window layers");
            }
            let layer_types: Vec<&str> = config
                .layers
                .iter()
                .map(|l| {
                    if l.sliding_window.is_some() {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            let scalar = 1.0 / (config.attn_scale * config.attn_scale);
            json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh",
                "attention_bias": config.qkv_bias,
                // transformers declares this one an integer.
                "query_pre_attn_scalar": if scalar.fract() == 0.0 && scalar.abs() < 1e9 {
                    json!(scalar as i64)
                } else {
                    num(scalar)
                },
                "sliding_window": window,
                "layer_types": layer_types,
                "rope_theta": num(global.map_or(1_000_000.0, |l| l.rope_base)),
                "rope_local_base_freq": num(local.map_or(10_000.0, |l| l.rope_base)),
                "rope_scaling": linear(global.map_or(1.0, |l| l.rope_freq_scale)),
                "final_logit_softcapping": config.final_logit_softcap.map(num),
                "attn_logit_softcapping": config.attn_logit_softcap.map(num),
            })
        }
        other => {
            return Err(ModelError::unsupported(
                src,
                format!("--to safetensors writes llama and gemma3 models, not {other}"),
            ))
        }
    };
    let common = json!({
        "hidden_size": config.n_embd,
        "intermediate_size": config.n_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": num(config.rms_eps),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype(options),
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    let obj = c.as_object_mut().expect("an object");
    for (k, v) in common.as_object().expect("an object") {
        obj.insert(k.clone(), v.clone());
    }
    Ok(c)
}

/// Writes the folder into a temporary sibling and renames it into place (replacing a model
/// folder already there); returns the number of files written.
fn write_folder(
    out: &Path,
    writer: &SafetensorsWriter,
    config: &Value,
    files: &[(String, Vec<u8>)],
) -> Result<usize, ModelError> {
    let io = |p: &Path, e: std::io::Error| ModelError::bad(p, e.to_string());
    let sibling = |suffix: &str| -> PathBuf {
        let name = out
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        out.with_file_name(format!("{name}{suffix}{}", std::process::id()))
    };
    let tmp = sibling(".tmp-");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let result = (|| {
        writer.write(tmp.join(WEIGHTS_FILE))?;
        let text = serde_json::to_vec_pretty(config).expect("JSON values serialize");
        let path = tmp.join(crate::hf::CONFIG_FILE);
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        for (name, bytes) in files {
            let path = tmp.join(name);
            std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        }
        let old = sibling(".old-");
        let replacing = out.exists();
        if replacing {
            std::fs::rename(out, &old).map_err(|e| io(out, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            if replacing {
                let _ = std::fs::rename(&old, out);
            }
            return Err(io(out, e));
        }
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(2 + files.len())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_rows_move_to_halves() {
        // Two heads of four one-byte rows: pairs order (0a 0b 1a 1b) becomes (0a 1a 0b 1b).
        let data = [10u8, 11, 12, 13, 20, 21, 22, 23];
        assert_eq!(
            halves_from_pairs(&data, 2, 4).unwrap(),
            vec![10, 12, 11, 13, 20, 22, 21, 23]
        );
        assert_eq!(halves_from_pairs(&data, 3, 4), None);
    }
}
