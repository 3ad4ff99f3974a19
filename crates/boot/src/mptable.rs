//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns its CPUs
//! (one processor entry per vCPU, APIC ID = vCPU index), the IOAPIC and ISA interrupt routing.
//!
//! Layout: the 16-byte floating pointer, then the configuration table right behind it, both in
//! the BIOS area that the e820 map reserves; Linux finds them by scanning for "_MP_".

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmon_memory::layout::{BIOS_START, HIGH_MEMORY_START, IOAPIC_ADDRESS, LAPIC_ADDRESS};

use crate::layout::MPTABLE_START;
use crate::BootError;

/// xAPIC IDs are 8 bits, 0xFF is broadcast, and the IOAPIC takes the ID after the last CPU.
pub const MAX_CPUS: u32 = 254;
/// IOAPIC input pins wired 1:1 to ISA/GSI numbers (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xFF;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// CPU identification copied into processor entries (informational for the guest).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSignature {
    pub signature: u32,
    pub features: u32,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, to be placed at `base`.
pub fn build(cpus: u32, cpu: CpuSignature, base: u64) -> Result<Vec<u8>, BootError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(BootError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |entry: &[u8]| {
        entries.extend_from_slice(entry);
        count += 1;
    };

    for id in 0..cpus as u8 {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        let mut e = [0u8; 20];
        e[..4].copy_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        e[4..8].copy_from_slice(&cpu.signature.to_le_bytes());
        e[8..12].copy_from_slice(&cpu.features.to_le_bytes());
        push(&e);
    }
    let mut bus = [ENTRY_BUS, ISA_BUS_ID, 0, 0, 0, 0, 0, 0];
    bus[2..8].copy_from_slice(b"ISA   ");
    push(&bus);
    let mut ioapic = [ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    ioapic[4..8].copy_from_slice(&(IOAPIC_ADDRESS as u32).to_le_bytes());
    push(&ioapic);
    for irq in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger "conform to the bus" (ISA: active high, edge).
        push(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // Virtual-wire wiring of every local APIC: LINT0 from the PIC, LINT1 is NMI.
    push(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        ALL_LAPICS,
        0,
    ]);
    push(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        ALL_LAPICS,
        1,
    ]);

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = HEADER_LEN + entries.len();
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = SPEC_REV;
    header[8..16].copy_from_slice(b"VMON    ");
    header[16..28].copy_from_slice(b"vmon-virtual");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_ADDRESS as u32).to_le_bytes());

    let mut table = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    let mut pointer = [0u8; FLOATING_POINTER_LEN];
    pointer[..4].copy_from_slice(b"_MP_");
    pointer[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    pointer[8] = 1; // length in 16-byte units
    pointer[9] = SPEC_REV;
    pointer[10] = checksum(&pointer);
    table.extend_from_slice(&pointer);
    table.extend_from_slice(&header);
    table.extend_from_slice(&entries);
    let body = FLOATING_POINTER_LEN..FLOATING_POINTER_LEN + table_len;
    table[FLOATING_POINTER_LEN + 7] = checksum(&table[body]);
    Ok(table)
}

/// Writes the MP table for `cpus` vCPUs into the BIOS area.
pub fn write(mem: &impl GuestMemory, cpus: u32, cpu: CpuSignature) -> Result<(), BootError> {
    let table = build(cpus, cpu, MPTABLE_START)?;
    const { assert!(MPTABLE_START >= BIOS_START) };
    debug_assert!(MPTABLE_START + table.len() as u64 <= HIGH_MEMORY_START);
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero() {
        for cpus in [1, 4, 32, MAX_CPUS] {
            let t = build(cpus, CpuSignature::default(), MPTABLE_START).unwrap();
            assert_eq!(sum(&t[..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(16 + len, t.len());
            assert_eq!(sum(&t[16..]), 0);
        }
    }

    #[test]
    fn pointer_points_at_table() {
        let t = build(2, CpuSignature::default(), MPTABLE_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        assert_eq!(&t[16..20], b"PCMP");
    }

    #[test]
    fn one_processor_entry_per_cpu_bsp_first() {
        let cpus = 4;
        let t = build(
            cpus,
            CpuSignature {
                signature: 0x800F12,
                features: 0x178BFBFF,
            },
            0,
        )
        .unwrap();
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count as u32, cpus + 2 + u32::from(IOAPIC_PINS) + 2);
        let entries = &t[16 + HEADER_LEN..];
        for id in 0..cpus as usize {
            let e = &entries[id * 20..id * 20 + 20];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1] as usize, id);
            assert_eq!(e[3], if id == 0 { 3 } else { 1 });
            assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), 0x800F12);
        }
        let ioapic = &entries[cpus as usize * 20 + 8..][..8];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], cpus as u8);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xFEC0_0000
        );
    }

    #[test]
    fn fits_in_the_bios_area() {
        let t = build(MAX_CPUS, CpuSignature::default(), MPTABLE_START).unwrap();
        assert!(MPTABLE_START + t.len() as u64 <= HIGH_MEMORY_START);
    }

    #[test]
    fn rejects_zero_and_too_many() {
        assert!(matches!(
            build(0, CpuSignature::default(), 0),
            Err(BootError::TooManyCpus(0))
        ));
        assert!(build(MAX_CPUS + 1, CpuSignature::default(), 0).is_err());
    }
}
