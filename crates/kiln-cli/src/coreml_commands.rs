//! `kiln predict` and `kiln verify`: thin wrappers over `kiln_coreml::cli_support`.

use crate::commands::Failure;
use clap::Args;
use kiln_coreml::cli_support::{self, CliFailure};
use std::path::{Path, PathBuf};

/// Arguments of `kiln predict`.
#[derive(Args)]
pub struct PredictArgs {
    /// The package to run (a Core ML .mlpackage folder).
    pub package: PathBuf,
    /// A JSON list of calls, each mapping input names to {"dtype", "shape", "data"}.
    #[arg(long)]
    pub calls: PathBuf,
    /// Folder for the outputs: one file per call and output, named call{i}.{output}.f32
    /// (float32 little-endian).
    #[arg(long)]
    pub out: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// The package to verify (a Core ML .mlpackage folder).
    pub package: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn failure(e: CliFailure) -> Failure {
    Failure {
        code: e.code,
        message: e.message,
    }
}

fn require_mlpackage(path: &Path) -> Result<(), Failure> {
    if cli_support::is_mlpackage(path) {
        return Ok(());
    }
    Err(Failure {
        code: 2,
        message: format!(
            "{}: not a Core ML package (an .mlpackage folder with Manifest.json); other package kinds are not supported yet",
            path.display()
        ),
    })
}

/// `kiln predict`.
pub fn predict(a: PredictArgs) -> Result<(), Failure> {
    require_mlpackage(&a.package)?;
    let report = cli_support::predict(&a.package, &a.calls, &a.out).map_err(failure)?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(())
}

/// `kiln verify`: one package, or every package of a model split over layers.
pub fn verify(a: VerifyArgs) -> Result<(), Failure> {
    require_mlpackage(&a.package)?;
    let parts = cli_support::verify_all(&a.package).map_err(failure)?;
    if a.json {
        let reports: Vec<_> = parts
            .iter()
            .map(|(pkg, report)| cli_support::verify_json(pkg, report))
            .collect();
        match reports.as_slice() {
            [one] => println!("{one}"),
            _ => println!(
                "{}",
                serde_json::json!({
                    "package": a.package.display().to_string(),
                    "ok": true,
                    "packages": reports,
                })
            ),
        }
    } else {
        for (pkg, report) in &parts {
            println!("{}: ok", pkg.path().display());
            print!("{}", pkg.description());
            println!("{report}");
        }
        if parts.len() > 1 {
            println!(
                "{}: ok, {} packages run in a chain",
                a.package.display(),
                parts.len()
            );
        }
    }
    Ok(())
}
