//! A byte-code interpreter guest: Rust tests describe device accesses as a
//! [`Script`] (port I/O, PCI configuration space through 0xCF8/0xCFC, loads
//! and stores of exact widths anywhere below 4 GiB: RAM or MMIO), and
//! [`script_runner`] assembles a guest that performs them in order and
//! prints what it read.
//!
//! ```
//! use vmon_tinyguest::script::*;
//! let mut s = Script::new();
//! s.pci_read32(0, 0, 0, 0) // vendor/device of the host bridge
//!     .write(4, 0x20_0000, 0xDEAD_BEEF)
//!     .read(2, 0x20_0000)
//!     .print("done\n");
//! let kernel = script_elf(&s);
//! // Host side, with the guest's serial output:
//! let output = format!("{}{}done\n", value_line(0x0008_1b36), value_line(0xbeef));
//! assert_eq!(parse_values(&output), [0x0008_1b36, 0xbeef]);
//! # let _ = kernel;
//! ```
//!
//! # Output
//!
//! Every op that reads something ([`Script::read`], [`Script::inp`],
//! [`Script::wait_ne`], [`Script::base_from_bar0`], and the `*_rel` and
//! `pci_read*` variants) prints one line: exactly 16 lowercase hex digits,
//! the value zero-extended to 64 bits whatever the access width, then `\n`
//! (see [`value_line`]). [`Script::print`] prints its text verbatim. Errors
//! print a line starting with `script: ` and exit with
//! [`SCRIPT_BAD_OP_STATUS`] or [`SCRIPT_BAD_ADDR_STATUS`]. [`parse_values`]
//! picks the value lines out of the output.
//!
//! # Byte code
//!
//! A script is a sequence of ops, each an opcode byte followed by its
//! operands, little-endian, unaligned. `size` is the access width in bytes
//! (1, 2, 4 or 8; 1, 2 or 4 for ports); `flags` bit 0 ([`FLAG_REL`]) makes
//! `addr` an offset from the base register (`addr = base + offset`, the base
//! being 0 until [`Script::set_base`] or [`Script::base_from_bar0`]); other
//! flag bits are invalid.
//!
//! | opcode | op | operands | bytes |
//! | --- | --- | --- | --- |
//! | 0x01 | write | size u8, flags u8, addr u64, value u64 | 19 |
//! | 0x02 | read (prints) | size u8, flags u8, addr u64 | 11 |
//! | 0x03 | wait_ne (prints) | size u8, flags u8, addr u64, value u64, max_polls u32 | 23 |
//! | 0x04 | fill | flags u8, addr u64, len u64, byte u8 | 19 |
//! | 0x05 | out | size u8, port u16, value u32 | 8 |
//! | 0x06 | in (prints) | size u8, port u16 | 4 |
//! | 0x07 | print | len u16, len bytes of text | 3 + len |
//! | 0x08 | base from BAR (prints) | CF8 address u32 of the BAR register | 5 |
//! | 0x09 | set base | value u64 | 9 |
//! | 0x0A | exit | status u8 | 2 |
//! | 0x0B | wait_eq | size u8, flags u8, addr u64, value u64, max_polls u32 | 23 |
//!
//! Any other opcode (including 0x00) or a bad size or flag bit prints
//! `script: bad op XX at YYYYYYYY\n` (opcode, offset of the op in the
//! script, hex); an op that does not end within the script (only possible
//! with [`Script::raw`]) prints `script: ran off the end at YYYYYYYY\n`;
//! both exit with [`SCRIPT_BAD_OP_STATUS`]. An access that would reach 4 GiB or beyond
//! (including a relative address that overflows) prints
//! `script: bad address AAAAAAAAAAAAAAAA at YYYYYYYY\n` and exits with
//! [`SCRIPT_BAD_ADDR_STATUS`]. Nothing of a rejected op is performed.
//! [`script_runner`] appends `exit 0` to every script, so a script without
//! an explicit [`Script::exit`] exits 0.
//!
//! # Accesses
//!
//! Each read or write is one `mov` (or `in`/`out`) of exactly `size` bytes
//! at exactly `addr`: unaligned and page-straddling accesses are passed to
//! the CPU as they are. `fill` stores one byte at a time, in ascending
//! order. `wait_ne` reads the location (one access of `size` bytes per
//! poll) until the value read differs from `value` or `max_polls` reads
//! have been made, reading the COM1 line status register between polls as
//! a delay (one round trip to the VMM, ~10 µs); it prints the last value it
//! read, so the host sees a timeout as the old value. `wait_eq` polls until
//! the value read equals `value` (a driver waiting for a device to finish)
//! with only a `pause` between reads and prints nothing, so a benchmark's
//! waits cost no VMM round trips (a poll takes nanoseconds: `max_polls` of
//! 2^32 - 1 is some seconds); if `max_polls` reads pass without a match it prints
//! `script: timed out at YYYYYYYY, read VVVVVVVVVVVVVVVV\n` and exits with
//! [`SCRIPT_TIMEOUT_STATUS`].
//!
//! # Memory
//!
//! The runner first switches to its own page tables, which identity-map
//! 0..4 GiB with 2 MiB pages (0xC000_0000..4 GiB, the MMIO hole, uncached:
//! PCD|PWT). They live inside the runner's own image: [`SCRIPT_PAGE_TABLES_SIZE`]
//! bytes of zeros at its end (aligned to 4 KiB at run time), so they collide
//! with nothing vmon places in guest memory (all of that is below 1 MiB,
//! except an `--initrd`, which goes at the top of RAM).
//! The runner image, loaded at [`DEFAULT_LOAD_ADDR`]
//! (ELF) or 0x100200 (bzImage), always ends below [`SCRIPT_FREE_RAM`]:
//! scripts may use RAM from there up to the end of guest RAM. Below 1 MiB,
//! the boot contract's GDT (0x500) and stack (below 0x9000) are still in use.

use crate::asm::{Asm, Result, COM1_LSR, EXIT_PORT};
use crate::image::{elf64, elf64_pvh, BZIMAGE_ENTRY64, DEFAULT_LOAD_ADDR};
use iced_x86::code_asm::*;

/// Exit status for an unknown opcode, a bad size or flag, or a script that
/// runs off its end.
pub const SCRIPT_BAD_OP_STATUS: u8 = 90;
/// Exit status for an access at or beyond 4 GiB (what the runner maps).
pub const SCRIPT_BAD_ADDR_STATUS: u8 = 91;
/// Exit status for a `wait_eq` whose value never came.
pub const SCRIPT_TIMEOUT_STATUS: u8 = 92;
/// Guest RAM from here upward is free for scripts: the runner image,
/// its embedded script and its page tables end below it.
pub const SCRIPT_FREE_RAM: u64 = 0x20_0000;
/// Space reserved at the end of the runner image for its page tables:
/// PML4, PDPT and four page directories (6 pages) plus up to 4 KiB of
/// alignment.
pub const SCRIPT_PAGE_TABLES_SIZE: usize = 7 * 4096;
/// Highest address (exclusive) a script may access.
pub const SCRIPT_ADDR_LIMIT: u64 = 1 << 32;
/// Flag bit: the address is an offset from the base register.
pub const FLAG_REL: u8 = 1;

/// PCI configuration mechanism #1 address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
/// PCI configuration mechanism #1 data port.
pub const PCI_CONFIG_DATA: u16 = 0xCFC;

const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;
const OP_WAIT_NE: u8 = 0x03;
const OP_FILL: u8 = 0x04;
const OP_OUT: u8 = 0x05;
const OP_IN: u8 = 0x06;
const OP_PRINT: u8 = 0x07;
const OP_BASE_FROM_BAR: u8 = 0x08;
const OP_SET_BASE: u8 = 0x09;
const OP_EXIT: u8 = 0x0A;
const OP_WAIT_EQ: u8 = 0x0B;

/// Page-directory entry flags: present, writable, user, 2 MiB page.
const PDE_FLAGS: u64 = 0x87;
/// Present, writable, user: the PML4 and PDPT entries.
const TABLE_FLAGS: i32 = 0x7;
/// GDT selectors (RPL 3) of the runner's ring-3 segments, and its RFLAGS there: IOPL 3
/// (port I/O allowed), interrupts off.
const USER_DATA_SELECTOR: i32 = 0x18 | 3;
const USER_CODE_SELECTOR: i32 = 0x20 | 3;
const USER_RFLAGS: i32 = 0x3002;
/// Write-through and cache-disable, for the MMIO hole.
const PDE_UNCACHED: u64 = 0x18;

/// The config-space address (the value for port 0xCF8) of register `reg`
/// (its dword, `reg & 0xFC`) of function `bus:dev.func`.
pub fn pci_address(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    assert!(dev < 32, "PCI device {dev} out of range");
    assert!(func < 8, "PCI function {func} out of range");
    0x8000_0000
        | u32::from(bus) << 16
        | u32::from(dev) << 11
        | u32::from(func) << 8
        | u32::from(reg & 0xFC)
}

/// One op of a [`Script`]; see the [module docs](self) for the encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        size: u8,
        rel: bool,
        addr: u64,
        value: u64,
    },
    Read {
        size: u8,
        rel: bool,
        addr: u64,
    },
    WaitNe {
        size: u8,
        rel: bool,
        addr: u64,
        value: u64,
        max_polls: u32,
    },
    WaitEq {
        size: u8,
        rel: bool,
        addr: u64,
        value: u64,
        max_polls: u32,
    },
    Fill {
        rel: bool,
        addr: u64,
        len: u64,
        byte: u8,
    },
    Out {
        size: u8,
        port: u16,
        value: u32,
    },
    In {
        size: u8,
        port: u16,
    },
    Print(Vec<u8>),
    /// Reads the BAR whose config address (for 0xCF8) is `cf8`, and the
    /// next one too if the first is a 64-bit memory BAR; the base is the
    /// BAR value without its flag bits (4 for memory, 2 for I/O BARs).
    BaseFromBar {
        cf8: u32,
    },
    SetBase(u64),
    Exit(u8),
    /// Bytes copied into the script as they are: for testing the
    /// interpreter's checks. [`Script::decode`] never returns this.
    Raw(Vec<u8>),
}

/// Why [`Script::decode`] rejected some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Offset of the op that could not be decoded.
    pub offset: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad script op at offset {}: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for DecodeError {}

impl Op {
    /// Whether the runner prints a value line for this op.
    pub fn prints_value(&self) -> bool {
        matches!(
            self,
            Op::Read { .. } | Op::WaitNe { .. } | Op::In { .. } | Op::BaseFromBar { .. }
        )
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Write {
                size,
                rel,
                addr,
                value,
            } => {
                out.extend([OP_WRITE, *size, u8::from(*rel)]);
                out.extend(addr.to_le_bytes());
                out.extend(value.to_le_bytes());
            }
            Op::Read { size, rel, addr } => {
                out.extend([OP_READ, *size, u8::from(*rel)]);
                out.extend(addr.to_le_bytes());
            }
            Op::WaitNe {
                size,
                rel,
                addr,
                value,
                max_polls,
            }
            | Op::WaitEq {
                size,
                rel,
                addr,
                value,
                max_polls,
            } => {
                let code = if matches!(self, Op::WaitNe { .. }) {
                    OP_WAIT_NE
                } else {
                    OP_WAIT_EQ
                };
                out.extend([code, *size, u8::from(*rel)]);
                out.extend(addr.to_le_bytes());
                out.extend(value.to_le_bytes());
                out.extend(max_polls.to_le_bytes());
            }
            Op::Fill {
                rel,
                addr,
                len,
                byte,
            } => {
                out.extend([OP_FILL, u8::from(*rel)]);
                out.extend(addr.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push(*byte);
            }
            Op::Out { size, port, value } => {
                out.extend([OP_OUT, *size]);
                out.extend(port.to_le_bytes());
                out.extend(value.to_le_bytes());
            }
            Op::In { size, port } => {
                out.extend([OP_IN, *size]);
                out.extend(port.to_le_bytes());
            }
            Op::Print(text) => {
                let len = u16::try_from(text.len()).expect("print op longer than 64 KiB");
                out.push(OP_PRINT);
                out.extend(len.to_le_bytes());
                out.extend(text);
            }
            Op::BaseFromBar { cf8 } => {
                out.push(OP_BASE_FROM_BAR);
                out.extend(cf8.to_le_bytes());
            }
            Op::SetBase(base) => {
                out.push(OP_SET_BASE);
                out.extend(base.to_le_bytes());
            }
            Op::Exit(status) => out.extend([OP_EXIT, *status]),
            Op::Raw(bytes) => out.extend(bytes),
        }
    }
}

/// Reads little-endian fields of one op.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    op_start: usize,
}

impl Reader<'_> {
    fn err(&self, reason: &'static str) -> DecodeError {
        DecodeError {
            offset: self.op_start,
            reason,
        }
    }

    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], DecodeError> {
        let end = self.pos + N;
        let b = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.err("truncated op"))?;
        self.pos = end;
        Ok(b.try_into().unwrap())
    }

    fn u8(&mut self) -> std::result::Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> std::result::Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }

    fn u32(&mut self) -> std::result::Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn mem_size(&mut self) -> std::result::Result<u8, DecodeError> {
        match self.u8()? {
            s @ (1 | 2 | 4 | 8) => Ok(s),
            _ => Err(self.err("bad access size")),
        }
    }

    fn port_size(&mut self) -> std::result::Result<u8, DecodeError> {
        match self.u8()? {
            s @ (1 | 2 | 4) => Ok(s),
            _ => Err(self.err("bad port access size")),
        }
    }

    fn rel(&mut self) -> std::result::Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            FLAG_REL => Ok(true),
            _ => Err(self.err("bad flags")),
        }
    }
}

/// A sequence of device accesses for [`script_runner`]. Build it with the
/// chaining methods; see the [module docs](self) for what each op does.
///
/// Builder methods panic on arguments the runner would reject (bad sizes,
/// values wider than the access, absolute addresses at or above 4 GiB), so
/// a mistake shows up in the test, not as a guest error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    ops: Vec<Op>,
}

fn check_mem_size(size: u8) {
    assert!(
        matches!(size, 1 | 2 | 4 | 8),
        "access size must be 1, 2, 4 or 8, not {size}"
    );
}

fn check_port_size(size: u8) {
    assert!(
        matches!(size, 1 | 2 | 4),
        "port access size must be 1, 2 or 4, not {size}"
    );
}

fn check_value(size: u8, value: u64) {
    assert!(
        size == 8 || value >> (u32::from(size) * 8) == 0,
        "value {value:#x} does not fit in {size} bytes"
    );
}

fn check_abs(addr: u64, len: u64) {
    assert!(
        addr.checked_add(len)
            .is_some_and(|end| end <= SCRIPT_ADDR_LIMIT),
        "access of {len} bytes at {addr:#x} reaches beyond 4 GiB"
    );
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    /// The ops so far.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Appends `op` unchecked (the runner still checks it).
    pub fn op(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// How many value lines the runner prints for this script (if it
    /// runs to completion).
    pub fn value_count(&self) -> usize {
        self.ops.iter().filter(|op| op.prints_value()).count()
    }

    /// The byte code, without the final `exit 0` the runner adds.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }

    /// Decodes byte code made by [`Script::to_bytes`].
    pub fn decode(bytes: &[u8]) -> std::result::Result<Script, DecodeError> {
        let mut r = Reader {
            bytes,
            pos: 0,
            op_start: 0,
        };
        let mut ops = Vec::new();
        while r.pos < bytes.len() {
            r.op_start = r.pos;
            let op = match r.u8()? {
                OP_WRITE => {
                    let size = r.mem_size()?;
                    Op::Write {
                        size,
                        rel: r.rel()?,
                        addr: r.u64()?,
                        value: r.u64()?,
                    }
                }
                OP_READ => {
                    let size = r.mem_size()?;
                    Op::Read {
                        size,
                        rel: r.rel()?,
                        addr: r.u64()?,
                    }
                }
                code @ (OP_WAIT_NE | OP_WAIT_EQ) => {
                    let size = r.mem_size()?;
                    let (rel, addr, value, max_polls) = (r.rel()?, r.u64()?, r.u64()?, r.u32()?);
                    if code == OP_WAIT_NE {
                        Op::WaitNe {
                            size,
                            rel,
                            addr,
                            value,
                            max_polls,
                        }
                    } else {
                        Op::WaitEq {
                            size,
                            rel,
                            addr,
                            value,
                            max_polls,
                        }
                    }
                }
                OP_FILL => Op::Fill {
                    rel: r.rel()?,
                    addr: r.u64()?,
                    len: r.u64()?,
                    byte: r.u8()?,
                },
                OP_OUT => Op::Out {
                    size: r.port_size()?,
                    port: r.u16()?,
                    value: r.u32()?,
                },
                OP_IN => Op::In {
                    size: r.port_size()?,
                    port: r.u16()?,
                },
                OP_PRINT => {
                    let len = usize::from(r.u16()?);
                    let text = bytes
                        .get(r.pos..r.pos + len)
                        .ok_or_else(|| r.err("truncated text"))?;
                    r.pos += len;
                    Op::Print(text.to_vec())
                }
                OP_BASE_FROM_BAR => Op::BaseFromBar { cf8: r.u32()? },
                OP_SET_BASE => Op::SetBase(r.u64()?),
                OP_EXIT => Op::Exit(r.u8()?),
                _ => return Err(r.err("unknown opcode")),
            };
            ops.push(op);
        }
        Ok(Script { ops })
    }

    fn mem_write(&mut self, size: u8, rel: bool, addr: u64, value: u64) -> &mut Self {
        check_mem_size(size);
        check_value(size, value);
        if !rel {
            check_abs(addr, size.into());
        }
        self.op(Op::Write {
            size,
            rel,
            addr,
            value,
        })
    }

    fn mem_read(&mut self, size: u8, rel: bool, addr: u64) -> &mut Self {
        check_mem_size(size);
        if !rel {
            check_abs(addr, size.into());
        }
        self.op(Op::Read { size, rel, addr })
    }

    fn mem_wait(
        &mut self,
        until_equal: bool,
        size: u8,
        rel: bool,
        (addr, value, max_polls): (u64, u64, u32),
    ) -> &mut Self {
        check_mem_size(size);
        check_value(size, value);
        assert!(max_polls >= 1, "a wait needs at least one poll");
        if !rel {
            check_abs(addr, size.into());
        }
        self.op(if until_equal {
            Op::WaitEq {
                size,
                rel,
                addr,
                value,
                max_polls,
            }
        } else {
            Op::WaitNe {
                size,
                rel,
                addr,
                value,
                max_polls,
            }
        })
    }

    fn mem_fill(&mut self, rel: bool, addr: u64, len: u64, byte: u8) -> &mut Self {
        if !rel {
            check_abs(addr, len);
        }
        self.op(Op::Fill {
            rel,
            addr,
            len,
            byte,
        })
    }

    /// Stores `value` (`size` bytes, 1/2/4/8) at guest-physical `addr`.
    pub fn write(&mut self, size: u8, addr: u64, value: u64) -> &mut Self {
        self.mem_write(size, false, addr, value)
    }

    /// [`Script::write`] at base + `offset`.
    pub fn write_rel(&mut self, size: u8, offset: u64, value: u64) -> &mut Self {
        self.mem_write(size, true, offset, value)
    }

    /// Loads `size` bytes from `addr` and prints the value.
    pub fn read(&mut self, size: u8, addr: u64) -> &mut Self {
        self.mem_read(size, false, addr)
    }

    /// [`Script::read`] at base + `offset`.
    pub fn read_rel(&mut self, size: u8, offset: u64) -> &mut Self {
        self.mem_read(size, true, offset)
    }

    /// Polls `size` bytes at `addr` until they differ from `value`, at most
    /// `max_polls` reads (>= 1); prints the last value read.
    pub fn wait_ne(&mut self, size: u8, addr: u64, value: u64, max_polls: u32) -> &mut Self {
        self.mem_wait(false, size, false, (addr, value, max_polls))
    }

    /// [`Script::wait_ne`] at base + `offset`.
    pub fn wait_ne_rel(&mut self, size: u8, offset: u64, value: u64, max_polls: u32) -> &mut Self {
        self.mem_wait(false, size, true, (offset, value, max_polls))
    }

    /// Polls `size` bytes at `addr` until they equal `value`, at most
    /// `max_polls` reads (>= 1); prints nothing, but ends the script with
    /// [`SCRIPT_TIMEOUT_STATUS`] if the value does not come.
    pub fn wait_eq(&mut self, size: u8, addr: u64, value: u64, max_polls: u32) -> &mut Self {
        self.mem_wait(true, size, false, (addr, value, max_polls))
    }

    /// Stores `byte` to each of `len` bytes from `addr` (byte stores,
    /// ascending).
    pub fn fill(&mut self, addr: u64, len: u64, byte: u8) -> &mut Self {
        self.mem_fill(false, addr, len, byte)
    }

    /// [`Script::fill`] at base + `offset`.
    pub fn fill_rel(&mut self, offset: u64, len: u64, byte: u8) -> &mut Self {
        self.mem_fill(true, offset, len, byte)
    }

    /// Stores `bytes` at `addr` as write ops: 8-byte stores while at least
    /// 8 bytes remain, then 4, 2 and 1 (so for MMIO, mind the widths).
    pub fn write_bytes(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        check_abs(addr, bytes.len() as u64);
        self.write_bytes_with(false, addr, bytes)
    }

    /// [`Script::write_bytes`] at base + `offset`.
    pub fn write_bytes_rel(&mut self, offset: u64, bytes: &[u8]) -> &mut Self {
        self.write_bytes_with(true, offset, bytes)
    }

    fn write_bytes_with(&mut self, rel: bool, addr: u64, bytes: &[u8]) -> &mut Self {
        let mut at = 0;
        while at < bytes.len() {
            let size = [8, 4, 2, 1]
                .into_iter()
                .find(|&s| bytes.len() - at >= s)
                .unwrap();
            let mut value = [0u8; 8];
            value[..size].copy_from_slice(&bytes[at..at + size]);
            let offset = addr.wrapping_add(at as u64);
            self.mem_write(size as u8, rel, offset, u64::from_le_bytes(value));
            at += size;
        }
        self
    }

    /// `out` of `size` bytes (1/2/4) of `value` to `port`.
    pub fn outp(&mut self, size: u8, port: u16, value: u32) -> &mut Self {
        check_port_size(size);
        check_value(size, value.into());
        self.op(Op::Out { size, port, value })
    }

    /// `in` of `size` bytes (1/2/4) from `port`; prints the value.
    pub fn inp(&mut self, size: u8, port: u16) -> &mut Self {
        check_port_size(size);
        self.op(Op::In { size, port })
    }

    /// Prints `text` verbatim (split into several ops if longer than
    /// 64 KiB).
    pub fn print(&mut self, text: impl AsRef<[u8]>) -> &mut Self {
        for chunk in text.as_ref().chunks(usize::from(u16::MAX)) {
            self.op(Op::Print(chunk.to_vec()));
        }
        self
    }

    /// Sets the base register for the `*_rel` ops.
    pub fn set_base(&mut self, base: u64) -> &mut Self {
        self.op(Op::SetBase(base))
    }

    /// Sets the base register from BAR `bar` (0..=5) of `bus:dev.func`
    /// (read through 0xCF8/0xCFC) and prints it. A 64-bit memory BAR
    /// (type bits 2:1 = 10) takes its high half from the next BAR
    /// register; flag bits (3:0 of a memory BAR, 1:0 of an I/O BAR) are
    /// masked off.
    pub fn base_from_bar(&mut self, bus: u8, dev: u8, func: u8, bar: u8) -> &mut Self {
        assert!(bar < 6, "BAR index {bar} out of range");
        let cf8 = pci_address(bus, dev, func, 0x10 + 4 * bar);
        self.op(Op::BaseFromBar { cf8 })
    }

    /// [`Script::base_from_bar`] of BAR0 (with BAR1 as the high half of a
    /// 64-bit BAR0).
    pub fn base_from_bar0(&mut self, bus: u8, dev: u8, func: u8) -> &mut Self {
        self.base_from_bar(bus, dev, func, 0)
    }

    fn pci_select(&mut self, bus: u8, dev: u8, func: u8, reg: u8) -> u16 {
        self.outp(4, PCI_CONFIG_ADDRESS, pci_address(bus, dev, func, reg));
        PCI_CONFIG_DATA + u16::from(reg & 3)
    }

    /// Prints config dword `reg` (4-byte aligned) of `bus:dev.func`.
    pub fn pci_read32(&mut self, bus: u8, dev: u8, func: u8, reg: u8) -> &mut Self {
        assert_eq!(reg % 4, 0, "unaligned config dword {reg:#x}");
        let port = self.pci_select(bus, dev, func, reg);
        self.inp(4, port)
    }

    /// Prints config word `reg` (2-byte aligned) of `bus:dev.func`.
    pub fn pci_read16(&mut self, bus: u8, dev: u8, func: u8, reg: u8) -> &mut Self {
        assert_eq!(reg % 2, 0, "unaligned config word {reg:#x}");
        let port = self.pci_select(bus, dev, func, reg);
        self.inp(2, port)
    }

    /// Prints config byte `reg` of `bus:dev.func`.
    pub fn pci_read8(&mut self, bus: u8, dev: u8, func: u8, reg: u8) -> &mut Self {
        let port = self.pci_select(bus, dev, func, reg);
        self.inp(1, port)
    }

    /// Writes config dword `reg` (4-byte aligned) of `bus:dev.func`.
    pub fn pci_write32(&mut self, bus: u8, dev: u8, func: u8, reg: u8, value: u32) -> &mut Self {
        assert_eq!(reg % 4, 0, "unaligned config dword {reg:#x}");
        let port = self.pci_select(bus, dev, func, reg);
        self.outp(4, port, value)
    }

    /// Writes config word `reg` (2-byte aligned) of `bus:dev.func`.
    pub fn pci_write16(&mut self, bus: u8, dev: u8, func: u8, reg: u8, value: u16) -> &mut Self {
        assert_eq!(reg % 2, 0, "unaligned config word {reg:#x}");
        let port = self.pci_select(bus, dev, func, reg);
        self.outp(2, port, value.into())
    }

    /// Writes config byte `reg` of `bus:dev.func`.
    pub fn pci_write8(&mut self, bus: u8, dev: u8, func: u8, reg: u8, value: u8) -> &mut Self {
        let port = self.pci_select(bus, dev, func, reg);
        self.outp(1, port, value.into())
    }

    /// Ends the VM with `status` (through the exit port).
    pub fn exit(&mut self, status: u8) -> &mut Self {
        self.op(Op::Exit(status))
    }

    /// Appends raw bytes to the byte code, for testing the runner's own
    /// checks (e.g. an unknown opcode).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.op(Op::Raw(bytes.to_vec()))
    }
}

/// The line the runner prints for `value`: 16 lowercase hex digits and
/// `\n`.
pub fn value_line(value: u64) -> String {
    format!("{value:016x}\n")
}

/// The values printed by a script runner, in order: every line of
/// `output` that is exactly 16 lowercase hex digits (text printed with
/// [`Script::print`] is skipped unless it forms such a line itself).
pub fn parse_values(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter(|l| {
            l.len() == 16
                && l.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .map(|l| u64::from_str_radix(l, 16).unwrap())
        .collect()
}

/// The interpreter for `script`: 64-bit, position-independent code with
/// the script byte code (plus a final `exit 0`) and room for its page
/// tables after it. Wrap it with [`elf64`] or
/// [`bzimage`](crate::bzimage), or use [`script_elf`].
///
/// Panics if the image would not end below [`SCRIPT_FREE_RAM`].
pub fn script_runner(script: &Script) -> Vec<u8> {
    runner_at(script, DEFAULT_LOAD_ADDR)
}

/// [`script_runner`] wrapped as an ELF image at [`DEFAULT_LOAD_ADDR`].
pub fn script_elf(script: &Script) -> Vec<u8> {
    elf64(&script_runner(script), DEFAULT_LOAD_ADDR)
}

/// Room for the long-mode trampoline in front of the runner in [`script_pvh_elf`].
const PVH_TRAMPOLINE_SIZE: u64 = 0x100;
/// `mov esp, 0x8FF0`: the same bytes in 32- and 64-bit mode, and in 64-bit mode it clears
/// the upper half of RSP, which a switch from 32-bit mode leaves undefined.
const SET_STACK_64: [u8; 5] = [0xBC, 0xF0, 0x8F, 0x00, 0x00];

/// [`script_runner`] behind a PVH entry point, for VMMs that boot a PVH ELF but not vmon's
/// 64-bit entry (QEMU's microvm among them), so a benchmark can drive their devices with
/// the same guest. 32-bit code at [`DEFAULT_LOAD_ADDR`] builds the boot contract's state
/// (identity map of the first 1 GiB at 0x9000, a GDT with code 0x08 and data 0x10, RSP =
/// 0x8FF0), turns on long mode and jumps to the runner, which follows it.
///
/// Under a VMM without vmon's exit port (0x510), the runner's final `exit` does not end
/// the VM: it spins, and the host stops the VMM once it has read what it waits for.
pub fn script_pvh_elf(script: &Script) -> Vec<u8> {
    let runner_ip = DEFAULT_LOAD_ADDR + PVH_TRAMPOLINE_SIZE;
    let mut image = long_mode_trampoline(runner_ip - SET_STACK_64.len() as u64)
        .unwrap_or_else(|e| panic!("assembling the PVH trampoline failed: {e}"));
    let stub_at = (PVH_TRAMPOLINE_SIZE as usize) - SET_STACK_64.len();
    assert!(
        image.len() <= stub_at,
        "PVH trampoline of {} bytes",
        image.len()
    );
    image.resize(stub_at, 0);
    image.extend(SET_STACK_64);
    image.extend(runner_at(script, runner_ip));
    elf64_pvh(&image, DEFAULT_LOAD_ADDR)
}

/// 32-bit protected mode (paging off, flat segments, as PVH enters) to 64-bit mode at
/// `entry64`.
fn long_mode_trampoline(entry64: u64) -> Result<Vec<u8>> {
    const PML4: u32 = 0x9000;
    const PDPT: u32 = 0xA000;
    const PD: u32 = 0xB000;
    const EFER: u32 = 0xC000_0080;
    // The boot contract's GDT address, and its pseudo-descriptor after it.
    const GDT: u32 = 0x500;
    const GDTR: u32 = 0x520;
    let mut g = Asm::new(32)?;
    let mut zero = g.a.create_label();
    let mut map = g.a.create_label();
    let a = &mut g.a;
    a.mov(edi, PML4)?;
    a.mov(ecx, 3 * 1024u32)?;
    a.xor(eax, eax)?;
    a.set_label(&mut zero)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(edi, 4i32)?;
    a.dec(ecx)?;
    a.jne(zero)?;
    a.mov(dword_ptr(PML4), PDPT | 3)?;
    a.mov(dword_ptr(PDPT), PD | 3)?;
    // 512 present, writable 2 MiB pages.
    a.mov(edi, PD)?;
    a.mov(eax, PDE_FLAGS as u32)?;
    a.mov(ecx, 512u32)?;
    a.set_label(&mut map)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(edi, 8i32)?;
    a.add(eax, 0x20_0000i32)?;
    a.dec(ecx)?;
    a.jne(map)?;
    a.mov(eax, PML4)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr4)?;
    a.or(eax, 0x20i32)?; // PAE
    a.mov(cr4, eax)?;
    a.mov(ecx, EFER)?;
    a.rdmsr()?;
    a.or(eax, 0x100i32)?; // LME
    a.wrmsr()?;
    // Null, 64-bit code (0x08), data (0x10).
    for (i, descriptor) in [0u64, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]
        .into_iter()
        .enumerate()
    {
        let at = GDT + 8 * i as u32;
        a.mov(dword_ptr(at), descriptor as u32)?;
        a.mov(dword_ptr(at + 4), (descriptor >> 32) as u32)?;
    }
    a.mov(word_ptr(GDTR), 3 * 8 - 1)?;
    a.mov(dword_ptr(GDTR + 2), GDT)?;
    a.lgdt(ptr(GDTR))?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0001u32 as i32)?; // PG, PE
    a.mov(cr0, eax)?;
    a.mov(eax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.jmp_far(0x08, u32::try_from(entry64).expect("entry below 4 GiB"))?;
    g.finish(DEFAULT_LOAD_ADDR)
}

fn runner_at(script: &Script, ip: u64) -> Vec<u8> {
    let mut bytes = script.to_bytes();
    Op::Exit(0).encode(&mut bytes);
    let code = (|| {
        let mut g = Asm::new(64)?;
        emit_runner(&mut g, &bytes)?;
        g.finish(ip)
    })()
    .unwrap_or_else(|e| panic!("assembling the script runner failed: {e}"));
    // The bzImage entry is the highest address the runner is entered at.
    assert!(
        BZIMAGE_ENTRY64 + code.len() as u64 <= SCRIPT_FREE_RAM,
        "script too large: runner image of {} bytes would reach {SCRIPT_FREE_RAM:#x}",
        code.len()
    );
    code
}

/// Register use in the runner:
/// - `r15`: address of the byte code; `r12`: offset of the next op;
///   `r11`: offset of the current op (all fields are read at `r15 + r11 + k`);
/// - `r13`: the base register;
/// - `r14`: the access address; `ecx`: the access size (or fill length);
/// - `rbx`: the value written, or read and printed; `rbp`: loop counts;
/// - `putc`/`print_hex` clobber `eax`, `ecx`, `edx`, `esi`.
struct Labels {
    next: CodeLabel,
    bad_op: CodeLabel,
    bad_end: CodeLabel,
    check_end: CodeLabel,
    bad_addr: CodeLabel,
    timeout: CodeLabel,
    check_size: CodeLabel,
    resolve: CodeLabel,
    load: CodeLabel,
    store: CodeLabel,
    print_value: CodeLabel,
}

fn emit_runner(g: &mut Asm, bytes: &[u8]) -> Result {
    let mut script = g.a.create_label();
    let mut tables = g.a.create_label();
    let mut l = Labels {
        next: g.a.create_label(),
        bad_op: g.a.create_label(),
        bad_end: g.a.create_label(),
        check_end: g.a.create_label(),
        bad_addr: g.a.create_label(),
        timeout: g.a.create_label(),
        check_size: g.a.create_label(),
        resolve: g.a.create_label(),
        load: g.a.create_label(),
        store: g.a.create_label(),
        print_value: g.a.create_label(),
    };

    let mut gdt = GdtLabels {
        table: g.a.create_label(),
        descriptor: g.a.create_label(),
        base: g.a.create_label(),
    };
    emit_page_tables(g, tables)?;
    emit_enter_ring3(g, &gdt)?;

    g.a.lea(r15, ptr(script))?;
    g.a.xor(r12d, r12d)?;
    g.a.xor(r13d, r13d)?;

    // The dispatcher.
    let mut handlers: Vec<(u8, CodeLabel)> = Vec::new();
    for op in [
        OP_WRITE,
        OP_READ,
        OP_WAIT_NE,
        OP_WAIT_EQ,
        OP_FILL,
        OP_OUT,
        OP_IN,
        OP_PRINT,
        OP_BASE_FROM_BAR,
        OP_SET_BASE,
        OP_EXIT,
    ] {
        handlers.push((op, g.a.create_label()));
    }
    g.a.set_label(&mut l.next)?;
    g.a.mov(r11, r12)?;
    g.a.cmp(r12, bytes.len() as i32)?;
    g.a.jae(l.bad_end)?;
    g.a.movzx(eax, byte_ptr(r15 + r11))?;
    for &(op, label) in &handlers {
        g.a.cmp(eax, u32::from(op))?;
        g.a.je(label)?;
    }
    g.a.jmp(l.bad_op)?;

    for (op, mut label) in handlers {
        g.a.set_label(&mut label)?;
        match op {
            OP_WRITE => {
                fetch_mem(g, &l, 19)?;
                g.a.mov(rbx, qword_ptr(r15 + r11 + 11))?;
                g.a.call(l.store)?;
            }
            OP_READ => {
                fetch_mem(g, &l, 11)?;
                g.a.call(l.load)?;
                g.a.call(l.print_value)?;
            }
            OP_WAIT_NE | OP_WAIT_EQ => {
                let mut poll = g.a.create_label();
                let mut done = g.a.create_label();
                fetch_mem(g, &l, 23)?;
                g.a.mov(r8, qword_ptr(r15 + r11 + 11))?;
                g.a.mov(ebp, dword_ptr(r15 + r11 + 19))?;
                g.a.set_label(&mut poll)?;
                g.a.call(l.load)?;
                g.a.cmp(rbx, r8)?;
                let out_of_polls = if op == OP_WAIT_NE {
                    g.a.jne(done)?;
                    done
                } else {
                    g.a.je(l.next)?;
                    l.timeout
                };
                g.a.dec(ebp)?;
                // At least one read even if max_polls is 0 (dec wraps).
                g.a.je(out_of_polls)?;
                g.a.cmp(ebp, -1i32)?;
                g.a.je(out_of_polls)?;
                if op == OP_WAIT_NE {
                    g.a.mov(edx, u32::from(COM1_LSR))?;
                    g.a.in_(al, dx)?;
                } else {
                    g.a.pause()?;
                }
                g.a.jmp(poll)?;
                g.a.set_label(&mut done)?;
                if op == OP_WAIT_NE {
                    g.a.call(l.print_value)?;
                }
            }
            OP_FILL => {
                let mut store = g.a.create_label();
                advance(g, &l, 19)?;
                g.a.movzx(eax, byte_ptr(r15 + r11 + 1))?;
                g.a.mov(r14, qword_ptr(r15 + r11 + 2))?;
                g.a.mov(rcx, qword_ptr(r15 + r11 + 10))?;
                g.a.movzx(ebx, byte_ptr(r15 + r11 + 18))?;
                g.a.call(l.resolve)?;
                g.a.mov(rbp, rcx)?;
                g.a.test(rbp, rbp)?;
                g.a.je(l.next)?;
                g.a.set_label(&mut store)?;
                g.a.mov(byte_ptr(r14), bl)?;
                g.a.inc(r14)?;
                g.a.dec(rbp)?;
                g.a.jne(store)?;
            }
            OP_OUT => {
                let mut o1 = g.a.create_label();
                let mut o2 = g.a.create_label();
                advance(g, &l, 8)?;
                g.a.movzx(ecx, byte_ptr(r15 + r11 + 1))?;
                g.a.movzx(edx, word_ptr(r15 + r11 + 2))?;
                g.a.mov(eax, dword_ptr(r15 + r11 + 4))?;
                g.a.cmp(ecx, 1u32)?;
                g.a.je(o1)?;
                g.a.cmp(ecx, 2u32)?;
                g.a.je(o2)?;
                g.a.cmp(ecx, 4u32)?;
                g.a.jne(l.bad_op)?;
                g.a.out(dx, eax)?;
                g.a.jmp(l.next)?;
                g.a.set_label(&mut o1)?;
                g.a.out(dx, al)?;
                g.a.jmp(l.next)?;
                g.a.set_label(&mut o2)?;
                g.a.out(dx, ax)?;
            }
            OP_IN => {
                let mut i1 = g.a.create_label();
                let mut i2 = g.a.create_label();
                let mut print = g.a.create_label();
                advance(g, &l, 4)?;
                g.a.movzx(ecx, byte_ptr(r15 + r11 + 1))?;
                g.a.movzx(edx, word_ptr(r15 + r11 + 2))?;
                g.a.cmp(ecx, 1u32)?;
                g.a.je(i1)?;
                g.a.cmp(ecx, 2u32)?;
                g.a.je(i2)?;
                g.a.cmp(ecx, 4u32)?;
                g.a.jne(l.bad_op)?;
                g.a.in_(eax, dx)?;
                g.a.mov(ebx, eax)?;
                g.a.jmp(print)?;
                g.a.set_label(&mut i1)?;
                g.a.in_(al, dx)?;
                g.a.movzx(ebx, al)?;
                g.a.jmp(print)?;
                g.a.set_label(&mut i2)?;
                g.a.in_(ax, dx)?;
                g.a.movzx(ebx, ax)?;
                g.a.set_label(&mut print)?;
                g.a.call(l.print_value)?;
            }
            OP_PRINT => {
                let mut putc = g.a.create_label();
                g.a.movzx(ebp, word_ptr(r15 + r11 + 1))?;
                g.a.lea(r14, ptr(r15 + r11 + 3))?;
                g.a.lea(r12, ptr(r11 + rbp + 3))?;
                g.a.call(l.check_end)?;
                g.a.test(ebp, ebp)?;
                g.a.je(l.next)?;
                g.a.set_label(&mut putc)?;
                g.a.movzx(eax, byte_ptr(r14))?;
                g.call_putc()?;
                g.a.inc(r14)?;
                g.a.dec(ebp)?;
                g.a.jne(putc)?;
            }
            OP_BASE_FROM_BAR => emit_base_from_bar(g, &l)?,
            OP_SET_BASE => {
                advance(g, &l, 9)?;
                g.a.mov(r13, qword_ptr(r15 + r11 + 1))?;
            }
            OP_EXIT => {
                advance(g, &l, 2)?;
                g.a.mov(al, byte_ptr(r15 + r11 + 1))?;
                g.a.mov(edx, u32::from(EXIT_PORT))?;
                g.a.out(dx, al)?;
                g.halt_forever()?;
                continue;
            }
            _ => unreachable!(),
        }
        g.a.jmp(l.next)?;
    }

    emit_subroutines(g, &mut l, bytes.len() as i32)?;

    g.finish_subroutines()?;
    emit_gdt(g, &mut gdt)?;
    g.a.set_label(&mut script)?;
    g.a.db(bytes)?;
    g.a.set_label(&mut tables)?;
    g.a.db(&[0; SCRIPT_PAGE_TABLES_SIZE])
}

/// Builds the 0..4 GiB identity map in the (4 KiB aligned) space at
/// `tables` and loads CR3 with it. Clobbers `rax`, `rcx`, `rsi`, `rdi`.
fn emit_page_tables(g: &mut Asm, tables: CodeLabel) -> Result {
    let mut zero = g.a.create_label();
    let mut ram = g.a.create_label();
    let mut mmio = g.a.create_label();
    let a = &mut g.a;
    // rdi = PML4, then PDPT at +0x1000 and the four PDs at +0x2000..
    a.lea(rdi, ptr(tables))?;
    a.add(rdi, 0xFFFi32)?;
    a.and(rdi, -0x1000i32)?;
    // Zero PML4 and PDPT (the image is zeros there, but be exact).
    a.mov(rsi, rdi)?;
    a.mov(ecx, 1024u32)?;
    a.xor(eax, eax)?;
    a.set_label(&mut zero)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.add(rsi, 8i32)?;
    a.dec(ecx)?;
    a.jne(zero)?;
    a.lea(rax, ptr(rdi + (0x1000 + TABLE_FLAGS)))?;
    a.mov(qword_ptr(rdi), rax)?;
    for i in 0..4i32 {
        a.lea(rax, ptr(rdi + (0x2000 + TABLE_FLAGS + 0x1000 * i)))?;
        a.mov(qword_ptr(rdi + (0x1000 + 8 * i)), rax)?;
    }
    // 2048 2 MiB pages; the last 512 (the MMIO hole) uncached.
    a.lea(rsi, ptr(rdi + 0x2000))?;
    a.mov(eax, PDE_FLAGS as u32)?;
    a.mov(ecx, 1536u32)?;
    a.set_label(&mut ram)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.add(rsi, 8i32)?;
    a.add(rax, 0x20_0000i32)?;
    a.dec(ecx)?;
    a.jne(ram)?;
    a.or(rax, PDE_UNCACHED as i32)?;
    a.mov(ecx, 512u32)?;
    a.set_label(&mut mmio)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.add(rsi, 8i32)?;
    a.add(rax, 0x20_0000i32)?;
    a.dec(ecx)?;
    a.jne(mmio)?;
    a.mov(cr3, rdi)
}

/// Loads a GDT with ring-3 segments and drops to ring 3 with IOPL 3, so the rest of the
/// runner keeps its port I/O but runs natively on a PVM host: PVM emulates a guest's ring-0
/// code instruction by instruction (about 0.8 µs each here) but runs its ring-3 code on the
/// CPU, some 4000 times faster, and that is what lets a script drive a device at the
/// device's own speed. Interrupts stay off (IF = 0) and there is no IDT: a fault in the
/// script is a triple fault, as it was in ring 0. Clobbers `rax`.
///
/// The GDT itself is data: [`emit_gdt`] places it after the code.
fn emit_enter_ring3(g: &mut Asm, gdt: &GdtLabels) -> Result {
    let mut user = g.a.create_label();
    let a = &mut g.a;
    // The pseudo-descriptor's base: the runner is position independent.
    a.lea(rax, ptr(gdt.table))?;
    a.mov(qword_ptr(gdt.base), rax)?;
    a.lea(rax, ptr(gdt.descriptor))?;
    a.lgdt(ptr(rax))?;
    a.mov(rax, rsp)?;
    a.push(USER_DATA_SELECTOR)?;
    a.push(rax)?;
    a.push(USER_RFLAGS)?;
    a.push(USER_CODE_SELECTOR)?;
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;
    a.set_label(&mut user)?;
    g.user_mode = true;
    Ok(())
}

struct GdtLabels {
    table: CodeLabel,
    descriptor: CodeLabel,
    base: CodeLabel,
}

/// Null, the boot contract's ring-0 code (0x08) and data (0x10), then ring-3 data (0x18)
/// and 64-bit code (0x20); and the pseudo-descriptor `lgdt` loads.
fn emit_gdt(g: &mut Asm, l: &mut GdtLabels) -> Result {
    let a = &mut g.a;
    a.set_label(&mut l.table)?;
    a.dq(&[
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        0x00AF_FA00_0000_FFFF,
    ])?;
    a.set_label(&mut l.descriptor)?;
    a.dw(&[5 * 8 - 1])?;
    a.set_label(&mut l.base)?;
    a.dq(&[0])
}

/// Reads size, flags and address of a memory op (layout: op, size, flags,
/// addr), checks them, points `r12` at the next op (`len` bytes on) and
/// leaves the size in `ecx` and the final address in `r14`.
fn fetch_mem(g: &mut Asm, l: &Labels, len: i32) -> Result {
    advance(g, l, len)?;
    g.a.movzx(ecx, byte_ptr(r15 + r11 + 1))?;
    g.a.movzx(eax, byte_ptr(r15 + r11 + 2))?;
    g.a.mov(r14, qword_ptr(r15 + r11 + 3))?;
    g.a.call(l.check_size)?;
    g.a.call(l.resolve)
}

/// Points `r12` at the next op, `len` bytes after this one, which must
/// end within the script.
fn advance(g: &mut Asm, l: &Labels, len: i32) -> Result {
    g.a.lea(r12, ptr(r11 + len))?;
    g.a.call(l.check_end)
}

/// Layout: op, cf8 u32. Prints and sets the base.
fn emit_base_from_bar(g: &mut Asm, l: &Labels) -> Result {
    let mut io = g.a.create_label();
    let mut bar32 = g.a.create_label();
    let mut set = g.a.create_label();
    advance(g, l, 5)?;
    let a = &mut g.a;
    a.mov(r8d, dword_ptr(r15 + r11 + 1))?;
    a.mov(eax, r8d)?;
    a.mov(edx, u32::from(PCI_CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(edx, u32::from(PCI_CONFIG_DATA))?;
    a.in_(eax, dx)?;
    a.mov(ebx, eax)?; // zero-extends: rbx = low half
    a.test(ebx, 1u32)?;
    a.jne(io)?;
    a.mov(ecx, ebx)?;
    a.and(ecx, 6u32)?;
    a.cmp(ecx, 4u32)?;
    a.jne(bar32)?;
    // 64-bit memory BAR: the high half is in the next register.
    a.mov(eax, r8d)?;
    a.add(eax, 4u32)?;
    a.mov(edx, u32::from(PCI_CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(edx, u32::from(PCI_CONFIG_DATA))?;
    a.in_(eax, dx)?;
    a.shl(rax, 32u32)?;
    a.and(ebx, 0xFFFF_FFF0u32)?;
    a.or(rbx, rax)?;
    a.jmp(set)?;
    a.set_label(&mut bar32)?;
    a.and(ebx, 0xFFFF_FFF0u32)?;
    a.jmp(set)?;
    a.set_label(&mut io)?;
    a.and(ebx, 0xFFFF_FFFCu32)?;
    a.set_label(&mut set)?;
    a.mov(r13, rbx)?;
    a.call(l.print_value)
}

fn emit_subroutines(g: &mut Asm, l: &mut Labels, script_len: i32) -> Result {
    // check_end: the op that ends at r12 must end within the script.
    {
        let mut ok = g.a.create_label();
        g.a.set_label(&mut l.check_end)?;
        g.a.cmp(r12, script_len)?;
        g.a.jb(ok)?;
        g.a.je(ok)?;
        g.a.jmp(l.bad_end)?;
        g.a.set_label(&mut ok)?;
        g.a.ret()?;
    }

    // check_size: ecx must be 1, 2, 4 or 8.
    {
        let mut ok = g.a.create_label();
        g.a.set_label(&mut l.check_size)?;
        for s in [1u32, 2, 4, 8] {
            g.a.cmp(ecx, s)?;
            g.a.je(ok)?;
        }
        g.a.jmp(l.bad_op)?;
        g.a.set_label(&mut ok)?;
        g.a.ret()?;
    }

    // resolve: flags in eax (0 or FLAG_REL), address in r14, length in
    // rcx. Adds the base if relative; the range must end at or below
    // 4 GiB. Clobbers rax, rdx.
    {
        let mut abs = g.a.create_label();
        g.a.set_label(&mut l.resolve)?;
        g.a.test(eax, !u32::from(FLAG_REL))?;
        g.a.jne(l.bad_op)?;
        g.a.test(eax, eax)?;
        g.a.je(abs)?;
        g.a.add(r14, r13)?;
        g.a.jb(l.bad_addr)?;
        g.a.set_label(&mut abs)?;
        g.a.mov(rax, r14)?;
        g.a.add(rax, rcx)?;
        g.a.jb(l.bad_addr)?;
        g.a.mov(rdx, SCRIPT_ADDR_LIMIT)?;
        g.a.cmp(rdx, rax)?;
        g.a.jb(l.bad_addr)?;
        g.a.ret()?;
    }

    // load: rbx = the ecx (1/2/4/8) bytes at r14, zero-extended.
    // store: the low ecx bytes of rbx to r14.
    for store in [false, true] {
        let mut w1 = g.a.create_label();
        let mut w2 = g.a.create_label();
        let mut w4 = g.a.create_label();
        let a = &mut g.a;
        a.set_label(if store { &mut l.store } else { &mut l.load })?;
        a.cmp(ecx, 1u32)?;
        a.je(w1)?;
        a.cmp(ecx, 2u32)?;
        a.je(w2)?;
        a.cmp(ecx, 4u32)?;
        a.je(w4)?;
        if store {
            a.mov(qword_ptr(r14), rbx)?;
        } else {
            a.mov(rbx, qword_ptr(r14))?;
        }
        a.ret()?;
        a.set_label(&mut w1)?;
        if store {
            a.mov(byte_ptr(r14), bl)?;
        } else {
            a.movzx(ebx, byte_ptr(r14))?;
        }
        a.ret()?;
        a.set_label(&mut w2)?;
        if store {
            a.mov(word_ptr(r14), bx)?;
        } else {
            a.movzx(ebx, word_ptr(r14))?;
        }
        a.ret()?;
        a.set_label(&mut w4)?;
        if store {
            a.mov(dword_ptr(r14), ebx)?;
        } else {
            a.mov(ebx, dword_ptr(r14))?;
        }
        a.ret()?;
    }

    // print_value: rbx as 16 hex digits and a newline.
    g.a.set_label(&mut l.print_value)?;
    print_rbx_hex(g)?;
    g.a.mov(al, u32::from(b'\n'))?;
    g.call_putc()?;
    g.a.ret()?;

    // Errors.
    g.a.set_label(&mut l.bad_op)?;
    g.print(b"script: bad op ")?;
    g.a.movzx(edi, byte_ptr(r15 + r11))?;
    g.print_hex_edi(2)?;
    g.print(b" at ")?;
    g.a.mov(edi, r11d)?;
    g.print_hex_edi(8)?;
    g.print(b"\n")?;
    g.exit(SCRIPT_BAD_OP_STATUS)?;

    g.a.set_label(&mut l.bad_end)?;
    g.print(b"script: ran off the end at ")?;
    g.a.mov(edi, r11d)?;
    g.print_hex_edi(8)?;
    g.print(b"\n")?;
    g.exit(SCRIPT_BAD_OP_STATUS)?;

    g.a.set_label(&mut l.bad_addr)?;
    g.print(b"script: bad address ")?;
    g.a.mov(rbx, r14)?;
    print_rbx_hex(g)?;
    g.print(b" at ")?;
    g.a.mov(edi, r11d)?;
    g.print_hex_edi(8)?;
    g.print(b"\n")?;
    g.exit(SCRIPT_BAD_ADDR_STATUS)?;

    // rbx holds the last value a wait_eq read.
    g.a.set_label(&mut l.timeout)?;
    g.print(b"script: timed out at ")?;
    g.a.mov(edi, r11d)?;
    g.print_hex_edi(8)?;
    g.print(b", read ")?;
    print_rbx_hex(g)?;
    g.print(b"\n")?;
    g.exit(SCRIPT_TIMEOUT_STATUS)
}

/// Prints rbx as 16 hex digits. Clobbers eax, ecx, edx, esi, edi.
fn print_rbx_hex(g: &mut Asm) -> Result {
    g.a.mov(rdi, rbx)?;
    g.a.shr(rdi, 32u32)?;
    g.print_hex_edi(8)?;
    g.a.mov(edi, ebx)?;
    g.print_hex_edi(8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, Register};

    fn sample() -> Script {
        let mut s = Script::new();
        s.pci_read32(0, 0, 0, 0)
            .pci_read16(0, 3, 1, 0x2)
            .pci_read8(0, 31, 7, 0xFF)
            .pci_write32(1, 2, 3, 0x10, 0xFFFF_FFFF)
            .pci_write16(0, 1, 0, 0x4, 0x0006)
            .pci_write8(0, 1, 0, 0x3C, 0x0B)
            .write(1, 0x20_0000, 0xAB)
            .write(2, 0x20_0001, 0xABCD)
            .write(4, 0xFFFF_FFFC, 0xDEAD_BEEF)
            .write(8, 0x20_0008, u64::MAX)
            .read(8, 0xD000_0000)
            .wait_ne(4, 0x20_0000, 7, 100)
            .fill(0x30_0000, 4096, 0x5A)
            .write_bytes(0x40_0000, b"0123456789abcde")
            .print("marker\n")
            .base_from_bar0(0, 1, 0)
            .base_from_bar(0, 2, 0, 5)
            .set_base(0xC000_0000)
            .write_rel(4, 0x14, 0x0F)
            .read_rel(1, 0x14)
            .wait_ne_rel(2, 0x20, 0xFFFF, 1)
            .wait_eq(2, 0x20_0010, 0x40, 3)
            .fill_rel(0x100, 0, 0)
            .write_bytes_rel(0x200, &[1, 2, 3])
            .outp(1, 0x80, 0xFF)
            .inp(2, 0x1234)
            .exit(3);
        s
    }

    #[test]
    fn encoding_round_trips() {
        let s = sample();
        let bytes = s.to_bytes();
        assert_eq!(Script::decode(&bytes).unwrap(), s);
        assert_eq!(Script::decode(&[]).unwrap(), Script::new());
    }

    #[test]
    fn encoding_is_as_documented() {
        let mut s = Script::new();
        s.write(4, 0x1122_3344, 0xAABB_CCDD);
        assert_eq!(
            s.to_bytes(),
            [0x01, 4, 0, 0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0, 0xDD, 0xCC, 0xBB, 0xAA, 0, 0, 0, 0]
        );
        let mut s = Script::new();
        s.read_rel(1, 0)
            .wait_ne(1, 0, 0, 1)
            .wait_eq(1, 0, 0, 1)
            .fill(0, 1, 0)
            .outp(1, 0, 0)
            .inp(1, 0)
            .print("abc")
            .base_from_bar0(0, 0, 0)
            .set_base(0)
            .exit(0);
        let lens: Vec<usize> = s
            .ops()
            .iter()
            .map(|op| {
                let mut v = Vec::new();
                op.encode(&mut v);
                v.len()
            })
            .collect();
        assert_eq!(lens, [11, 23, 23, 19, 8, 4, 6, 5, 9, 2]);

        let mut s = Script::new();
        s.read_rel(2, 0x10);
        assert_eq!(s.to_bytes()[..3], [0x02, 2, FLAG_REL]);
        let mut s = Script::new();
        s.base_from_bar0(0, 3, 0);
        assert_eq!(s.to_bytes(), [0x08, 0x10, 0x18, 0, 0x80]);
    }

    #[test]
    fn decode_rejects_garbage() {
        let err = |b: &[u8]| Script::decode(b).unwrap_err();
        assert_eq!(err(&[0x00]).reason, "unknown opcode");
        assert_eq!(err(&[0x0A, 1, 0xEE]).offset, 2);
        assert_eq!(err(&[0x02, 3, 0]).reason, "bad access size");
        assert_eq!(err(&[0x02, 4, 2]).reason, "bad flags");
        assert_eq!(err(&[0x06, 8, 0, 0]).reason, "bad port access size");
        assert_eq!(err(&[0x02, 4, 0, 1]).reason, "truncated op");
        assert_eq!(err(&[0x07, 5, 0, b'a']).reason, "truncated text");
    }

    #[test]
    fn pci_helpers() {
        assert_eq!(pci_address(0, 0, 0, 0), 0x8000_0000);
        assert_eq!(pci_address(1, 31, 7, 0xFF), 0x8001_FFFC);
        let mut s = Script::new();
        s.pci_read8(0, 2, 1, 0x0E)
            .pci_write16(0, 2, 1, 0x06, 0xFFFF);
        assert_eq!(
            s.ops(),
            [
                Op::Out {
                    size: 4,
                    port: 0xCF8,
                    value: 0x8000_110C
                },
                Op::In {
                    size: 1,
                    port: 0xCFE
                },
                Op::Out {
                    size: 4,
                    port: 0xCF8,
                    value: 0x8000_1104
                },
                Op::Out {
                    size: 2,
                    port: 0xCFE,
                    value: 0xFFFF
                },
            ]
        );
        assert_eq!(s.value_count(), 1);
    }

    #[test]
    fn write_bytes_splits_by_width() {
        let mut s = Script::new();
        s.write_bytes(0x1000, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        let w: Vec<(u8, u64, u64)> = s
            .ops()
            .iter()
            .map(|op| match *op {
                Op::Write {
                    size, addr, value, ..
                } => (size, addr, value),
                _ => panic!("{op:?}"),
            })
            .collect();
        assert_eq!(
            w,
            [
                (8, 0x1000, 0x0807_0605_0403_0201),
                (4, 0x1008, 0x0C0B_0A09),
                (2, 0x100C, 0x0E0D),
                (1, 0x100E, 0x0F),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn wide_values_are_refused() {
        Script::new().write(1, 0, 0x100);
    }

    #[test]
    #[should_panic(expected = "beyond 4 GiB")]
    fn high_addresses_are_refused() {
        Script::new().read(4, 0xFFFF_FFFE);
    }

    #[test]
    #[should_panic(expected = "access size")]
    fn bad_sizes_are_refused() {
        Script::new().read(3, 0);
    }

    #[test]
    fn parse_values_takes_only_value_lines() {
        let out = format!(
            "{}marker\n{}0123\nscript: bad op 00 at 00000000\n{}",
            value_line(0x81b36),
            value_line(u64::MAX),
            value_line(0),
        );
        assert_eq!(parse_values(&out), [0x81b36, u64::MAX, 0]);
        assert_eq!(value_line(0xAB), "00000000000000ab\n");
        assert!(parse_values("00000000000000AB\n").is_empty());
    }

    fn decode_all(code: &[u8], ip: u64) -> Vec<Instruction> {
        Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn runner_is_position_independent() {
        for s in [Script::new(), sample()] {
            let at_elf = runner_at(&s, DEFAULT_LOAD_ADDR);
            assert_eq!(at_elf, script_runner(&s));
            assert_eq!(at_elf, runner_at(&s, BZIMAGE_ENTRY64));
            assert_eq!(at_elf, runner_at(&s, 0x7654_3000));
        }
    }

    #[test]
    fn runner_embeds_script_and_table_space() {
        let s = sample();
        let code = script_runner(&s);
        let mut bytes = s.to_bytes();
        bytes.extend([OP_EXIT, 0]);
        let tables = code.len() - SCRIPT_PAGE_TABLES_SIZE;
        assert!(code[tables..].iter().all(|&b| b == 0));
        assert_eq!(&code[tables - bytes.len()..tables], bytes);
        // The lea of r15 points at the script.
        let insns = decode_all(&code[..tables - bytes.len()], DEFAULT_LOAD_ADDR);
        let lea = insns
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lea && i.op0_register() == Register::R15)
            .unwrap();
        assert_eq!(lea.memory_base(), Register::RIP);
        assert_eq!(
            lea.ip_rel_memory_address() - DEFAULT_LOAD_ADDR,
            (tables - bytes.len()) as u64
        );
        // The first lea points at the table space, and CR3 gets loaded.
        assert_eq!(insns[0].mnemonic(), Mnemonic::Lea);
        assert_eq!(
            insns[0].ip_rel_memory_address() - DEFAULT_LOAD_ADDR,
            tables as u64
        );
        assert!(insns
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Mov && i.op0_register() == Register::CR3));
        assert!(DEFAULT_LOAD_ADDR + 0x200 + code.len() as u64 <= SCRIPT_FREE_RAM);
    }

    #[test]
    fn runner_code_decodes_and_is_small() {
        let code = script_runner(&Script::new());
        let code_len = code.len() - SCRIPT_PAGE_TABLES_SIZE - 2;
        assert!(code_len < 2048, "{code_len} bytes of code");
        // Asm::finish checked the allow-list; the code before the error
        // messages (data) decodes fully.
        let msgs = code
            .windows(7)
            .position(|w| w == b"script:")
            .expect("error messages");
        let insns = decode_all(&code[..msgs], DEFAULT_LOAD_ADDR);
        assert!(insns.len() > 100);
        assert!(insns.iter().all(|i| !i.is_invalid()));
    }

    #[test]
    #[should_panic(expected = "script too large")]
    fn oversized_scripts_are_refused() {
        let mut s = Script::new();
        s.print(vec![b'x'; 1 << 20]);
        script_runner(&s);
    }
}
