//! What the kernel reads at entry besides registers: the Linux zero page (`boot_params`) or
//! the PVH `hvm_start_info`, the e820 map inside them, and the command line.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmon_memory::E820Entry;

use crate::initrd::InitrdPlacement;
use crate::layout::{CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::BootError;

const BOOT_FLAG: u16 = 0xAA55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader: we have no assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
/// Heap end pointer relative to the real-mode setup: the boot protocol's usual 0xFE00.
const HEAP_END: u16 = 0xFE00;
const KERNEL_ALIGNMENT_DEFAULT: u32 = 0x0100_0000;
const PVH_MAGIC: u32 = 0x336E_C578;
const E820_MAX_ENTRIES: usize = 128;

/// Writes the command line (NUL-terminated) after checking it fits `capacity` bytes.
pub fn write_cmdline(
    mem: &impl GuestMemory,
    cmdline: &str,
    capacity: usize,
) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() > capacity {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: capacity,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(())
}

/// Fills the zero page for the 64-bit Linux boot protocol (also used for plain ELF entry).
pub fn build_zero_page(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> boot_params {
    let mut params = boot_params::default();
    let mut hdr = header.unwrap_or(setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT_DEFAULT,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    params.hdr = hdr;
    for (slot, entry) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX_ENTRIES) as u8;
    params
}

pub fn write_zero_page(mem: &impl GuestMemory, params: &boot_params) -> Result<u64, BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))?;
    Ok(ZERO_PAGE_START)
}

/// Writes hvm_start_info, its memory map and module list for a PVH entry; returns its address.
pub fn write_pvh_start_info(
    mem: &impl GuestMemory,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
    e820: &[E820Entry],
) -> Result<u64, BootError> {
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = PVH_INFO_START + info_size;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))?;
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(memmap_addr + i as u64 * entry_size))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;
    use vmon_memory::{MemSize, MemoryLayout};

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let layout = MemoryLayout::new(MemSize::from_mib(4608)).unwrap();
        let header = setup_header {
            header: HDRS_MAGIC,
            version: 0x020F,
            loadflags: 1,
            ..Default::default()
        };
        let initrd = InitrdPlacement {
            addr: 0x3000_0000,
            size: 1234,
        };
        let p = build_zero_page(Some(header), 42, Some(initrd), &layout.e820());
        let hdr = p.hdr;
        assert_eq!(hdr.type_of_loader, 0xFF);
        assert_eq!(hdr.loadflags, 0x81);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 43);
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0x3000_0000, 1234));
        assert_eq!(p.e820_entries, 5);
        let last = p.e820_table[4];
        assert_eq!(
            (last.addr, last.size, last.r#type),
            (1 << 32, 1536 << 20, 1)
        );
    }

    #[test]
    fn elf_entry_gets_a_synthesised_header() {
        let p = build_zero_page(None, 0, None, &[]);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0, 0));
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = memory();
        write_cmdline(&mem, "console=ttyS0", 100).unwrap();
        let mut buf = [0xFFu8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, "x".repeat(101).as_str(), 100),
            Err(BootError::CmdlineTooLong { len: 101, max: 100 })
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b", 100),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn pvh_start_info_points_at_its_tables() {
        let mem = memory();
        let layout = MemoryLayout::new(MemSize::from_mib(64)).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x200_0000,
            size: 4096,
        };
        let addr = write_pvh_start_info(&mem, Some(initrd), 0xE_0000, &layout.e820()).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xE_0000);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 4096));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 3 * 24))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), (0x10_0000, 63 << 20, 1));
    }
}
