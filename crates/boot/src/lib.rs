//! Boot: everything between "here is a kernel file" and the guest's first instruction.
//!
//! - [`kernel`] recognises bzImage and ELF kernels and loads them (linux-loader does the
//!   copying; we validate headers first so a bad file gets a precise error).
//! - [`initrd`] places the initial ramdisk where the boot protocol allows.
//! - [`params`] writes the zero page (Linux boot protocol) or the PVH start_info.
//! - [`gdt`], [`paging`] build the descriptor table and identity page tables for the entry mode.
//! - [`mptable`] describes CPUs and interrupt routing so the guest brings up every vCPU.
//! - [`acpi`] builds the ACPI tables (CPUs, power-off, the PCI root bridge); [`aml`] encodes
//!   the DSDT's AML.
//!
//! The result is a [`BootCpuState`]: plain numbers the hypervisor crate loads into the boot
//! vCPU. This crate knows nothing about KVM.

#![deny(unsafe_code)]

pub mod acpi;
pub mod aml;
pub mod gdt;
pub mod initrd;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod params;

use std::path::PathBuf;

pub use gdt::Segment;
pub use kernel::{EntryMode, LoadedKernel};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} '{path}': {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel '{path}': {reason}")]
    BadKernel { path: PathBuf, reason: String },
    #[error("cannot load initrd '{path}': {reason}")]
    BadInitrd { path: PathBuf, reason: String },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u32),
    #[error("guest memory is too small for the boot structures: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The register state of the boot vCPU at the guest's first instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootCpuState {
    pub rip: u64,
    pub rsp: u64,
    /// Linux 64-bit boot protocol: address of the zero page.
    pub rsi: u64,
    /// PVH: address of the start_info structure.
    pub rbx: u64,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

use std::path::Path;

use vm_memory::GuestMemoryBackend;
use vmon_memory::MemoryLayout;

use gdt::BootGdt;
use layout::{BOOT_STACK_POINTER, GDT_START, IDT_START};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// What to boot.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub cpus: u32,
    pub cpu_signature: mptable::CpuSignature,
    /// The ACPI power-management registers to describe.
    pub pm: acpi::PmRegisters,
}

/// Loads everything into guest memory and returns the boot vCPU's initial state.
pub fn prepare<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    spec: &BootSpec<'_>,
) -> Result<BootCpuState, BootError> {
    let kernel = kernel::load(mem, spec.kernel)?;
    params::write_cmdline(mem, spec.cmdline, kernel.cmdline_capacity())?;
    let initrd = match spec.initrd {
        Some(path) => Some(initrd::load(
            mem,
            path,
            kernel.setup_header.map(|h| h.initrd_addr_max),
            layout.low_end(),
            kernel.end,
        )?),
        None => None,
    };
    let e820 = layout.e820();
    mptable::write(mem, spec.cpus, spec.cpu_signature)?;
    let rsdp = acpi::write(mem, spec.cpus, spec.pm)?;

    let (gdt, mut state) = match kernel.mode {
        EntryMode::Pvh32 => {
            let start_info = params::write_pvh_start_info(mem, initrd, rsdp, &e820)?;
            let state = BootCpuState {
                rbx: start_info,
                cr0: CR0_PE | CR0_ET,
                cr3: 0,
                cr4: 0,
                efer: 0,
                ..blank_state()
            };
            (BootGdt::protected_mode(), state)
        }
        EntryMode::LinuxBoot64 | EntryMode::Elf64 => {
            let zero_page =
                params::build_zero_page(kernel.setup_header, spec.cmdline.len(), initrd, &e820);
            let rsi = params::write_zero_page(mem, &zero_page)?;
            let cr3 = paging::write_identity_tables(mem)?;
            let state = BootCpuState {
                rsi,
                cr0: CR0_PE | CR0_ET | CR0_PG,
                cr3,
                cr4: CR4_PAE,
                efer: EFER_LME | EFER_LMA,
                ..blank_state()
            };
            (BootGdt::long_mode(), state)
        }
    };
    gdt.write(mem)?;
    state.rip = kernel.entry.0;
    state.code = gdt.segment(BootGdt::CODE_INDEX);
    state.data = gdt.segment(BootGdt::DATA_INDEX);
    state.tss = gdt.segment(BootGdt::TSS_INDEX);
    state.gdt_limit = gdt.limit();
    Ok(state)
}

fn blank_state() -> BootCpuState {
    BootCpuState {
        rip: 0,
        rsp: BOOT_STACK_POINTER,
        rsi: 0,
        rbx: 0,
        code: Segment::default(),
        data: Segment::default(),
        tss: Segment::default(),
        gdt_base: GDT_START,
        gdt_limit: 0,
        idt_base: IDT_START,
        idt_limit: 0,
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
    }
}
