//! Every program, wrapped in the image formats it is meant for, loads with
//! linux-loader and lands at the entry point vmon will jump to.

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmon_tinyguest::*;

const HIMEM: Option<GuestAddress> = Some(GuestAddress(0x10_0000));

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
}

fn assert_at(m: &GuestMemoryMmap, addr: u64, code: &[u8]) {
    let mut buf = vec![0u8; code.len()];
    m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    assert_eq!(buf, code);
}

fn programs64() -> Vec<Vec<u8>> {
    vec![
        serial_print_then_exit(b"hello\n", 0),
        exit_with(42),
        i8042_reset(),
        triple_fault(),
        port_probe(),
        wild_accesses(),
        smp_hello(2),
        bzimage_check_boot_params(),
        spin_forever(),
        print_then_spin(b"spinning\n"),
    ]
}

#[test]
fn elf64_images_load_at_entry() {
    for code in programs64() {
        let m = mem();
        let img = elf64(&code, DEFAULT_LOAD_ADDR);
        let r = Elf::load(&m, None, &mut Cursor::new(&img), HIMEM).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(DEFAULT_LOAD_ADDR));
        assert_eq!(r.pvh_boot_cap, PvhBootCapability::PvhEntryIgnored);
        assert_at(&m, DEFAULT_LOAD_ADDR, &code);
    }
}

#[test]
fn bzimages_load_with_entry_at_0x100200() {
    for code in programs64() {
        let m = mem();
        let img = bzimage(&code);
        let r = BzImage::load(&m, None, &mut Cursor::new(&img), HIMEM).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(DEFAULT_LOAD_ADDR));
        assert_eq!(r.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET, BZIMAGE_ENTRY64);
        assert_at(&m, BZIMAGE_ENTRY64, &code);
    }
}

#[test]
fn pvh_image_loads_and_reports_entry() {
    let m = mem();
    let code = pvh_hello();
    let img = elf64_pvh(&code, DEFAULT_LOAD_ADDR);
    let r = Elf::load(&m, None, &mut Cursor::new(&img), HIMEM).unwrap();
    assert_eq!(
        r.pvh_boot_cap,
        PvhBootCapability::PvhEntryPresent(GuestAddress(DEFAULT_LOAD_ADDR))
    );
    assert_eq!(r.kernel_end, DEFAULT_LOAD_ADDR + code.len() as u64);
    assert_at(&m, DEFAULT_LOAD_ADDR, &code);
}
