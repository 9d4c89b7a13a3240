//! `vit`: the command-line tool. It parses arguments, calls one library function per
//! command and prints the result; all logic lives in the `vit` library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    vit::runtime::init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error as printed: `error: {e}` on the first line, then each cause that adds
/// something as `  caused by: {cause}`. Many errors already show their cause in their
/// own message (`{path}: {source}`, `tensor engine: {0}`), so a cause whose text was
/// already printed is left out: every cause appears once.
fn report(e: &anyhow::Error) -> String {
    let mut out = format!("error: {e}\n");
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out += &format!("  caused by: {text}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such thing");
        let e = anyhow::Error::new(vit::Error::io("/x/y.toml", io));
        assert_eq!(report(&e), "error: /x/y.toml: no such thing\n");
        // A cause the message does not show is still printed, once.
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such thing");
        let e = anyhow::Error::new(io).context("reading the list");
        assert_eq!(
            report(&e),
            "error: reading the list\n  caused by: no such thing\n"
        );
    }
}
