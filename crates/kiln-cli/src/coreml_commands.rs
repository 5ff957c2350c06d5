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
    /// Folder for the outputs: call<i>.<output>.f32, float32 little-endian.
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

/// `kiln verify`.
pub fn verify(a: VerifyArgs) -> Result<(), Failure> {
    require_mlpackage(&a.package)?;
    let (pkg, report) = cli_support::verify(&a.package).map_err(failure)?;
    if a.json {
        println!("{}", cli_support::verify_json(&pkg, &report));
    } else {
        println!("{}: ok", a.package.display());
        print!("{}", pkg.description());
        println!("{report}");
    }
    Ok(())
}
