//! ACPI tables: RSDP → XSDT → FADT (→ DSDT) and MADT.
//!
//! What the guest learns from them: its CPUs and IOAPIC (MADT, the same facts as the MP
//! table), that an i8042 and a CMOS RTC exist (FADT boot flags), and how to power off: the
//! DSDT's `\_S5` sleep type written with SLP_EN to the PM1a control register (I/O ports
//! vmon handles, see `vmon_devices::legacy::power`).
//!
//! Why fixed-hardware ACPI and not the simpler hardware-reduced kind: Linux answers
//! HW_REDUCED_ACPI by dropping the legacy PIC and PIT, after which ISA interrupts (the
//! UARTs' IRQ 3 and 4) exist only for devices the DSDT describes. With the PM1 blocks the
//! legacy devices keep working exactly as with the MP table. SMI_CMD is 0: ACPI is always
//! on, there is no legacy mode to switch from.
//!
//! Why the DSDT declares a PCI root bridge (`\_SB.PCI0`): once ACPI is on, Linux on x86
//! finds PCI buses only through ACPI host bridges (`pci_acpi_init` succeeds, so the legacy
//! config-space probe `pci_legacy_init` never scans), and it takes the bridge's `_CRS` as
//! the only address windows devices may decode. So the DSDT describes bus 0 behind config
//! mechanism #1 (0xCF8..0xCFF) with the I/O space around those ports and the 32-bit MMIO
//! hole below the IOAPIC as windows. PCI BARs the VMM places inside that memory window are
//! claimed as they are, not reassigned. The bridge is a conventional PCI root (`PNP0A03`,
//! not PCIe's `PNP0A08`): there is no MCFG/ECAM and no `_OSC`, and no `_PRT` because the
//! devices interrupt with MSI-X only.
//!
//! Layout: all tables in the BIOS area below the MP table's region, RSDP first (Linux also
//! finds it through the zero page's `acpi_rsdp_addr` and PVH's `rsdp_paddr`).

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmon_memory::layout::{IOAPIC_ADDRESS, LAPIC_ADDRESS, MMIO_HOLE_START};

use crate::aml;
use crate::BootError;

/// Guest-physical address of the RSDP; the other tables follow it.
pub const RSDP_START: u64 = 0xE_0000;

/// Where the PM1a event block (status and enable, 2 bytes each) and PM1a control register
/// are in I/O space, the SCI's IRQ, and the sleep type `\_S5` (soft off) announces. The
/// device behind them lives in vmon-devices; the VMM hands its facts to the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmRegisters {
    pub pm1a_event_port: u16,
    pub pm1a_control_port: u16,
    pub sci_irq: u8,
    pub s5_type: u8,
}

const OEM_ID: &[u8; 6] = b"VMON  ";
const OEM_TABLE_ID: &[u8; 8] = b"VMONVIRT";
const CREATOR_ID: &[u8; 4] = b"VMON";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FADT_FLAG_WBINVD: u32 = 1;
const FADT_FLAG_PROC_C1: u32 = 1 << 2;
/// No fixed-feature sleep button. (The power button flag, bit 4, stays clear: the PM1 block
/// has a fixed-feature power button, which is how the host asks for an orderly shutdown.)
const FADT_FLAG_SLP_BUTTON: u32 = 1 << 5;
const PM1_EVENT_BLOCK_LEN: u8 = 4;
const PM1_CONTROL_BLOCK_LEN: u8 = 2;
/// MPS INTI flags: active high, level triggered (the SCI as QEMU and firmware declare it).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000D;
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1;
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const RTC_CENTURY_REGISTER: u8 = 0x32;
/// PCI configuration mechanism #1: address and data registers at 0xCF8..0xD00 (fixed by the
/// PCI spec; the device answering there is in vmon-devices).
const PCI_CONFIG_PORT: u16 = 0xCF8;
const PCI_CONFIG_PORT_COUNT: u8 = 8;
/// The root bridge's 32-bit memory window: the MMIO hole up to the IOAPIC, where the VMM
/// places BARs.
const PCI_MMIO_WINDOW_START: u32 = MMIO_HOLE_START as u32;
const PCI_MMIO_WINDOW_END: u32 = (IOAPIC_ADDRESS - 1) as u32;
const _: () = assert!(MMIO_HOLE_START < IOAPIC_ADDRESS && IOAPIC_ADDRESS <= 1 << 32);

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// A System Description Table: the standard header, then `body`; length and checksum are
/// filled in by [`Sdt::finish`].
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(signature);
        h[8] = revision;
        h[10..16].copy_from_slice(OEM_ID);
        h[16..24].copy_from_slice(OEM_TABLE_ID);
        h[24..28].copy_from_slice(&1u32.to_le_bytes());
        h[28..32].copy_from_slice(CREATOR_ID);
        h[32..36].copy_from_slice(&1u32.to_le_bytes());
        Sdt(h)
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = 0;
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Generic Address Structure for an I/O port block of `bytes` bytes, accessed by words.
fn io_port_gas(port: u16, bytes: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = bytes * 8;
    g[3] = GAS_ACCESS_WORD;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The DSDT, encoded in AML by hand (see [`aml`]):
///
/// ```text
/// Name (_S5, Package () { s5_type, s5_type, 0, 0 })
/// Scope (\_SB) { Device (PCI0) { ... } }    // see pci_root
/// ```
fn dsdt(s5_type: u8) -> Vec<u8> {
    let s5 = aml::package(&[
        aml::integer(s5_type.into()),
        aml::integer(s5_type.into()),
        aml::integer(0),
        aml::integer(0),
    ]);
    let mut t = Sdt::new(b"DSDT", 2);
    t.push(&aml::name("_S5", &s5))
        .push(&aml::scope("\\_SB", &pci_root()));
    t.finish()
}

/// `Device (PCI0)`: the root bridge of PCI segment 0, bus 0. No `_ADR`: a device has `_HID`
/// or `_ADR`, not both (iasl warns).
///
/// ```text
/// Name (_HID, EisaId ("PNP0A03"))   Name (_SEG, 0)   Name (_BBN, 0)   Name (_UID, 0)
/// Name (_CRS, ResourceTemplate () {
///     WordBusNumber 0..0
///     IO (Decode16, 0xCF8, 0xCF8, 1, 8)            the config ports, consumed by the bridge
///     WordIO 0x0000..0x0CF7, WordIO 0x0D00..0xFFFF  the rest of I/O space, forwarded
///     DWordMemory 0xC0000000..0xFEBFFFFF           the MMIO hole below the IOAPIC
/// })
/// ```
fn pci_root() -> Vec<u8> {
    let config_end = PCI_CONFIG_PORT + u16::from(PCI_CONFIG_PORT_COUNT);
    let crs = aml::resource_template(&[
        aml::word_bus_number(0, 0),
        aml::io(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_COUNT),
        aml::word_io(0, PCI_CONFIG_PORT - 1),
        aml::word_io(config_end, u16::MAX),
        aml::dword_memory(
            PCI_MMIO_WINDOW_START,
            PCI_MMIO_WINDOW_END,
            aml::Caching::NonCacheable,
            true,
        ),
    ]);
    let body = [
        aml::name("_HID", &aml::eisa_id_object("PNP0A03")),
        aml::name("_SEG", &aml::integer(0)),
        aml::name("_BBN", &aml::integer(0)),
        aml::name("_UID", &aml::integer(0)),
        aml::name("_CRS", &crs),
    ]
    .concat();
    aml::device("PCI0", &body)
}

fn fadt(dsdt_addr: u64, pm: PmRegisters) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |off: usize| off - HEADER_LEN;
    body[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    body[at(46)..at(48)].copy_from_slice(&u16::from(pm.sci_irq).to_le_bytes());
    body[at(56)..at(60)].copy_from_slice(&u32::from(pm.pm1a_event_port).to_le_bytes());
    body[at(64)..at(68)].copy_from_slice(&u32::from(pm.pm1a_control_port).to_le_bytes());
    body[at(88)] = PM1_EVENT_BLOCK_LEN;
    body[at(89)] = PM1_CONTROL_BLOCK_LEN;
    body[at(108)] = RTC_CENTURY_REGISTER;
    let boot_arch = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA;
    body[at(109)..at(111)].copy_from_slice(&boot_arch.to_le_bytes());
    let flags = FADT_FLAG_WBINVD | FADT_FLAG_PROC_C1 | FADT_FLAG_SLP_BUTTON;
    body[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    body[at(131)] = 0; // FADT minor version: 6.0
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(148)..at(160)].copy_from_slice(&io_port_gas(pm.pm1a_event_port, PM1_EVENT_BLOCK_LEN));
    body[at(172)..at(184)]
        .copy_from_slice(&io_port_gas(pm.pm1a_control_port, PM1_CONTROL_BLOCK_LEN));
    body[at(268)..at(276)].copy_from_slice(b"VMON\0\0\0\0");
    let mut t = Sdt::new(b"FACP", 6);
    t.push(&body);
    t.finish()
}

fn madt(cpus: u32, sci_irq: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 4);
    t.push(&(LAPIC_ADDRESS as u32).to_le_bytes())
        .push(&MADT_FLAG_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus as u8 {
        // Processor Local APIC: UID, APIC ID, enabled.
        t.push(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: ID after the last CPU, address, GSI base 0.
    let mut ioapic = [1u8, 12, cpus as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ioapic[4..8].copy_from_slice(&(IOAPIC_ADDRESS as u32).to_le_bytes());
    t.push(&ioapic);
    // Interrupt Source Override: the SCI, ISA IRQ = GSI, level triggered, active high.
    let mut sci = [2u8, 10, 0, sci_irq, 0, 0, 0, 0, 0, 0];
    sci[4..8].copy_from_slice(&u32::from(sci_irq).to_le_bytes());
    sci[8..10].copy_from_slice(&INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    t.push(&sci);
    // Local APIC NMI on LINT1 of every processor (UID 0xFF), as the MP table says.
    t.push(&[4, 6, 0xFF, 0, 0, 1]);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.push(&e.to_le_bytes());
    }
    t.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+, XSDT
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// All tables, laid out from `base`, with each table 16-byte aligned.
pub fn build(cpus: u32, pm: PmRegisters, base: u64) -> Vec<u8> {
    let align = |v: usize| v.next_multiple_of(16);
    let rsdp_len = 36;
    let dsdt_off = align(rsdp_len);
    let dsdt = dsdt(pm.s5_type);
    let fadt_off = align(dsdt_off + dsdt.len());
    let fadt = fadt(base + dsdt_off as u64, pm);
    let madt_off = align(fadt_off + fadt.len());
    let madt = madt(cpus, pm.sci_irq);
    let xsdt_off = align(madt_off + madt.len());
    let xsdt = xsdt(&[base + fadt_off as u64, base + madt_off as u64]);
    let mut out = vec![0u8; xsdt_off + xsdt.len()];
    out[..rsdp_len].copy_from_slice(&rsdp(base + xsdt_off as u64));
    out[dsdt_off..dsdt_off + dsdt.len()].copy_from_slice(&dsdt);
    out[fadt_off..fadt_off + fadt.len()].copy_from_slice(&fadt);
    out[madt_off..madt_off + madt.len()].copy_from_slice(&madt);
    out[xsdt_off..].copy_from_slice(&xsdt);
    out
}

/// Writes the tables for `cpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &impl GuestMemory, cpus: u32, pm: PmRegisters) -> Result<u64, BootError> {
    let tables = build(cpus, pm, RSDP_START);
    debug_assert!(RSDP_START + tables.len() as u64 <= crate::layout::MPTABLE_START);
    mem.write_slice(&tables, GuestAddress(RSDP_START))?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLEEP: PmRegisters = PmRegisters {
        pm1a_event_port: 0x600,
        pm1a_control_port: 0x604,
        sci_irq: 9,
        s5_type: 5,
    };

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Follows pointers like a guest would and returns each table found through the XSDT.
    fn walk(blob: &[u8], base: u64) -> Vec<Vec<u8>> {
        let table = |addr: u64| {
            let off = (addr - base) as usize;
            let len = u32_at(blob, off + 4) as usize;
            blob[off..off + len].to_vec()
        };
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&blob[..36]), 0, "RSDP extended checksum");
        let xsdt = table(u64_at(blob, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        xsdt[36..]
            .chunks(8)
            .map(|p| table(u64::from_le_bytes(p.try_into().unwrap())))
            .collect()
    }

    #[test]
    fn every_table_is_reachable_and_checksummed() {
        let base = RSDP_START;
        let blob = build(4, SLEEP, base);
        let tables = walk(&blob, base);
        let sigs: Vec<&[u8]> = tables.iter().map(|t| &t[..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
        for t in &tables {
            assert_eq!(sum(t), 0, "{:?} checksum", std::str::from_utf8(&t[..4]));
        }
        let fadt = &tables[0];
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(
            u32_at(fadt, 112) & (1 << 20),
            0,
            "not hardware-reduced: keeps the PIC"
        );
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI IRQ");
        assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!((fadt[88], fadt[89]), (4, 2));
        assert_eq!(
            u32_at(fadt, 48),
            0,
            "no SMI command port: ACPI always enabled"
        );
        let dsdt_addr = u64_at(fadt, 140);
        assert_eq!(u32_at(fadt, 40) as u64, dsdt_addr);
        let dsdt_off = (dsdt_addr - base) as usize;
        let dsdt = &blob[dsdt_off..dsdt_off + u32_at(&blob, dsdt_off + 4) as usize];
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        // X_PM1a_CNT_BLK: I/O space, 16 bits, word access, our port.
        assert_eq!(&fadt[172..176], &[GAS_SYSTEM_IO, 16, 0, GAS_ACCESS_WORD]);
        assert_eq!(u64_at(fadt, 176), 0x604);
        assert_eq!(&fadt[148..152], &[GAS_SYSTEM_IO, 32, 0, GAS_ACCESS_WORD]);
        assert_eq!(u64_at(fadt, 152), 0x600);
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]) & BOOT_ARCH_8042,
            BOOT_ARCH_8042
        );
    }

    #[test]
    fn madt_lists_every_cpu_then_the_ioapic() {
        let blob = build(3, SLEEP, RSDP_START);
        let madt = walk(&blob, RSDP_START).remove(1);
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDRESS as u32);
        let entries = &madt[44..];
        for id in 0..3usize {
            assert_eq!(&entries[id * 8..id * 8 + 5], &[0, 8, id as u8, id as u8, 1]);
        }
        let ioapic = &entries[24..36];
        assert_eq!(&ioapic[..3], &[1, 12, 3]);
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDRESS as u32);
        assert_eq!(
            &entries[36..46],
            &[2, 10, 0, 9, 9, 0, 0, 0, 0x0D, 0],
            "SCI override"
        );
        assert_eq!(&entries[46..], &[4, 6, 0xFF, 0, 0, 1]);
    }

    #[test]
    fn tables_fit_below_the_mp_table_for_the_most_cpus() {
        let blob = build(crate::mptable::MAX_CPUS, SLEEP, RSDP_START);
        assert!(RSDP_START + blob.len() as u64 <= crate::layout::MPTABLE_START);
    }

    #[test]
    fn s5_aml_is_well_formed() {
        let d = dsdt(5);
        let aml = &d[HEADER_LEN..];
        assert_eq!(aml[0], 0x08, "NameOp");
        assert_eq!(&aml[1..5], b"_S5_");
        assert_eq!(aml[5], 0x12, "PackageOp");
        // PkgLength counts itself and everything after it in the package.
        assert_eq!(aml[6], 8);
        assert_eq!(aml[7], 4, "four elements");
        assert_eq!(&aml[8..10], &[0x0A, 5], "SLP_TYP_a");
        assert_eq!(&aml[10..14], &[0x0A, 5, 0x00, 0x00]);
        assert_eq!(aml[14], 0x10, "ScopeOp follows the package");
    }

    /// A named object of the DSDT: its full path and the bytes of its value.
    #[derive(Debug)]
    struct Named {
        path: String,
        value: Vec<u8>,
    }

    /// (value, bytes used) of the PkgLength at the start of `b`.
    fn pkg_len(b: &[u8]) -> (usize, usize) {
        let extra = usize::from(b[0] >> 6);
        if extra == 0 {
            return (usize::from(b[0]), 1);
        }
        let v = (0..extra).fold(usize::from(b[0] & 0xF), |v, i| {
            v | usize::from(b[1 + i]) << (4 + 8 * i)
        });
        (v, 1 + extra)
    }

    /// A NameString of one segment, optionally rooted: (name, bytes used).
    fn name_at(b: &[u8]) -> (String, usize) {
        let root = usize::from(b[0] == b'\\');
        let seg = std::str::from_utf8(&b[root..root + 4]).unwrap();
        (
            format!("{}{seg}", if root == 1 { "\\" } else { "" }),
            root + 4,
        )
    }

    /// Length of the data object (integer, string, buffer, package) at the start of `b`.
    fn data_object_len(b: &[u8]) -> usize {
        match b[0] {
            0x00 | 0x01 => 1,
            0x0A => 2,
            0x0B => 3,
            0x0C => 5,
            0x0E => 9,
            0x0D => b.iter().position(|&c| c == 0).unwrap() + 1,
            0x11 | 0x12 => 1 + pkg_len(&b[1..]).0,
            op => panic!("unexpected data object opcode {op:#x}"),
        }
    }

    /// Walks a TermList of Name, Scope and Device objects, checking every length lines up.
    fn walk_terms(mut b: &[u8], scope: &str, out: &mut Vec<Named>) {
        let join = |name: &str| {
            if name.starts_with('\\') {
                name.to_string()
            } else if scope == "\\" {
                format!("\\{name}")
            } else {
                format!("{scope}.{name}")
            }
        };
        while !b.is_empty() {
            let used = match b {
                [0x08, rest @ ..] => {
                    let (name, n) = name_at(rest);
                    let len = data_object_len(&rest[n..]);
                    out.push(Named {
                        path: join(&name),
                        value: rest[n..n + len].to_vec(),
                    });
                    1 + n + len
                }
                [0x10, ..] | [0x5B, 0x82, ..] => {
                    let op = if b[0] == 0x10 { 1 } else { 2 };
                    let (len, p) = pkg_len(&b[op..]);
                    let block = &b[op..op + len];
                    let (name, n) = name_at(&block[p..]);
                    let path = join(&name);
                    out.push(Named {
                        path: path.clone(),
                        value: Vec::new(),
                    });
                    walk_terms(&block[p + n..], &path, out);
                    op + len
                }
                _ => panic!("unexpected AML at {:02x?}", &b[..b.len().min(8)]),
            };
            b = &b[used..];
        }
    }

    /// Splits a resource template into descriptors, checking the end tag and its checksum.
    fn resource_descriptors(buffer: &[u8]) -> Vec<Vec<u8>> {
        assert_eq!(buffer[0], 0x11, "BufferOp");
        let (len, p) = pkg_len(&buffer[1..]);
        assert_eq!(1 + len, buffer.len());
        let size_len = data_object_len(&buffer[1 + p..]);
        let data = &buffer[1 + p + size_len..];
        assert_eq!(&buffer[1 + p..1 + p + size_len], &[0x0A, data.len() as u8]);
        assert_eq!(sum(data), 0, "end tag checksum");
        let mut descriptors = Vec::new();
        let mut rest = data;
        loop {
            let n = if rest[0] & 0x80 == 0 {
                1 + usize::from(rest[0] & 7)
            } else {
                3 + usize::from(u16::from_le_bytes([rest[1], rest[2]]))
            };
            if rest[0] == 0x79 {
                assert_eq!(n, rest.len(), "the end tag is last");
                return descriptors;
            }
            descriptors.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
    }

    #[test]
    fn dsdt_declares_exactly_s5_and_the_pci_root_bridge() {
        let d = dsdt(5);
        assert_eq!(u32_at(&d, 4) as usize, d.len());
        assert_eq!(sum(&d), 0);
        let mut named = Vec::new();
        walk_terms(&d[HEADER_LEN..], "\\", &mut named);
        let paths: Vec<&str> = named.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "\\_S5_",
                "\\_SB_",
                "\\_SB_.PCI0",
                "\\_SB_.PCI0._HID",
                "\\_SB_.PCI0._SEG",
                "\\_SB_.PCI0._BBN",
                "\\_SB_.PCI0._UID",
                "\\_SB_.PCI0._CRS",
            ]
        );
        let value = |p: &str| &named.iter().find(|n| n.path == p).unwrap().value;
        assert_eq!(
            value("\\_SB_.PCI0._HID")[..],
            [0x0C, 0x41, 0xD0, 0x0A, 0x03],
            "EisaId (PNP0A03)"
        );
        for zero in ["_SEG", "_BBN", "_UID"] {
            assert_eq!(value(&format!("\\_SB_.PCI0.{zero}"))[..], [0x00], "{zero}");
        }

        let crs = resource_descriptors(value("\\_SB_.PCI0._CRS"));
        let u16_at = |b: &[u8], off: usize| u64::from(u16::from_le_bytes([b[off], b[off + 1]]));
        // (resource type, min, max) of each address space window, all fixed producers.
        let mut windows = Vec::new();
        for desc in crs.iter().filter(|d| d[0] & 0x80 != 0) {
            assert_eq!(
                desc[4], 0b1100,
                "MinFixed, MaxFixed, PosDecode, ResourceProducer"
            );
            let (min, max, len) = match desc[0] {
                0x88 => (u16_at(desc, 8), u16_at(desc, 10), u16_at(desc, 14)),
                0x87 => (
                    u64::from(u32_at(desc, 10)),
                    u64::from(u32_at(desc, 14)),
                    u64::from(u32_at(desc, 22)),
                ),
                tag => panic!("unexpected descriptor {tag:#x}"),
            };
            assert_eq!(len, max - min + 1);
            windows.push((desc[3], min, max));
        }
        assert_eq!(
            windows,
            [
                (2, 0, 0),
                (1, 0, 0xCF7),
                (1, 0xD00, 0xFFFF),
                (0, MMIO_HOLE_START, IOAPIC_ADDRESS - 1),
            ]
        );
        assert_eq!(crs[1], [0x47, 0x01, 0xF8, 0x0C, 0xF8, 0x0C, 0x01, 0x08]);
        let mem = &crs[4];
        assert_eq!(mem[5], 0x01, "non-cacheable, read-write");
    }

    /// Writes the DSDT to the file named by `VMON_DSDT_OUT`, for `iasl -d`; does nothing
    /// without it.
    #[test]
    fn dump_dsdt_when_asked() {
        if let Some(path) = std::env::var_os("VMON_DSDT_OUT") {
            std::fs::write(path, dsdt(5)).unwrap();
        }
    }
}
