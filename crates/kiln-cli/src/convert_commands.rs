//! `kiln convert` and `kiln verify` of kiln packages: thin wrappers over
//! `kiln_runtime::convert` and `kiln_format::package`.

use crate::commands::Failure;
use clap::Args;
use kiln_format::package::{Package, Verify};
use kiln_runtime::convert::{self, ConvertOptions, QuantTarget, TensorOutcome};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `kiln convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The model to convert: a GGUF file or a Hugging Face folder.
    pub source: PathBuf,
    /// The package to write (a folder, conventionally NAME.kiln).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// The output format.
    #[arg(long, default_value = "kiln", value_parser = ["kiln"])]
    pub to: String,
    /// Weight format: keep (the source's blocks as they are), f32, f16, bf16, or int4-block32
    /// (symmetric int4 in blocks of 32, stored as ggml Q4_0).
    #[arg(long, default_value = "keep")]
    pub quant: String,
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

fn print_outcome(o: &TensorOutcome) {
    let change = if o.from == o.to {
        o.to.name().to_string()
    } else {
        format!("{} -> {}", o.from.name(), o.to.name())
    };
    let quality = match &o.quality {
        Some(q) => format!(
            "snr {} dB  cosine {:.6}",
            q.snr_db.map_or("inf".to_string(), |s| format!("{s:.2}")),
            q.cosine
        ),
        None => o.kept_because.unwrap_or("").to_string(),
    };
    println!("{:<32} {:<14} {quality}", o.name, change);
}

/// `kiln convert`.
pub fn convert(a: ConvertArgs) -> Result<(), Failure> {
    let quant: QuantTarget = a.quant.parse().map_err(input)?;
    if a.max_shard_mb == 0 {
        return Err(input("--max-shard-mb must be at least 1"));
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
    };
    let terminal = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut on_tensor = |o: &TensorOutcome, done: usize, total: usize| {
        if a.json {
            return;
        }
        if terminal {
            // Clear the progress line before the result line that replaces it.
            print!("\r\x1b[2K");
        }
        // Norms and biases are always kept; listing each would bury the matrices.
        let matrix = o.shape.iter().filter(|&&d| d != 1).count() > 1;
        if o.quality.is_some() || (matrix && o.kept_because.is_some()) {
            print_outcome(o);
        }
        if terminal {
            print!("[{done}/{total}] {}", o.name);
            let _ = std::io::stdout().flush();
        }
    };
    let report = convert::convert(&a.source, &a.out, &options, &mut on_tensor)?;
    if terminal && !a.json {
        print!("\r\x1b[2K");
    }
    let seconds = start.elapsed().as_secs_f64();
    let size: u64 = report.manifest.shards.iter().map(|s| s.size).sum();
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
            "package": a.out,
            "quant": quant.name(),
            "shards": report.manifest.shards.len(),
            "bytes": size,
            "seconds": seconds,
            "fp16": report.fp16,
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
                "{} tensors converted to {quant}: lowest snr {worst:.2} dB, lowest cosine {min_cos:.6}",
                quantized.len()
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
        println!(
            "{}: {} tensors, {} shard(s), {:.1} MB, written in {seconds:.2} s",
            a.out.display(),
            report.tensors.len(),
            report.manifest.shards.len(),
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
