//! Model arguments written `hf:ORG/NAME[@REV]`: fetched into the Hugging Face cache before the
//! command runs, and replaced by the local snapshot folder, so every command opens them as it
//! opens any folder.

use crate::export_commands::ExportTarget;
use crate::Command;
use std::path::PathBuf;

/// The model arguments of `command`, for the commands that take models.
fn model_args(command: &mut Command) -> Vec<&mut PathBuf> {
    match command {
        Command::Run(a) => vec![&mut a.model],
        Command::Chat(a) => vec![&mut a.model],
        Command::Logits(a) => vec![&mut a.model],
        Command::Perplexity(a) => vec![&mut a.model],
        Command::Tokenize(a) => vec![&mut a.model],
        Command::Bench(a) => vec![&mut a.model],
        Command::Inspect(a) => vec![&mut a.model],
        Command::Convert(a) => vec![&mut a.source],
        Command::Validate(a) => std::iter::once(&mut a.candidate)
            .chain(a.against.as_mut())
            .collect(),
        Command::Export(a) => match &mut a.target {
            ExportTarget::Coreml(c) => vec![&mut c.source],
        },
        _ => Vec::new(),
    }
}

/// Replaces hub model arguments by their local folders. On failure, the exit code and message:
/// 2 for anything the user can fix (source, network, access, cache), 1 for a panic (a bug).
pub fn resolve(command: &mut Command) -> Result<(), (u8, String)> {
    for arg in model_args(command) {
        let fetched = std::panic::catch_unwind(|| kiln_hub::resolve_arg(arg));
        match fetched {
            Ok(Ok(Some(local))) => *arg = local,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err((2, e.to_string())),
            Err(_) => return Err((1, "internal error (this is a bug in kiln)".to_string())),
        }
    }
    Ok(())
}
