//! The guest programs. Each returns raw code bytes to wrap with
//! [`elf64`](crate::elf64), [`elf64_pvh`](crate::elf64_pvh) or
//! [`bzimage`](crate::bzimage).
//!
//! All 64-bit programs are position independent (only relative branches
//! and RIP-relative data), so the same bytes run at 0x100000 (ELF) and at
//! 0x100200 (bzImage); the unit tests check this. They rely on the 64-bit
//! boot contract described in the crate's README.md (stack at RSP, first GiB
//! identity mapped with 2 MiB pages). Every program ends by writing its
//! status to the exit port 0x510 (or by design never exits), followed by
//! a `cli; hlt` loop as a guard.

use crate::asm::{Asm, Result, COM1, COM1_LSR};
use crate::image::DEFAULT_LOAD_ADDR;
use iced_x86::code_asm::*;

/// Exit status of [`smp_hello`] when the APs did not all check in.
pub const SMP_TIMEOUT_STATUS: u8 = 3;
/// Where [`smp_hello`] copies its real-mode AP trampoline (SIPI vector 0x08).
pub const SMP_TRAMPOLINE_ADDR: u32 = 0x8000;
/// The byte counter every AP increments in [`smp_hello`].
pub const SMP_COUNTER_ADDR: u32 = 0x8800;
/// How many times [`smp_hello`]'s BSP polls the counter (each poll also
/// reads the COM1 LSR, a round trip to the VMM) before giving up: about
/// 4 s on a KVM host where an LSR read takes ~13 us.
pub const SMP_POLL_ITERATIONS: u32 = 300_000;
/// Virtual address at which [`smp_hello`] maps the LAPIC (physical
/// 0xFEE00000), using the last 2 MiB page-directory slot of the first GiB.
pub const LAPIC_VIRT: u64 = 0x3FE0_0000;
/// Physical address [`wild_accesses`] pokes in the 32-bit MMIO hole.
pub const WILD_MMIO_PHYS: u64 = 0xD000_0000;
/// Virtual address at which [`wild_accesses`] maps [`WILD_MMIO_PHYS`].
pub const WILD_MMIO_VIRT: u64 = 0x3FC0_0000;
/// The identity-mapped address [`wild_accesses`] pokes, the last page of
/// the first GiB (beyond RAM for guests with less than 1 GiB).
pub const WILD_HIGH_RAM: u64 = 0x3FFF_F000;
/// `hvm_start_info` magic checked by [`pvh_hello`].
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

const LAPIC_PHYS: u64 = 0xFEE0_0000;
const LAPIC_SVR: i32 = 0xF0;
const LAPIC_ICR_LO: i32 = 0x300;
const LAPIC_ICR_HI: i32 = 0x310;
/// ICR: destination shorthand "all excluding self", level assert.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18 | 1 << 14;
const ICR_INIT: u32 = ICR_ALL_BUT_SELF | 0b101 << 8;
const ICR_STARTUP: u32 = ICR_ALL_BUT_SELF | 0b110 << 8;
const ICR_BUSY: u32 = 1 << 12;

#[cfg(test)]
thread_local! {
    /// Lets the tests assemble the 64-bit programs elsewhere to check that
    /// they are position independent.
    static IP64: std::cell::Cell<u64> = const { std::cell::Cell::new(DEFAULT_LOAD_ADDR) };
}

/// Builds a 64-bit program and assembles it for the ELF load address.
fn build64(f: impl FnOnce(&mut Asm) -> Result) -> Vec<u8> {
    #[cfg(test)]
    let ip = IP64.with(|ip| ip.get());
    #[cfg(not(test))]
    let ip = DEFAULT_LOAD_ADDR;
    build(64, ip, f)
}

fn build(bitness: u32, ip: u64, f: impl FnOnce(&mut Asm) -> Result) -> Vec<u8> {
    let run = || {
        let mut g = Asm::new(bitness)?;
        f(&mut g)?;
        g.finish(ip)
    };
    run().unwrap_or_else(|e| panic!("assembling tiny guest failed: {e}"))
}

/// Writes each byte of `msg` to COM1 (polling LSR.THRE first, bounded),
/// then exits with `status`.
///
/// Host observes: exactly `msg` on the serial console, exit status `status`.
pub fn serial_print_then_exit(msg: &[u8], status: u8) -> Vec<u8> {
    build64(|g| {
        g.print(msg)?;
        g.exit(status)
    })
}

/// Exits with `status` straight away (no output).
pub fn exit_with(status: u8) -> Vec<u8> {
    build64(|g| g.exit(status))
}

/// Requests a reset via the i8042 (`out 0x64, 0xFE`), then halts.
///
/// Host observes: a reset request (the VM stops as vmon defines for
/// i8042 resets); no output.
pub fn i8042_reset() -> Vec<u8> {
    build64(|g| {
        g.a.mov(al, 0xFEu32)?;
        g.a.out(0x64u32, al)?;
        g.halt_forever()
    })
}

/// Does what Linux does on `panic` with `reboot=panic_warm`: stores the BIOS warm-reset
/// flag 0x1234 at physical 0x472, then resets through the i8042.
///
/// Host observes: a reset with the warm flag set, which vmon reports as a guest panic.
pub fn warm_reset() -> Vec<u8> {
    build64(|g| {
        g.a.mov(word_ptr(0x472), 0x1234u32)?;
        g.a.mov(al, 0xFEu32)?;
        g.a.out(0x64u32, al)?;
        g.halt_forever()
    })
}

/// Powers off the way an ACPI guest does: writes sleep type 5 with SLP_EN (0x3400) to the
/// PM1a control register at port 0x604, then halts.
///
/// Host observes: an ACPI power-off; vmon exits 0 without a message.
pub fn acpi_poweroff() -> Vec<u8> {
    build64(|g| {
        g.a.mov(dx, 0x604u32)?;
        g.a.mov(ax, 0x3400u32)?;
        g.a.out(dx, ax)?;
        g.halt_forever()
    })
}

/// Prints `ready\n`, then reads `count` bytes from COM1 (polling LSR.DR) and writes each
/// back, then exits 0.
///
/// Host observes: the bytes it wrote to vmon's stdin, echoed on stdout after `ready`.
pub fn serial_echo(count: u32) -> Vec<u8> {
    build64(|g| {
        g.print(b"ready\n")?;
        g.a.mov(ebx, count)?;
        let mut next = g.a.create_label();
        let mut wait = g.a.create_label();
        let mut done = g.a.create_label();
        g.a.set_label(&mut next)?;
        g.a.cmp(ebx, 0)?;
        g.a.je(done)?;
        g.a.set_label(&mut wait)?;
        g.a.mov(dx, COM1_LSR as u32)?;
        g.a.in_(al, dx)?;
        g.a.and(al, 1)?;
        g.a.je(wait)?;
        g.a.mov(dx, COM1 as u32)?;
        g.a.in_(al, dx)?;
        g.call_putc()?;
        g.a.dec(ebx)?;
        g.a.jmp(next)?;
        g.a.set_label(&mut done)?;
        g.exit(0)
    })
}

/// Loads an IDT with limit 0 and executes `ud2`. The #UD cannot be
/// delivered, nor can the resulting #GP and #DF: a triple fault.
///
/// Host observes: `KVM_EXIT_SHUTDOWN` on real KVM; PVM's emulator may
/// report `KVM_EXIT_INTERNAL_ERROR` instead. No output, no exit-port write.
pub fn triple_fault() -> Vec<u8> {
    build64(|g| {
        let mut idtr = g.a.create_label();
        g.a.lidt(ptr(idtr))?;
        g.a.ud2()?;
        g.halt_forever()?;
        g.a.set_label(&mut idtr)?;
        g.a.db(&[0; 10]) // limit 0, base 0
    })
}

/// Executes `int3` with an empty IDT. Real hardware cannot deliver the #BP (nor the #GP and
/// #DF after it): a triple fault. PVM's instruction emulator cannot emulate `int3` at all and
/// KVM reports an internal error instead. Either way the VMM must end the VM with one line
/// naming the fault.
pub fn int3_without_idt() -> Vec<u8> {
    build64(|g| {
        let mut idtr = g.a.create_label();
        g.a.lidt(ptr(idtr))?;
        // Emitted as data: the allow-list keeps int3 out of ordinary programs.
        g.a.db(&[0xCC])?;
        g.halt_forever()?;
        g.a.set_label(&mut idtr)?;
        g.a.db(&[0; 10])
    })
}

/// Spins forever with `jmp $` (for SIGTERM / timeout tests). No output.
pub fn spin_forever() -> Vec<u8> {
    build64(spin)
}

/// Prints `msg` to COM1, then spins forever with `jmp $`.
pub fn print_then_spin(msg: &[u8]) -> Vec<u8> {
    build64(|g| {
        g.print(msg)?;
        spin(g)
    })
}

/// Prints 0, 1, 2, ... one number per line on COM1, forever, with `delay` COM1 LSR reads
/// between lines (each a trip to the VMM, so the pace is roughly the same everywhere).
///
/// Host observes: a counter that advances while the guest runs and stops while it is
/// paused, continuing with the next number after a resume.
pub fn count_forever(delay: u32) -> Vec<u8> {
    build64(|g| {
        let mut again = g.a.create_label();
        g.a.xor(edi, edi)?;
        g.a.set_label(&mut again)?;
        // print_dec reads edi and keeps it; putc and io_delay use eax, ecx, edx.
        g.print_dec_edi()?;
        g.print(b"\n")?;
        g.io_delay(delay)?;
        g.a.inc(edi)?;
        g.a.jmp(again)
    })
}

/// Writes one non-zero byte to every 4 KiB page from `start` to `end` (guest-physical,
/// identity-mapped: below 1 GiB), prints `touched`, then counts like [`count_forever`].
///
/// Host observes: the guest's memory in that range resident (snapshot and clone
/// benchmarks), then a counter.
pub fn touch_then_count(start: u64, end: u64, delay: u32) -> Vec<u8> {
    build64(|g| {
        let mut touch = g.a.create_label();
        let mut again = g.a.create_label();
        g.a.mov(rbx, start)?;
        g.a.mov(rcx, end)?;
        g.a.set_label(&mut touch)?;
        g.a.mov(byte_ptr(rbx), 0x5Au32)?;
        g.a.add(rbx, 4096i32)?;
        g.a.cmp(rbx, rcx)?;
        g.a.jb(touch)?;
        g.print(b"touched\n")?;
        g.a.xor(edi, edi)?;
        g.a.set_label(&mut again)?;
        g.print_dec_edi()?;
        g.print(b"\n")?;
        g.io_delay(delay)?;
        g.a.inc(edi)?;
        g.a.jmp(again)
    })
}

fn spin(g: &mut Asm) -> Result {
    let mut l = g.a.create_label();
    g.a.set_label(&mut l)?;
    g.a.jmp(l)
}

/// Access width of a port read in [`Probe::In`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Byte,
    Word,
    Dword,
}

impl Width {
    /// Hex digits printed for a value of this width.
    pub fn digits(self) -> usize {
        match self {
            Width::Byte => 2,
            Width::Word => 4,
            Width::Dword => 8,
        }
    }
}

/// One read done by [`port_probe_with`]. The guest prints one line per
/// probe: `{label}={value}`, where `label` is [`Probe::label`] and the
/// value is lowercase hex, zero-padded to the access width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `in` of `width` from `port`. Label: `{port:04x}`, e.g. `0080=ff`.
    In { port: u16, width: Width },
    /// `out index_port, index` then a byte `in` from `data_port` (e.g. the
    /// CMOS/RTC at 0x70/0x71). Label: `{data_port:04x}[{index:02x}]`,
    /// e.g. `0071[09]=26`.
    Indexed {
        index_port: u16,
        data_port: u16,
        index: u8,
    },
    /// PCI configuration mechanism #1: dword `out 0xCF8, address`, then
    /// dword `in` from 0xCFC. Label: `pci[{address:08x}]`, e.g.
    /// `pci[80000000]=ffffffff` when there is no PCI host bridge.
    Pci { address: u32 },
}

impl Probe {
    /// The text before the `=` of this probe's output line.
    pub fn label(&self) -> String {
        match *self {
            Probe::In { port, .. } => format!("{port:04x}"),
            Probe::Indexed {
                data_port, index, ..
            } => format!("{data_port:04x}[{index:02x}]"),
            Probe::Pci { address } => format!("pci[{address:08x}]"),
        }
    }

    /// Width of the value printed after the `=`.
    pub fn width(&self) -> Width {
        match *self {
            Probe::In { width, .. } => width,
            Probe::Indexed { .. } => Width::Byte,
            Probe::Pci { .. } => Width::Dword,
        }
    }
}

const fn rtc(index: u8) -> Probe {
    Probe::Indexed {
        index_port: 0x70,
        data_port: 0x71,
        index,
    }
}

const fn in8(port: u16) -> Probe {
    Probe::In {
        port,
        width: Width::Byte,
    }
}

/// The probes [`port_probe`] runs, in output order.
pub const DEFAULT_PROBES: &[Probe] = &[
    in8(0x80),  // POST / delay port
    in8(0x2FD), // COM2 LSR
    in8(0x3E8), // COM3
    in8(0x2E8), // COM4
    in8(0x3FD), // COM1 LSR: THRE|TEMT (0x60) on an idle 16550
    in8(0x64),  // i8042 status
    in8(0x61),  // NMI status / PC speaker (KVM's in-kernel PIT)
    Probe::In {
        port: 0x1234,
        width: Width::Word,
    },
    Probe::In {
        port: 0xC000,
        width: Width::Dword,
    },
    Probe::Pci {
        address: 0x8000_0000, // bus 0, device 0, function 0, vendor/device ID
    },
    rtc(0x00), // seconds
    rtc(0x09), // year
    rtc(0x32), // century
    rtc(0x0A), // status A
    rtc(0x0B), // status B
    rtc(0x0D), // status D (bit 7: valid RAM and time)
];

/// Reads [`DEFAULT_PROBES`] and prints one `label=value` line each to
/// COM1, then exits 0. See [`port_probe_with`].
pub fn port_probe() -> Vec<u8> {
    port_probe_with(DEFAULT_PROBES)
}

/// Runs `probes` in order, printing `{probe.label()}={value:0N x}\n` for
/// each (N = 2, 4 or 8 hex digits by width), then exits 0.
///
/// Host observes: one line per probe, e.g. `0080=ff`, `1234=ffff`,
/// `pci[80000000]=ffffffff`, `0071[09]=26`; unknown ports read all-ones.
pub fn port_probe_with(probes: &[Probe]) -> Vec<u8> {
    build64(|g| {
        for p in probes {
            match *p {
                Probe::In { port, width } => {
                    g.a.mov(edx, port as u32)?;
                    match width {
                        Width::Byte => g.a.in_(al, dx)?,
                        Width::Word => g.a.in_(ax, dx)?,
                        Width::Dword => g.a.in_(eax, dx)?,
                    }
                }
                Probe::Indexed {
                    index_port,
                    data_port,
                    index,
                } => {
                    g.a.mov(edx, index_port as u32)?;
                    g.a.mov(al, index as u32)?;
                    g.a.out(dx, al)?;
                    g.a.mov(edx, data_port as u32)?;
                    g.a.in_(al, dx)?;
                }
                Probe::Pci { address } => {
                    g.a.mov(edx, 0xCF8u32)?;
                    g.a.mov(eax, address)?;
                    g.a.out(dx, eax)?;
                    g.a.mov(edx, 0xCFCu32)?;
                    g.a.in_(eax, dx)?;
                }
            }
            // Keep only the bits that were read.
            match p.width() {
                Width::Byte => g.a.movzx(ebx, al)?,
                Width::Word => g.a.movzx(ebx, ax)?,
                Width::Dword => g.a.mov(ebx, eax)?,
            }
            g.print(format!("{}=", p.label()).as_bytes())?;
            g.a.mov(edi, ebx)?;
            g.print_hex_edi(p.width().digits() as u32)?;
            g.print(b"\n")?;
        }
        g.exit(0)
    })
}

/// Points page-directory entry `pd_index` of the first GiB (virtual
/// `pd_index * 2 MiB`) at the 2 MiB-aligned physical address `phys`,
/// uncached, then flushes the TLB by reloading CR3. Walks the tables from
/// CR3 (PML4[0] -> PDPT[0] -> PD), so it only assumes the boot contract's
/// 2 MiB identity map. Clobbers `rax`, `rcx`, `rdx`.
fn map_2m(g: &mut Asm, pd_index: u32, phys: u64) -> Result {
    assert!(pd_index < 512 && phys % (2 << 20) == 0);
    // Present | writable | write-through | cache-disable | 2 MiB page.
    const FLAGS: u64 = 0x01 | 0x02 | 0x08 | 0x10 | 0x80;
    let a = &mut g.a;
    a.mov(rcx, 0x000F_FFFF_FFFF_F000u64)?;
    a.mov(rax, cr3)?;
    a.and(rax, rcx)?;
    a.mov(rax, qword_ptr(rax))?; // PML4[0]
    a.and(rax, rcx)?;
    a.mov(rax, qword_ptr(rax))?; // PDPT[0]
    a.and(rax, rcx)?;
    a.mov(rdx, phys | FLAGS)?;
    a.mov(qword_ptr(rax + pd_index as i32 * 8), rdx)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)
}

/// Does odd things a guest may do and the VMM must survive, then prints
/// `alive\n` and exits 0:
/// - MMIO reads and writes of 1, 2, 4 and 8 bytes (including a
///   read-modify-write and a page-straddling dword) to unbacked guest
///   physical memory at [`WILD_MMIO_PHYS`] (mapped at [`WILD_MMIO_VIRT`])
///   and at [`WILD_HIGH_RAM`] (RAM only if the guest has >= 1 GiB);
/// - 1/2/4-byte port reads and writes to unknown ports, including ones
///   that run past port 0xFFFF (it avoids the PIC, PIT, i8042, RTC, PCI
///   config/reset and exit ports, and 0x92);
/// - garbage (1, 2 and 4-byte) to COM1 registers 0x3F9..=0x3FF, after
///   which it restores LCR = 0x03 (DLAB off), IER = 0 and MCR = 0x08 (no
///   loopback) so that the final message gets out.
///
/// Host observes: `alive\n`, exit status 0, and no VMM crash.
pub fn wild_accesses() -> Vec<u8> {
    build64(|g| {
        map_2m(g, (WILD_MMIO_VIRT >> 21) as u32, WILD_MMIO_PHYS)?;
        // A dword crossing a 4 KiB boundary (KVM splits it in two): inside
        // the MMIO window, and just below WILD_HIGH_RAM, as everything at
        // or above 0x4000_0000 is unmapped.
        for (base, straddle) in [(WILD_MMIO_VIRT, 0xFFE), (WILD_HIGH_RAM, -2)] {
            let a = &mut g.a;
            a.mov(ebx, base as u32)?;
            a.mov(al, byte_ptr(rbx))?;
            a.mov(ax, word_ptr(rbx + 0x2))?;
            a.mov(eax, dword_ptr(rbx + 0x4))?;
            a.mov(rax, qword_ptr(rbx + 0x8))?;
            a.mov(byte_ptr(rbx + 0x10), 0x5Au32)?;
            a.mov(word_ptr(rbx + 0x12), 0xBEEFu32)?;
            a.mov(dword_ptr(rbx + 0x14), 0xDEAD_BEEFu32)?;
            a.mov(rax, -1i64)?;
            a.mov(qword_ptr(rbx + 0x18), rax)?;
            a.or(dword_ptr(rbx + 0x20), 0x1u32)?;
            a.inc(qword_ptr(rbx + 0xFF8))?;
            a.mov(eax, dword_ptr(rbx + straddle))?;
            a.mov(dword_ptr(rbx + straddle), eax)?;
        }

        // (port, width in bytes, write?): unknown ports, values 0xA5..
        const PORTS: &[(u16, u8, bool)] = &[
            (0x0000, 1, false),
            (0x02F8, 1, true),
            (0x02F9, 2, false),
            (0x1234, 2, true),
            (0x8888, 4, true),
            (0x8888, 4, false),
            (0xC000, 1, true),
            (0xFFFC, 4, false),
            (0xFFFE, 4, true),
            (0xFFFF, 2, false),
            (0xFFFF, 2, true),
            (0xFFFF, 1, true),
        ];
        for &(port, width, write) in PORTS {
            io(g, port, width, write, 0xA5A5_A5A5)?;
        }

        // Garbage to the UART, all widths, then put it back in order.
        const UART: &[(u16, u8, u32)] = &[
            (COM1 + 3, 1, 0x9F), // LCR: DLAB on, odd format
            (COM1 + 1, 1, 0xFF), // DLM
            (COM1 + 3, 1, 0x1B), // LCR: DLAB off
            (COM1 + 1, 1, 0x0F), // IER: all interrupts
            (COM1 + 2, 1, 0xC7), // FCR
            (COM1 + 4, 1, 0x1F), // MCR: loopback on
            (COM1 + 5, 1, 0xFF), // LSR (read-only)
            (COM1 + 6, 1, 0xFF), // MSR (read-only)
            (COM1 + 7, 1, 0x42), // scratch
            (COM1 + 1, 2, 0xFFFF),
            (COM1 + 4, 4, 0xFFFF_FFFF),
            (COM1 + 6, 2, 0x1234),
        ];
        for &(port, width, value) in UART {
            io(g, port, width, true, value)?;
        }
        for (port, width) in [(COM1 + 1, 2), (COM1 + 4, 4), (COM1 + 7, 1), (COM1 + 2, 1)] {
            io(g, port, width, false, 0)?;
        }
        for (port, value) in [(COM1 + 3, 0x03), (COM1 + 1, 0x00), (COM1 + 4, 0x08)] {
            io(g, port, 1, true, value)?;
        }

        g.print(b"alive\n")?;
        g.exit(0)
    })
}

/// One port access of `width` bytes; writes send `value`.
fn io(g: &mut Asm, port: u16, width: u8, write: bool, value: u32) -> Result {
    let a = &mut g.a;
    a.mov(edx, port as u32)?;
    if write {
        a.mov(eax, value)?;
    }
    match (width, write) {
        (1, false) => a.in_(al, dx),
        (2, false) => a.in_(ax, dx),
        (4, false) => a.in_(eax, dx),
        (1, true) => a.out(dx, al),
        (2, true) => a.out(dx, ax),
        (4, true) => a.out(dx, eax),
        _ => unreachable!("port width {width}"),
    }
}

/// The AP side of [`smp_hello`]: 16-bit real-mode code, entered at
/// CS:IP = 0x0800:0000 after the SIPI. Increments the byte at
/// [`SMP_COUNTER_ADDR`] with a `lock inc`, then halts forever.
/// Position independent (absolute data address, relative jumps).
pub fn smp_trampoline() -> Vec<u8> {
    build(16, 0, |g| {
        let a = &mut g.a;
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(bx, SMP_COUNTER_ADDR)?;
        a.lock().inc(byte_ptr(bx))?;
        g.halt_forever()
    })
}

/// Boots the other `cpus - 1` vCPUs and counts them.
///
/// The BSP zeroes the byte counter at [`SMP_COUNTER_ADDR`], copies
/// [`smp_trampoline`] to [`SMP_TRAMPOLINE_ADDR`], maps the LAPIC at
/// [`LAPIC_VIRT`], software-enables it (SVR = 0x1FF) and sends INIT, then
/// two SIPIs with vector 0x08, all with the "all excluding self" shorthand
/// (short LSR-read delays in between). It then polls the counter (at most
/// [`SMP_POLL_ITERATIONS`] times) until it reaches at least `cpus - 1`
/// (the shorthand wakes every AP, so a VM with more vCPUs than `cpus`
/// may report more).
///
/// Host observes: `cpus=N\n` (N = 1 + APs that checked in, in decimal)
/// and exit status 0; on timeout the same line with the smaller N and
/// exit status [`SMP_TIMEOUT_STATUS`]. The APs stay halted with
/// interrupts off. With `cpus == 1` no IPI is sent: it prints `cpus=1`.
pub fn smp_hello(cpus: u8) -> Vec<u8> {
    assert!(cpus >= 1, "need at least the BSP");
    build64(|g| {
        if cpus == 1 {
            g.print(b"cpus=1\n")?;
            return g.exit(0);
        }
        let tramp = smp_trampoline();
        let mut tramp_data = g.a.create_label();
        let mut copy = g.a.create_label();
        let mut wait = g.a.create_label();
        let mut done = g.a.create_label();

        // Zero the counter, copy the trampoline below 1 MiB.
        g.a.mov(ebx, SMP_COUNTER_ADDR)?;
        g.a.mov(byte_ptr(rbx), 0u32)?;
        g.a.lea(rsi, ptr(tramp_data))?;
        g.a.mov(edi, SMP_TRAMPOLINE_ADDR)?;
        g.a.mov(ecx, tramp.len() as u32)?;
        g.a.set_label(&mut copy)?;
        g.a.mov(al, byte_ptr(rsi))?;
        g.a.mov(byte_ptr(rdi), al)?;
        g.a.inc(rsi)?;
        g.a.inc(rdi)?;
        g.a.dec(ecx)?;
        g.a.jne(copy)?;

        // LAPIC: enable, INIT, SIPI, SIPI.
        map_2m(g, (LAPIC_VIRT >> 21) as u32, LAPIC_PHYS)?;
        g.a.mov(r12d, LAPIC_VIRT as u32)?;
        g.a.mov(dword_ptr(r12 + LAPIC_SVR), 0x1FFu32)?;
        let vector = SMP_TRAMPOLINE_ADDR >> 12;
        for (icr, delay) in [
            (ICR_INIT, 1000),
            (ICR_STARTUP | vector, 200),
            (ICR_STARTUP | vector, 200),
        ] {
            send_ipi(g, icr)?;
            g.io_delay(delay)?;
        }

        // Wait for the APs; each poll is also a delay (an LSR read).
        g.a.mov(r13d, SMP_POLL_ITERATIONS)?;
        g.a.mov(edx, COM1_LSR as u32)?;
        g.a.set_label(&mut wait)?;
        g.a.in_(al, dx)?;
        g.a.movzx(eax, byte_ptr(rbx))?;
        g.a.cmp(eax, (cpus - 1) as u32)?;
        g.a.jae(done)?;
        g.a.dec(r13d)?;
        g.a.jne(wait)?;
        print_cpus(g)?;
        g.exit(SMP_TIMEOUT_STATUS)?;

        g.a.set_label(&mut done)?;
        print_cpus(g)?;
        g.exit(0)?;

        g.a.set_label(&mut tramp_data)?;
        g.a.db(&tramp)
    })
}

/// Writes `icr` to the ICR (destination high half 0) and waits, bounded,
/// for the delivery-status bit to clear. Needs the LAPIC base in `r12`.
fn send_ipi(g: &mut Asm, icr: u32) -> Result {
    let mut poll = g.a.create_label();
    let mut sent = g.a.create_label();
    let a = &mut g.a;
    a.mov(dword_ptr(r12 + LAPIC_ICR_HI), 0u32)?;
    a.mov(dword_ptr(r12 + LAPIC_ICR_LO), icr)?;
    a.mov(ecx, 1000u32)?;
    a.set_label(&mut poll)?;
    a.mov(eax, dword_ptr(r12 + LAPIC_ICR_LO))?;
    a.test(eax, ICR_BUSY)?;
    a.je(sent)?;
    a.dec(ecx)?;
    a.jne(poll)?;
    a.set_label(&mut sent)?;
    Ok(())
}

/// Prints `cpus={1 + counter}\n`; counter address in `rbx`.
fn print_cpus(g: &mut Asm) -> Result {
    g.print(b"cpus=")?;
    g.a.movzx(edi, byte_ptr(rbx))?;
    g.a.inc(edi)?;
    g.print_dec_edi()?;
    g.print(b"\n")
}

/// 32-bit PVH entry code (paging off, EBX = hvm_start_info): checks the
/// magic [`HVM_START_MAGIC`] at `[ebx]`, prints `pvh ok\n` and exits 0,
/// or prints `pvh bad\n` and exits 1.
///
/// The PVH contract gives no stack, so it uses 256 bytes at the end of its
/// own image, by absolute address: it is assembled for
/// [`DEFAULT_LOAD_ADDR`], so wrap it as
/// `elf64_pvh(&pvh_hello(), DEFAULT_LOAD_ADDR)` (or see [`pvh_hello_at`]).
pub fn pvh_hello() -> Vec<u8> {
    pvh_hello_at(DEFAULT_LOAD_ADDR as u32)
}

/// [`pvh_hello`] assembled to be loaded and entered at `load_addr`.
pub fn pvh_hello_at(load_addr: u32) -> Vec<u8> {
    pvh_program(load_addr, |g| {
        let mut bad = g.a.create_label();
        g.a.cmp(dword_ptr(ebx), HVM_START_MAGIC)?;
        g.a.jne(bad)?;
        g.print(b"pvh ok\n")?;
        g.exit(0)?;
        g.a.set_label(&mut bad)?;
        g.print(b"pvh bad\n")?;
        g.exit(1)
    })
}

/// 32-bit PVH program for load address 0x100000 that prints `msg` to COM1 and then halts
/// forever without touching the exit port: a guest that is up and idle, for measuring a
/// VMM's start-up time and idle memory. Runs unchanged under any VMM with PVH boot.
pub fn pvh_print_then_halt(msg: &[u8]) -> Vec<u8> {
    pvh_program(DEFAULT_LOAD_ADDR as u32, |g| {
        g.print(msg)?;
        g.halt_forever()
    })
}

/// Assembles a 32-bit PVH program with a 256-byte stack at the end of its own image (PVH
/// provides none).
fn pvh_program(load_addr: u32, body: impl Fn(&mut Asm) -> Result) -> Vec<u8> {
    let assemble = |stack_top: u32, stack_size: usize| {
        build(32, load_addr.into(), |g| {
            g.a.mov(esp, stack_top)?;
            body(g)?;
            g.finish_subroutines()?;
            g.a.db(&vec![0; stack_size]) // the stack, growing down from the end
        })
    };
    // `mov esp, imm32` has a fixed size, so a first pass gives the length;
    // the second one pads the stack so that its top is 16-byte aligned.
    let first = assemble(0, 256).len();
    let stack_size = 256 + (16 - first % 16) % 16;
    let len = first - 256 + stack_size;
    let code = assemble(load_addr + len as u32, stack_size);
    assert_eq!(code.len(), len);
    code
}

/// For bzImage boots: inspects the zero page at RSI and prints
///
/// ```text
/// hdrs ok
/// cmdline=<the command line, up to 256 bytes>
/// e820=<e820_entries as 2 hex digits>
/// ```
///
/// then exits 0. If the "HdrS" magic at zero page offset 0x202 is missing
/// it prints `hdrs bad\n` and exits 1. A command line pointer that is
/// zero prints an empty command line; one outside the identity-mapped
/// first GiB (including a non-zero `ext_cmd_line_ptr`) prints `cmdline=?`.
pub fn bzimage_check_boot_params() -> Vec<u8> {
    build64(|g| {
        let mut bad = g.a.create_label();
        let mut bad_ptr = g.a.create_label();
        let mut next = g.a.create_label();
        let mut eol = g.a.create_label();
        g.a.mov(rbx, rsi)?;
        g.a.cmp(dword_ptr(rbx + 0x202), u32::from_le_bytes(*b"HdrS"))?;
        g.a.jne(bad)?;
        g.print(b"hdrs ok\ncmdline=")?;

        g.a.cmp(dword_ptr(rbx + 0xC8), 0u32)?; // ext_cmd_line_ptr
        g.a.jne(bad_ptr)?;
        g.a.mov(ebp, dword_ptr(rbx + 0x228))?; // cmd_line_ptr
        g.a.cmp(ebp, 0x4000_0000 - 256u32)?;
        g.a.jae(bad_ptr)?;
        g.a.test(ebp, ebp)?;
        g.a.je(eol)?;
        g.a.mov(r12d, 256u32)?;
        g.a.set_label(&mut next)?;
        g.a.movzx(eax, byte_ptr(rbp))?;
        g.a.test(eax, eax)?;
        g.a.je(eol)?;
        g.call_putc()?;
        g.a.inc(rbp)?;
        g.a.dec(r12d)?;
        g.a.jne(next)?;
        g.a.jmp(eol)?;
        g.a.set_label(&mut bad_ptr)?;
        g.print(b"?")?;
        g.a.set_label(&mut eol)?;
        g.print(b"\ne820=")?;
        g.a.movzx(edi, byte_ptr(rbx + 0x1E8))?;
        g.print_hex_edi(2)?;
        g.print(b"\n")?;
        g.exit(0)?;

        g.a.set_label(&mut bad)?;
        g.print(b"hdrs bad\n")?;
        g.exit(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BZIMAGE_ENTRY64;
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    fn decode(bitness: u32, ip: u64, code: &[u8], n: usize) -> Vec<Instruction> {
        let d = Decoder::with_ip(bitness, code, ip, DecoderOptions::NONE);
        let v: Vec<Instruction> = d.into_iter().take(n).collect();
        assert!(v.iter().all(|i| !i.is_invalid()), "invalid code: {v:?}");
        v
    }

    fn first64(code: &[u8], n: usize) -> Vec<Instruction> {
        decode(64, DEFAULT_LOAD_ADDR, code, n)
    }

    fn mnemonics(v: &[Instruction]) -> Vec<Mnemonic> {
        v.iter().map(|i| i.mnemonic()).collect()
    }

    /// Every 64-bit program, with the arguments used by the tests.
    fn all64() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("serial_print_then_exit", serial_print_then_exit(b"hi\n", 5)),
            (
                "serial_print_then_exit(long)",
                serial_print_then_exit(b"a longer message\n", 5),
            ),
            ("exit_with", exit_with(7)),
            ("i8042_reset", i8042_reset()),
            ("triple_fault", triple_fault()),
            ("spin_forever", spin_forever()),
            ("print_then_spin", print_then_spin(b"waiting\n")),
            ("port_probe", port_probe()),
            ("wild_accesses", wild_accesses()),
            ("smp_hello(1)", smp_hello(1)),
            ("smp_hello(4)", smp_hello(4)),
            ("bzimage_check_boot_params", bzimage_check_boot_params()),
        ]
    }

    #[test]
    fn programs_64_are_position_independent() {
        let at_elf = all64();
        IP64.with(|ip| ip.set(BZIMAGE_ENTRY64));
        let at_bz = all64();
        IP64.with(|ip| ip.set(0x7654_3000));
        let elsewhere = all64();
        for ((name, a), ((_, b), (_, c))) in at_elf.iter().zip(at_bz.iter().zip(&elsewhere)) {
            assert_eq!(a, b, "{name} depends on its load address");
            assert_eq!(a, c, "{name} depends on its load address");
        }
    }

    #[test]
    fn programs_are_small() {
        for (name, code) in all64() {
            assert!(code.len() < 4096, "{name}: {} bytes", code.len());
        }
    }

    #[test]
    fn exit_with_bytes() {
        // mov al, 7; mov edx, 0x510; out dx, al; 1: cli; hlt; jmp 1b
        let expected = [
            0xB0, 7, 0xBA, 0x10, 0x05, 0, 0, 0xEE, 0xFA, 0xF4, 0xEB, 0xFC,
        ];
        assert_eq!(exit_with(7), expected);
    }

    #[test]
    fn spin_forever_is_jmp_self() {
        assert_eq!(spin_forever(), [0xEB, 0xFE]);
        let code = print_then_spin(b"x");
        let v = first64(&code, 3);
        assert_eq!(
            mnemonics(&v),
            [Mnemonic::Mov, Mnemonic::Call, Mnemonic::Jmp]
        );
        assert_eq!(v[2].near_branch_target(), v[2].ip());
    }

    #[test]
    fn serial_print_then_exit_short_and_long() {
        let code = serial_print_then_exit(b"hi\n", 5);
        let v = first64(&code, 2);
        assert_eq!(v[0].code(), iced_x86::Code::Mov_r8_imm8);
        assert_eq!(v[0].immediate8(), b'h');
        assert_eq!(v[1].mnemonic(), Mnemonic::Call);
        // The exit sequence follows the three characters.
        let v = first64(&code, 9);
        assert_eq!(v[6].immediate8(), 5);
        assert_eq!(mnemonics(&v[7..]), [Mnemonic::Mov, Mnemonic::Out]);

        // Long messages are data, addressed RIP-relative.
        let msg = b"a longer message\n";
        let code = serial_print_then_exit(msg, 5);
        let v = first64(&code, 1);
        assert_eq!(v[0].mnemonic(), Mnemonic::Lea);
        assert_eq!(v[0].memory_base(), Register::RIP);
        let at = (v[0].ip_rel_memory_address() - DEFAULT_LOAD_ADDR) as usize;
        assert_eq!(&code[at..at + msg.len()], msg);
    }

    #[test]
    fn i8042_reset_writes_fe_to_port_64() {
        let v = first64(&i8042_reset(), 4);
        assert_eq!(v[0].immediate8(), 0xFE);
        assert_eq!(v[1].mnemonic(), Mnemonic::Out);
        assert_eq!(v[1].immediate8(), 0x64);
        assert_eq!(mnemonics(&v[2..]), [Mnemonic::Cli, Mnemonic::Hlt]);
    }

    #[test]
    fn triple_fault_loads_empty_idt() {
        let code = triple_fault();
        let v = first64(&code, 2);
        assert_eq!(mnemonics(&v), [Mnemonic::Lidt, Mnemonic::Ud2]);
        assert_eq!(v[0].memory_base(), Register::RIP);
        let at = (v[0].ip_rel_memory_address() - DEFAULT_LOAD_ADDR) as usize;
        assert_eq!(&code[at..], [0; 10]);
    }

    #[test]
    fn probe_labels() {
        let labels: Vec<String> = DEFAULT_PROBES.iter().map(Probe::label).collect();
        for l in [
            "0080",
            "02fd",
            "1234",
            "pci[80000000]",
            "0071[09]",
            "0071[32]",
        ] {
            assert!(labels.iter().any(|x| x == l), "{l} missing from {labels:?}");
        }
        assert_eq!(Probe::Pci { address: 1 }.width().digits(), 8);
    }

    #[test]
    fn port_probe_reads_first_port() {
        let v = first64(&port_probe(), 3);
        assert_eq!(v[0].immediate32(), 0x80);
        assert_eq!(v[1].mnemonic(), Mnemonic::In);
        assert_eq!(v[2].mnemonic(), Mnemonic::Movzx);
        let custom = port_probe_with(&[Probe::Pci {
            address: 0x8000_0800,
        }]);
        let v = first64(&custom, 3);
        assert_eq!(v[1].immediate32(), 0x8000_0800);
        assert_eq!(v[2].op1_register(), Register::EAX);
    }

    #[test]
    fn wild_accesses_remaps_a_pd_slot() {
        let v = first64(&wild_accesses(), 11);
        assert_eq!(v[1].op1_register(), Register::CR3);
        assert_eq!(v[7].immediate64(), WILD_MMIO_PHYS | 0x9B);
        // PD entry 510 maps virtual 0x3FC0_0000.
        assert_eq!(v[8].memory_displacement64(), 510 * 8);
        assert_eq!(v[10].op0_register(), Register::CR3);
    }

    #[test]
    fn smp_trampoline_is_real_mode() {
        let code = smp_trampoline();
        let v = decode(16, 0, &code, 8);
        use Mnemonic::*;
        assert_eq!(mnemonics(&v), [Cli, Xor, Mov, Mov, Inc, Cli, Hlt, Jmp]);
        assert_eq!(v[2].op0_register(), Register::DS);
        assert_eq!(v[3].immediate16() as u32, SMP_COUNTER_ADDR);
        assert!(v[4].has_lock_prefix());
        assert_eq!(v[4].memory_base(), Register::BX);
        assert_eq!(v[7].near_branch_target(), v[5].ip());
        assert_eq!(code.len(), v[7].next_ip() as usize);
    }

    #[test]
    fn smp_hello_embeds_trampoline_and_uses_lapic() {
        let code = smp_hello(4);
        let v = first64(&code, 3);
        assert_eq!(v[0].immediate32(), SMP_COUNTER_ADDR);
        assert_eq!(v[2].mnemonic(), Mnemonic::Lea);
        let at = (v[2].ip_rel_memory_address() - DEFAULT_LOAD_ADDR) as usize;
        let tramp = smp_trampoline();
        assert_eq!(&code[at..at + tramp.len()], tramp);
        // INIT and STARTUP with vector 0x08 are in there as immediates.
        let all = Decoder::with_ip(64, &code[..at], DEFAULT_LOAD_ADDR, DecoderOptions::NONE);
        let imms: Vec<u64> = all
            .into_iter()
            .filter(|i| i.op_count() == 2 && i.op1_kind() == OpKind::Immediate32)
            .map(|i| i.immediate32() as u64)
            .collect();
        assert!(imms.contains(&0x000C_4500));
        assert!(imms.contains(&0x000C_4608));
        assert!(imms.contains(&(LAPIC_VIRT)));

        let v = first64(&smp_hello(1), 2);
        assert_eq!(v[0].immediate8(), b'c');
    }

    #[test]
    fn pvh_hello_is_32_bit_with_own_stack() {
        let code = pvh_hello();
        let v = decode(32, DEFAULT_LOAD_ADDR, &code, 3);
        assert_eq!(v[0].op0_register(), Register::ESP);
        let stack_top = v[0].immediate32() as u64;
        assert_eq!(stack_top, DEFAULT_LOAD_ADDR + code.len() as u64);
        assert_eq!(stack_top % 16, 0);
        assert!(code[code.len() - 256..].iter().all(|&b| b == 0));
        assert_eq!(v[1].mnemonic(), Mnemonic::Cmp);
        assert_eq!(v[1].memory_base(), Register::EBX);
        assert_eq!(v[1].immediate32(), HVM_START_MAGIC);
        assert_eq!(v[2].mnemonic(), Mnemonic::Jne);

        let elsewhere = pvh_hello_at(0x20_0000);
        let v = decode(32, 0x20_0000, &elsewhere, 1);
        assert_eq!(v[0].immediate32() as usize, 0x20_0000 + elsewhere.len());
    }

    #[test]
    fn bzimage_check_reads_zero_page() {
        let v = first64(&bzimage_check_boot_params(), 2);
        assert_eq!(v[0].op1_register(), Register::RSI);
        assert_eq!(v[1].memory_base(), Register::RBX);
        assert_eq!(v[1].memory_displacement64(), 0x202);
        assert_eq!(v[1].immediate32(), u32::from_le_bytes(*b"HdrS"));
    }
}
