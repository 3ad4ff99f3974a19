//! Fixed guest-physical addresses of the boot structures (all in the first 640 KiB).

/// GDT, then a zero-length IDT right after it.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
/// PVH start_info, its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux boot protocol "zero page".
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack: grows down from just below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8FF0;
/// Identity-mapping page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xA000;
pub const PD_START: u64 = 0xB000;
/// Kernel command line (the boot protocol's traditional spot).
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we ever write (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table live in the BIOS area, which the e820 map
/// reserves and Linux scans for "_MP_".
pub const MPTABLE_START: u64 = 0xF_0000;
