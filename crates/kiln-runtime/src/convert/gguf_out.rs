//! `--to gguf`: the converted tensors written as a GGUF file llama.cpp loads.
//!
//! GGUF holds ggml block types only, so the kiln formats (`int8-channel`, `int4-block64`,
//! the lookup tables) are refused before any work is done. The source GGUF's metadata —
//! architecture and hyperparameters, tokenizer, chat template — is carried over key for key;
//! only `general.file_type` is updated to the new weight type (llama.cpp reports it) and
//! `general.alignment` is left to the writer. Tensors keep the source's names, order and
//! row layout (GGUF llama files hold q/k rows permuted for interleaved rotary pairs, and so
//! does the output).

use super::{convert_tensor, ConvertOptions, ConvertReport, QuantTarget, Source, TensorOutcome};
use crate::error::ModelError;
use kiln_format::ggml::GgmlType;
use kiln_format::gguf::{GgufWriter, MetadataValue};
use kiln_format::kiln_types::TensorFormat;
use std::path::Path;

/// llama.cpp's `llama_ftype` for a file whose matrices are mostly `ty`.
fn file_type(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

/// The `--quant` settings a GGUF can hold, for messages.
fn ggml_targets() -> String {
    QuantTarget::ALL
        .iter()
        .filter(|t| **t == QuantTarget::Keep || t.ggml_type().is_some())
        .map(|t| match t.ggml_type() {
            Some(ty) if ty.is_quantized() => format!("{} ({ty})", t.name()),
            _ => t.name().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the GGUF file `out`.
pub(crate) fn write(
    src: &Path,
    out: &Path,
    source: &Source,
    options: &ConvertOptions,
    on_tensor: &mut dyn FnMut(&TensorOutcome, usize, usize),
) -> Result<ConvertReport, ModelError> {
    if let Some(TensorFormat::Kiln(k)) = options.quant.format(options.lut_group_channels) {
        return Err(ModelError::Request(format!(
            "--quant {} is stored as {k}, a kiln format that GGUF cannot hold; --to gguf takes \
             {}",
            options.quant,
            ggml_targets()
        )));
    }
    if out.is_dir() {
        return Err(ModelError::Request(format!(
            "{}: is a folder; --to gguf writes a single file",
            out.display()
        )));
    }
    let Some(gguf) = &source.gguf else {
        return Err(ModelError::unsupported(
            src,
            "--to gguf converts GGUF sources; a Hugging Face folder's tokenizer and \
             hyperparameters are not translated into GGUF metadata (convert it to a kiln \
             package instead)",
        ));
    };
    let mut writer = GgufWriter::new();
    let target = options.quant.ggml_type();
    for (key, value) in gguf.metadata() {
        if key == "general.alignment" {
            continue;
        }
        let value = match (key.as_str(), target.and_then(file_type)) {
            ("general.file_type", Some(ft)) => MetadataValue::U32(ft),
            _ => value.clone(),
        };
        writer.try_add_metadata(key.clone(), value)?;
    }
    if let Some(ft) = target.and_then(file_type) {
        writer.try_add_metadata("general.file_type", MetadataValue::U32(ft))?;
    }
    let names = source.tensors.names();
    let mut outcomes = Vec::with_capacity(names.len());
    let mut bytes = 0u64;
    for (i, name) in names.iter().enumerate() {
        let stored = convert_tensor(source.tensors.as_ref(), name, options, None)?;
        let outcome = stored.outcome.clone();
        let TensorFormat::Ggml(ty) = outcome.to else {
            return Err(ModelError::Request(format!(
                "tensor '{name}' is stored as {}, which GGUF cannot hold",
                outcome.to
            )));
        };
        bytes += outcome.bytes;
        writer.add_tensor(name.clone(), &outcome.shape, ty, stored.into_bytes())?;
        on_tensor(&outcome, i + 1, names.len());
        outcomes.push(outcome);
    }
    writer.write(out)?;
    Ok(ConvertReport {
        manifest: None,
        tensors: outcomes,
        files: 1,
        bytes,
        notes: Vec::new(),
        fp16: None,
        calibration: None,
    })
}
