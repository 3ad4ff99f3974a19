//! `hold-memory`: fills guest memory and keeps it, for the snapshot benchmark, which needs
//! a guest whose RAM is all in use (every page resident and non-zero, so none is skipped
//! as untouched or zero), and a way to ask the guest whether it runs (a console echo).

use std::io::{BufRead, Write};

use crate::{exact, number};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
/// What `available` leaves free, so the kernel can still allocate.
const HEADROOM_MIB: usize = 48;

/// MemAvailable in MiB, from /proc/meminfo.
fn available_mib() -> Result<usize, String> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|kib| kib / 1024)
        .ok_or_else(|| "/proc/meminfo has no MemAvailable".to_string())
}

/// `hold-memory MIB|available`: writes a non-zero byte to every page of MIB MiB (or of all
/// available memory but a little headroom), prints `holding N MiB`, then answers every line
/// read from stdin with `answer: LINE` until EOF, keeping the memory.
pub fn hold_memory_cmd(args: &[String]) -> Result<(), String> {
    let [amount] = exact::<1>(args, "MIB|available")?;
    let mib = match amount {
        "available" => available_mib()?
            .checked_sub(HEADROOM_MIB)
            .ok_or("less memory available than the headroom")?,
        n => number("MIB", n)?,
    };
    let mut held = vec![0u8; mib * MIB];
    for (i, page) in held.chunks_mut(PAGE).enumerate() {
        // The page number's low byte, never zero: pages differ, and none reads as zero.
        page[0] = (i as u8) | 1;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "holding {mib} MiB").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        writeln!(out, "answer: {line}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    // Still in use here, so the compiler cannot free it before the loop.
    std::hint::black_box(&held);
    Ok(())
}
