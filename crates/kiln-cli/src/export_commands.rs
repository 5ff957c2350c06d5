//! `kiln export coreml`: a thin wrapper over `kiln_coreml::export`.

use crate::commands::Failure;
use clap::{Args, Subcommand};
use kiln_coreml::export::{self, ExportError, ExportOptions};
use std::path::PathBuf;

/// Arguments of `kiln export`.
#[derive(Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub target: ExportTarget,
}

/// What `kiln export` writes.
#[derive(Subcommand)]
pub enum ExportTarget {
    /// A stateful Core ML ML Program package (fp16 weights, KV caches as states).
    Coreml(CoremlArgs),
}

/// Arguments of `kiln export coreml`.
#[derive(Args)]
pub struct CoremlArgs {
    /// The model: a GGUF file or a Hugging Face folder.
    pub source: PathBuf,
    /// The package to write (an .mlpackage folder; an existing package is replaced).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Positions the key/value caches hold.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// The most tokens one call may take (input_ids is [1, 1..=N]).
    #[arg(long, default_value_t = 64)]
    pub max_query: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln export`.
pub fn export(a: ExportArgs) -> Result<(), Failure> {
    match a.target {
        ExportTarget::Coreml(c) => coreml(c),
    }
}

fn coreml(a: CoremlArgs) -> Result<(), Failure> {
    let opts = ExportOptions {
        context: a.context,
        max_query: a.max_query,
    };
    let start = std::time::Instant::now();
    let summary = export::export_path(&a.source, &a.output, &opts).map_err(|e| Failure {
        // A defect of the exporter or an unwritable destination is not the user's input.
        code: match e {
            ExportError::Io { .. } | ExportError::Build(_) => 1,
            _ => 2,
        },
        message: e.to_string(),
    })?;
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "package": summary.path.display().to_string(),
            "weight_bytes": summary.weight_bytes,
            "blobs": summary.blobs,
            "ops": summary.ops,
            "context": summary.context,
            "max_query": summary.max_query,
            "seconds": secs,
        });
        println!("{j}");
    } else {
        println!(
            "{}: {} ops, {} weight blobs ({:.1} MB), context {}, up to {} tokens per call ({secs:.1} s)",
            summary.path.display(),
            summary.ops,
            summary.blobs,
            summary.weight_bytes as f64 / 1e6,
            summary.context,
            summary.max_query
        );
    }
    Ok(())
}
