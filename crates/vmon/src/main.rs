//! The `vmon` command line.

mod base64;
mod cli;
mod ctl;
mod kit;

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = cli::main();
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
