//! Model arguments written `hf:ORG/NAME[@REV]`: fetched into the Hugging Face cache before the
//! command runs, and replaced by the local snapshot folder, so every command opens them as it
//! opens any folder.

use crate::export_commands::ExportTarget;
use crate::Command;
use std::path::PathBuf;

/// The model argument of `command`, for the commands that take one.
fn model_arg(command: &mut Command) -> Option<&mut PathBuf> {
    match command {
        Command::Run(a) => Some(&mut a.model),
        Command::Chat(a) => Some(&mut a.model),
        Command::Logits(a) => Some(&mut a.model),
        Command::Perplexity(a) => Some(&mut a.model),
        Command::Tokenize(a) => Some(&mut a.model),
        Command::Bench(a) => Some(&mut a.model),
        Command::Inspect(a) => Some(&mut a.model),
        Command::Convert(a) => Some(&mut a.source),
        Command::Export(a) => match &mut a.target {
            ExportTarget::Coreml(c) => Some(&mut c.source),
        },
        _ => None,
    }
}

/// Replaces a hub model argument by its local folder. On failure, the exit code and message:
/// 2 for anything the user can fix (source, network, access, cache), 1 for a panic (a bug).
pub fn resolve(command: &mut Command) -> Result<(), (u8, String)> {
    let Some(arg) = model_arg(command) else {
        return Ok(());
    };
    let fetched = std::panic::catch_unwind(|| kiln_hub::resolve_arg(arg));
    match fetched {
        Ok(Ok(Some(local))) => *arg = local,
        Ok(Ok(None)) => {}
        Ok(Err(e)) => return Err((2, e.to_string())),
        Err(_) => return Err((1, "internal error (this is a bug in kiln)".to_string())),
    }
    Ok(())
}
