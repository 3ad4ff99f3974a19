//! `vmon-guest`: helpers that run inside a vmon guest, where the default kit's busybox
//! lacks them (it has no AF_VSOCK support). Built as one static binary that tests add to
//! the guest's initramfs at `/bin/vmon-guest`.
//!
//! Each subcommand is a function taking its arguments; add new ones to [`COMMANDS`].

mod bench;
mod memory;
mod vsock;

use std::process::ExitCode;

/// Name, argument synopsis, description, and the function that runs it.
type Command = (
    &'static str,
    &'static str,
    &'static str,
    fn(&[String]) -> Result<(), String>,
);

const COMMANDS: &[Command] = &[
    (
        "vsock-listen",
        "PORT",
        "accept one vsock connection on PORT, echo everything back until EOF",
        vsock::listen_cmd,
    ),
    (
        "vsock-connect",
        "CID PORT",
        "connect to CID:PORT; copy stdin to it (half-closing at EOF) and it to stdout",
        vsock::connect_cmd,
    ),
    (
        "seq-read",
        "PATH MIB",
        "read MIB MiB in 1 MiB requests (O_DIRECT on block devices); print MB/s",
        bench::seq_read_cmd,
    ),
    (
        "seq-write",
        "PATH MIB",
        "write MIB MiB in 1 MiB requests, then fdatasync; print MB/s",
        bench::seq_write_cmd,
    ),
    (
        "rand-read",
        "PATH SECONDS",
        "4 KiB reads at random offsets, one at a time, for SECONDS; print IOPS",
        bench::rand_read_cmd,
    ),
    (
        "tcp-send",
        "HOST:PORT MIB",
        "send MIB MiB over TCP, wait for the receiver's count; print MB/s",
        bench::tcp_send_cmd,
    ),
    (
        "tcp-recv",
        "PORT",
        "accept one TCP connection, count bytes to EOF, answer the count; print MB/s",
        bench::tcp_recv_cmd,
    ),
    (
        "hold-memory",
        "MIB|available",
        "fill MIB MiB (or all available memory) and keep it; print `holding N MiB`, then \
         answer each stdin line with `answer: LINE`",
        memory::hold_memory_cmd,
    ),
];

fn usage() -> String {
    let mut s = String::from("usage: vmon-guest COMMAND [ARG...]\ncommands:\n");
    for (name, args, what, _) in COMMANDS {
        s.push_str(&format!("  {name} {args}\n      {what}\n"));
    }
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    if name == "-h" || name == "--help" || name == "help" {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let Some((_, _, _, run)) = COMMANDS.iter().find(|c| c.0 == name) else {
        eprintln!("vmon-guest: unknown command '{name}'");
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    match run(&args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmon-guest {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a decimal argument, naming it in the error.
pub fn number<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{what} '{text}' is not a valid number"))
}

/// Exactly `N` arguments, or a usage error.
pub fn exact<'a, const N: usize>(
    args: &'a [String],
    synopsis: &str,
) -> Result<[&'a str; N], String> {
    let v: Vec<&str> = args.iter().map(String::as_str).collect();
    v.try_into()
        .map_err(|_| format!("expected arguments: {synopsis}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = vec!["1".to_string(), "2".to_string()];
        assert_eq!(exact::<2>(&a, "A B").unwrap(), ["1", "2"]);
        assert!(exact::<1>(&a, "A").is_err());
        assert_eq!(number::<u32>("port", "5000").unwrap(), 5000);
        assert!(number::<u32>("port", "-1").is_err());
        assert!(usage().contains("vsock-listen PORT"));
    }
}
