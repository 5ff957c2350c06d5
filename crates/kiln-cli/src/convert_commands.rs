//! `kiln convert` and `kiln verify` of kiln packages: thin wrappers over
//! `kiln_runtime::convert` and `kiln_format::package`.

use crate::commands::Failure;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_format::package::{Package, Verify};
use kiln_runtime::convert::{self, ConvertOptions, OutputFormat, QuantTarget, TensorOutcome};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `kiln convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The model to convert: a GGUF file or a Hugging Face folder.
    pub source: PathBuf,
    /// What to write: a kiln package folder (conventionally NAME.kiln), a GGUF file, or a
    /// Hugging Face folder.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// The output format: kiln (a package), gguf (ggml types only), safetensors (a Hugging
    /// Face folder; f32, f16 or bf16 weights).
    #[arg(long, default_value = "kiln", value_parser = ["kiln", "gguf", "safetensors"])]
    pub to: String,
    /// Weight format: keep (the source's blocks as they are), f32, f16, bf16, int8-channel
    /// (int8, one scale per output channel), int4-block32 (ggml Q4_0), int4-block32-offset
    /// (ggml Q4_1), int4-block64, lut2, lut4, lut6, lut8 (k-means lookup tables), or
    /// lut4-block32 (a 4-bit table with a scale and an offset per block of 32).
    #[arg(long, default_value = "keep")]
    pub quant: String,
    /// Output channels sharing one lookup table (lut2..lut8, lut4-block32); without it, one
    /// table per tensor.
    #[arg(long)]
    pub lut_group_channels: Option<u32>,
    /// Comma-separated tensors never stored below their source precision (1-D vectors never
    /// are); "none" protects no matrix.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "token_embd.weight,output.weight"
    )]
    pub keep: Vec<String>,
    /// Largest shard, in MiB (a larger single tensor gets a shard of its own).
    #[arg(long, default_value_t = 950)]
    pub max_shard_mb: u64,
    /// Keep activations in fp16 range (for the Neural Engine): measure them on built-in
    /// prompts, carry the residual stream divided by a power of two where it exceeds the
    /// range, compute RMSNorm max-scaled where its squares do, mark the rest fp32; the fix is
    /// recorded in the manifest (`kiln validate PKG --fp16` checks it).
    #[arg(long)]
    pub fp16_safe: bool,
    /// A text file to calibrate lookup tables on (lut2..lut8): the source model runs over its
    /// first tokens; each weight's error counts by the mean square of its input channel's
    /// activations there when the tables are learned, and indices are chosen with error
    /// feedback on the activations' second moments. Recorded in the manifest.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Tokens of the calibration text to run, at most (more: better tables, slower convert).
    #[arg(long, value_name = "N", default_value_t = kiln_runtime::calibration::DEFAULT_TOKENS)]
    pub calibration_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn input(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn outcome_line(o: &TensorOutcome) -> String {
    let change = if o.from == o.to {
        o.to.name()
    } else {
        format!("{} -> {}", o.from, o.to)
    };
    let quality = match &o.quality {
        Some(q) => format!(
            "snr {} dB  cosine {:.6}",
            q.snr_db.map_or("inf".to_string(), |s| format!("{s:.2}")),
            q.cosine
        ),
        None => o.kept_because.clone().unwrap_or_default(),
    };
    format!("{:<32} {:<16} {quality}", o.name, change)
}

/// A bar over the tensors, drawn on stderr only when stderr is a terminal.
fn progress_bar(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors  {elapsed}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// `kiln convert`.
pub fn convert(a: ConvertArgs) -> Result<(), Failure> {
    let quant: QuantTarget = a.quant.parse().map_err(input)?;
    let to: OutputFormat = a.to.parse().map_err(input)?;
    if a.max_shard_mb == 0 {
        return Err(input("--max-shard-mb must be at least 1"));
    }
    if let Some(g) = a.lut_group_channels {
        if g == 0 {
            return Err(input("--lut-group-channels must be at least 1"));
        }
        if !quant.is_lut() {
            return Err(input(format!(
                "--lut-group-channels applies to lookup tables (lut2, lut4, lut6, lut8, \
                 lut4-block32), not --quant {quant}"
            )));
        }
    }
    let keep: Vec<String> = if a.keep.iter().any(|k| k == "none") {
        Vec::new()
    } else {
        a.keep.iter().filter(|k| !k.is_empty()).cloned().collect()
    };
    let options = ConvertOptions {
        quant,
        keep,
        max_shard_bytes: a.max_shard_mb << 20,
        fp16_safe: a.fp16_safe,
        lut_group_channels: a.lut_group_channels,
        to,
        calibration: a.calibration.clone(),
        calibration_tokens: a.calibration_tokens,
        ..ConvertOptions::default()
    };
    let start = Instant::now();
    let bar = progress_bar(a.json);
    let mut on_tensor = |o: &TensorOutcome, done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(o.name.clone());
        if a.json {
            return;
        }
        // Norms and biases are always kept; listing each would bury the matrices.
        let matrix = o.shape.iter().filter(|&&d| d != 1).count() > 1;
        if o.quality.is_some() || (matrix && o.kept_because.is_some()) {
            bar.suspend(|| println!("{}", outcome_line(o)));
        }
        if done == total {
            bar.set_message(format!("writing {}", a.out.display()));
        }
    };
    let result = convert::convert(&a.source, &a.out, &options, &mut on_tensor);
    bar.finish_and_clear();
    let report = result?;
    let seconds = start.elapsed().as_secs_f64();
    let size = report.bytes;
    if a.json {
        let tensors: Vec<_> = report
            .tensors
            .iter()
            .map(|o| {
                serde_json::json!({
                    "name": o.name,
                    "shape": o.shape,
                    "from": o.from.name(),
                    "to": o.to.name(),
                    "bytes": o.bytes,
                    "snr_db": o.quality.as_ref().and_then(|q| q.snr_db),
                    "cosine": o.quality.as_ref().map(|q| q.cosine),
                })
            })
            .collect();
        let j = serde_json::json!({
            "out": a.out,
            "to": to.name(),
            "quant": options.quant_label(),
            "files": report.files,
            "bytes": size,
            "seconds": seconds,
            "fp16": report.fp16,
            "calibration": report.calibration,
            "notes": report.notes,
            "tensors": tensors,
        });
        println!("{j}");
    } else {
        let quantized: Vec<&TensorOutcome> = report
            .tensors
            .iter()
            .filter(|o| o.quality.is_some())
            .collect();
        if !quantized.is_empty() {
            let worst = quantized
                .iter()
                .filter_map(|o| o.quality.as_ref().and_then(|q| q.snr_db))
                .fold(f64::INFINITY, f64::min);
            let min_cos = quantized
                .iter()
                .filter_map(|o| o.quality.as_ref().map(|q| q.cosine))
                .fold(1.0, f64::min);
            println!(
                "{} tensors converted to {}: lowest snr {worst:.2} dB, lowest cosine {min_cos:.6}",
                quantized.len(),
                options.quant_label()
            );
        }
        if let Some(fix) = &report.fp16 {
            let (b, f) = (&fix.calibration.before, &fix.calibration.after);
            println!(
                "fp16 fix (calibrated on {} prompts, {} tokens): largest activation {:.0} -> {:.0}, \
                 largest RMSNorm statistic {:.3e} -> {:.3e}, ops beyond fp16 {} -> {}",
                fix.calibration.prompts,
                fix.calibration.tokens,
                b.max_activation,
                f.max_activation,
                b.max_norm_statistic,
                f.max_norm_statistic,
                b.failures,
                f.failures
            );
            for note in &fix.notes {
                println!("  {note}");
            }
        }
        if let Some(c) = &report.calibration {
            println!(
                "lookup tables weighted by the activations of {} tokens of {} (chunks of {})",
                c.tokens, c.file, c.chunk_tokens
            );
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        println!(
            "{}: {} tensors, {} file(s), {:.1} MB, written in {seconds:.2} s",
            a.out.display(),
            report.tensors.len(),
            report.files,
            size as f64 / 1e6
        );
    }
    Ok(())
}

/// Whether `kiln verify` should treat `path` as a kiln package.
pub fn is_kiln_package(path: &Path) -> bool {
    kiln_format::package::is_package(path)
}

/// `kiln verify` of a kiln package: structure, sizes and every shard's sha256, then the model
/// description and tokenizer the manifest carries.
pub fn verify(path: &Path, json: bool) -> Result<(), Failure> {
    let start = Instant::now();
    let package =
        std::sync::Arc::new(Package::open(path, Verify::Full).map_err(|e| input(e.to_string()))?);
    let config = kiln_runtime::package::config(&package)?;
    let source = kiln_runtime::package::PackageSource::new(std::sync::Arc::clone(&package));
    kiln_runtime::Model::from_source(config, &source)?;
    let tokenizer = kiln_runtime::package::tokenizer(&package)
        .map_err(|e| input(format!("{}: {e}", path.display())))?;
    let m = package.manifest();
    let seconds = start.elapsed().as_secs_f64();
    if json {
        let j = serde_json::json!({
            "package": path,
            "ok": true,
            "architecture": m.architecture,
            "tensors": m.tensors.len(),
            "shards": m.shards.iter().map(|s| serde_json::json!({"file": s.file, "size": s.size, "sha256": s.sha256})).collect::<Vec<_>>(),
            "tokenizer": tokenizer.is_some(),
            "seconds": seconds,
        });
        println!("{j}");
    } else {
        println!("{}: ok", path.display());
        println!(
            "{} | {} tensors | {} shard(s), {:.1} MB, sha256 verified | tokenizer: {} | quant {} from {}",
            m.architecture,
            m.tensors.len(),
            m.shards.len(),
            package.shard_bytes() as f64 / 1e6,
            if tokenizer.is_some() { "yes" } else { "none" },
            m.conversion.quant,
            m.source.format
        );
    }
    Ok(())
}
