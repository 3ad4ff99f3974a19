//! Image writers: wrap raw guest code in the formats vmon's loader accepts.

/// Where ELF images are loaded by default (1 MiB), and where every
/// bzImage's protected-mode part is loaded (`code32_start`).
pub const DEFAULT_LOAD_ADDR: u64 = 0x10_0000;
/// Offset of the 64-bit entry point inside a bzImage's protected-mode part.
pub const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// Address of the 64-bit entry point of every [`bzimage`].
pub const BZIMAGE_ENTRY64: u64 = DEFAULT_LOAD_ADDR + BZIMAGE_ENTRY64_OFFSET;
/// Exit status written by the stub at offset 0 of a bzImage's
/// protected-mode part, i.e. if a VMM enters it at the load address (in
/// 32- or 64-bit mode) instead of at load address + 0x200.
pub const BZIMAGE_WRONG_ENTRY_STATUS: u8 = 0xEE;

const ELF_HEADER_SIZE: usize = 64;
const ELF_PHDR_SIZE: usize = 56;
const ELF_CODE_OFFSET: usize = 0x1000;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_RWX: u32 = 7;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn put16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes one ELF64 program header at `off`.
fn put_phdr(buf: &mut [u8], off: usize, p_type: u32, file_off: u64, addr: u64, size: u64) {
    let (flags, align) = if p_type == PT_LOAD {
        (PF_RWX, 0x1000)
    } else {
        (4, 4) // PF_R, 4-byte aligned notes
    };
    put32(buf, off, p_type);
    put32(buf, off + 4, flags);
    put64(buf, off + 8, file_off);
    put64(buf, off + 16, addr); // p_vaddr
    put64(buf, off + 24, addr); // p_paddr
    put64(buf, off + 32, size); // p_filesz
    put64(buf, off + 40, size); // p_memsz
    put64(buf, off + 48, align);
}

/// Builds an ELF64 x86-64 executable: the header, `phnum` program headers,
/// `code` at file offset 0x1000 covered by the first (PT_LOAD) header.
fn elf_with(code: &[u8], load_addr: u64, phnum: u16) -> Vec<u8> {
    assert!(!code.is_empty(), "empty guest code");
    assert_eq!(
        load_addr % 0x1000,
        0,
        "ELF load address must be 4 KiB aligned"
    );
    let mut img = vec![0u8; ELF_CODE_OFFSET + code.len()];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2; // ELFCLASS64
    img[5] = 1; // ELFDATA2LSB
    img[6] = 1; // EV_CURRENT
    put16(&mut img, 16, 2); // e_type = ET_EXEC
    put16(&mut img, 18, 62); // e_machine = EM_X86_64
    put32(&mut img, 20, 1); // e_version
    put64(&mut img, 24, load_addr); // e_entry
    put64(&mut img, 32, ELF_HEADER_SIZE as u64); // e_phoff
    put64(&mut img, 40, 0); // e_shoff: no sections
    put16(&mut img, 52, ELF_HEADER_SIZE as u16); // e_ehsize
    put16(&mut img, 54, ELF_PHDR_SIZE as u16); // e_phentsize
    put16(&mut img, 56, phnum);
    put16(&mut img, 58, 64); // e_shentsize
    put_phdr(
        &mut img,
        ELF_HEADER_SIZE,
        PT_LOAD,
        ELF_CODE_OFFSET as u64,
        load_addr,
        code.len() as u64,
    );
    img[ELF_CODE_OFFSET..].copy_from_slice(code);
    img
}

/// A minimal ELF64 x86-64 executable (`ET_EXEC`, no sections) with one
/// read/write/execute `PT_LOAD` segment holding `code` at `load_addr`
/// (physical = virtual), and `e_entry = load_addr`.
///
/// The VMM enters it in 64-bit mode at `load_addr`. `load_addr` must be
/// 4 KiB aligned (use [`DEFAULT_LOAD_ADDR`] unless testing something else).
pub fn elf64(code: &[u8], load_addr: u64) -> Vec<u8> {
    elf_with(code, load_addr, 1)
}

/// Like [`elf64`], plus a `PT_NOTE` segment holding a Xen PVH note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, name `"Xen"`, 4-byte descriptor =
/// `load_addr`), so the VMM enters `code32` at `load_addr` in 32-bit
/// protected mode with paging off and EBX = hvm_start_info.
pub fn elf64_pvh(code32: &[u8], load_addr: u64) -> Vec<u8> {
    let entry = u32::try_from(load_addr).expect("PVH entry must be below 4 GiB");
    let mut img = elf_with(code32, load_addr, 2);
    // The note goes right after the two program headers (4-byte aligned).
    let note_off = ELF_HEADER_SIZE + 2 * ELF_PHDR_SIZE;
    let mut note = Vec::with_capacity(20);
    note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    img[note_off..note_off + note.len()].copy_from_slice(&note);
    put_phdr(
        &mut img,
        ELF_HEADER_SIZE + ELF_PHDR_SIZE,
        PT_NOTE,
        note_off as u64,
        0,
        note.len() as u64,
    );
    img
}

/// The stub at offset 0 of the protected-mode part: `mov al, 0xEE;
/// mov dx, 0x510; out dx, al; 1: cli; hlt; jmp 1b`. These bytes mean the
/// same in 32- and 64-bit mode.
const WRONG_ENTRY_STUB: [u8; 12] = [
    0xB0,
    BZIMAGE_WRONG_ENTRY_STATUS,
    0x66,
    0xBA,
    0x10,
    0x05,
    0xEE,
    0xFA,
    0xF4,
    0xEB,
    0xFC,
    0x90,
];

/// Number of 512-byte setup sectors after the boot sector.
const SETUP_SECTS: u8 = 1;
/// Offset of the NUL-terminated kernel version string in the setup part.
const VERSION_STRING_OFFSET: usize = 0x280;

/// A minimal bzImage (Linux x86 boot protocol 2.15) whose 64-bit entry
/// point, at protected-mode offset 0x200, is `code64`.
///
/// Layout: boot sector and one setup sector (1 KiB) carrying the setup
/// header at 0x1F1, then the protected-mode part, loaded at `code32_start`
/// = [`DEFAULT_LOAD_ADDR`]: a wrong-entry stub at offset 0 (see
/// [`BZIMAGE_WRONG_ENTRY_STATUS`]), `code64` at offset 0x200 (guest address
/// [`BZIMAGE_ENTRY64`]), zero padding to a multiple of 16 bytes.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    assert!(!code64.is_empty(), "empty guest code");
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let entry = BZIMAGE_ENTRY64_OFFSET as usize;
    let pm_len = (entry + code64.len()).next_multiple_of(16);
    let mut img = vec![0u8; setup_len + pm_len];

    let h = &mut img[..setup_len];
    h[0x1F1] = SETUP_SECTS;
    put16(h, 0x1F2, 0); // root_flags
    put32(h, 0x1F4, (pm_len / 16) as u32); // syssize, in 16-byte paragraphs
    put16(h, 0x1FA, 0xFFFF); // vid_mode: "normal"
    put16(h, 0x1FE, 0xAA55); // boot_flag

    // jump: a short jmp over the header to the real-mode stub at 0x26C.
    h[0x200] = 0xEB;
    h[0x201] = (0x26C - 0x202) as u8;
    h[0x202..0x206].copy_from_slice(b"HdrS");
    put16(h, 0x206, 0x020F); // version 2.15
    put16(h, 0x20C, 0x1000); // start_sys_seg (obsolete)
    put16(h, 0x20E, (VERSION_STRING_OFFSET - 0x200) as u16); // kernel_version
    h[0x211] = 0x01; // loadflags: LOADED_HIGH
    put32(h, 0x214, DEFAULT_LOAD_ADDR as u32); // code32_start
    put32(h, 0x22C, 0x7FFF_FFFF); // initrd_addr_max
    put32(h, 0x230, 0x20_0000); // kernel_alignment
    h[0x234] = 0; // relocatable_kernel
    h[0x235] = 21; // min_alignment: log2(2 MiB)
    put16(h, 0x236, 0x0001); // xloadflags: XLF_KERNEL_64
    put32(h, 0x238, 2047); // cmdline_size
    put64(h, 0x258, DEFAULT_LOAD_ADDR); // pref_address
    put32(h, 0x260, pm_len.next_multiple_of(0x1000) as u32); // init_size

    // Real-mode stub (never run by vmon): 1: cli; hlt; jmp 1b
    h[0x26C..0x270].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFC]);
    let version = b"vmon-tinyguest\0";
    h[VERSION_STRING_OFFSET..VERSION_STRING_OFFSET + version.len()].copy_from_slice(version);

    let pm = &mut img[setup_len..];
    pm[..WRONG_ENTRY_STUB.len()].copy_from_slice(&WRONG_ENTRY_STUB);
    pm[entry..entry + code64.len()].copy_from_slice(code64);
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bzimage::BzImage;
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use linux_loader::loader::KernelLoader;
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const CODE: &[u8] = &[0x90, 0x90, 0xB0, 0x2A, 0xF4, 0xEB, 0xFE];
    const HIMEM: GuestAddress = GuestAddress(0x10_0000);

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn elf64_loads_at_1mib() {
        let m = mem();
        let img = elf64(CODE, DEFAULT_LOAD_ADDR);
        let r = Elf::load(&m, None, &mut Cursor::new(&img), Some(HIMEM)).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(DEFAULT_LOAD_ADDR));
        assert_eq!(r.kernel_end, DEFAULT_LOAD_ADDR + CODE.len() as u64);
        assert_eq!(r.pvh_boot_cap, PvhBootCapability::PvhEntryIgnored);
        assert!(r.setup_header.is_none());
        assert_eq!(read(&m, DEFAULT_LOAD_ADDR, CODE.len()), CODE);
        // Nothing else was written around it.
        assert_eq!(
            read(&m, DEFAULT_LOAD_ADDR - 0x1000, 0x1000),
            vec![0; 0x1000]
        );
        assert_eq!(img.len(), 0x1000 + CODE.len());
    }

    #[test]
    fn elf64_other_load_address() {
        let m = mem();
        let img = elf64(CODE, 0x40_0000);
        let r = Elf::load(&m, None, &mut Cursor::new(&img), Some(HIMEM)).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(0x40_0000));
        assert_eq!(read(&m, 0x40_0000, CODE.len()), CODE);
    }

    #[test]
    fn elf64_pvh_reports_entry() {
        let m = mem();
        let img = elf64_pvh(CODE, DEFAULT_LOAD_ADDR);
        let r = Elf::load(&m, None, &mut Cursor::new(&img), Some(HIMEM)).unwrap();
        assert_eq!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(DEFAULT_LOAD_ADDR))
        );
        assert_eq!(r.kernel_load, GuestAddress(DEFAULT_LOAD_ADDR));
        assert_eq!(r.kernel_end, DEFAULT_LOAD_ADDR + CODE.len() as u64);
        assert_eq!(read(&m, DEFAULT_LOAD_ADDR, CODE.len()), CODE);
    }

    #[test]
    fn elf64_without_note_has_no_pvh_entry() {
        // linux-loader only looks at notes when there is a PT_NOTE; make
        // sure the plain image really is the 64-bit one.
        let img = elf64(CODE, DEFAULT_LOAD_ADDR);
        assert_eq!(u16::from_le_bytes([img[56], img[57]]), 1);
    }

    #[test]
    fn bzimage_loads_with_linux_loader() {
        let m = mem();
        let img = bzimage(CODE);
        let r = BzImage::load(&m, None, &mut Cursor::new(&img), Some(HIMEM)).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(DEFAULT_LOAD_ADDR));
        let pm_len = img.len() as u64 - 1024;
        assert_eq!(r.kernel_end, DEFAULT_LOAD_ADDR + pm_len);
        let hdr = r.setup_header.unwrap();
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.boot_flag }, 0xAA55);
        assert_eq!({ hdr.version }, 0x020F);
        assert_eq!({ hdr.setup_sects }, 1);
        assert_eq!({ hdr.syssize } as u64 * 16, pm_len);
        assert_eq!({ hdr.loadflags }, 1);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.relocatable_kernel }, 0);
        assert_eq!({ hdr.xloadflags }, 1);
        assert_eq!({ hdr.pref_address }, 0x10_0000);
        assert_eq!({ hdr.initrd_addr_max }, 0x7FFF_FFFF);
        assert_eq!({ hdr.cmdline_size }, 2047);
        assert_eq!({ hdr.init_size }, 0x1000);
        assert_eq!(read(&m, BZIMAGE_ENTRY64, CODE.len()), CODE);
        assert_eq!(
            read(&m, DEFAULT_LOAD_ADDR, WRONG_ENTRY_STUB.len()),
            WRONG_ENTRY_STUB
        );
        // The kernel_version string is where the header says.
        let ver = 0x200 + { hdr.kernel_version } as usize;
        assert!(img[ver..].starts_with(b"vmon-tinyguest\0"));
    }

    #[test]
    fn bzimage_syssize_rounds_up() {
        let img = bzimage(&[0x90; 17]);
        // 0x200 + 17 bytes -> 0x220 bytes = 0x22 paragraphs.
        assert_eq!(img.len(), 1024 + 0x220);
        assert_eq!(
            u32::from_le_bytes(img[0x1F4..0x1F8].try_into().unwrap()),
            0x22
        );
    }

    #[test]
    fn wrong_entry_stub_decodes_the_same_in_32_and_64_bit() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        for bitness in [32, 64] {
            let mut d = Decoder::new(bitness, &WRONG_ENTRY_STUB, DecoderOptions::NONE);
            let m: Vec<Mnemonic> = (0..7).map(|_| d.decode().mnemonic()).collect();
            use Mnemonic::*;
            assert_eq!(m, [Mov, Mov, Out, Cli, Hlt, Jmp, Nop], "{bitness}-bit");
        }
    }
}
