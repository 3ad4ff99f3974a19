//! MSI-X: the vector table and pending-bit array a PCI function exposes in a BAR, and the
//! capability that enables it.
//!
//! The guest programs each vector's address/data (an x86 MSI message naming a LAPIC and a
//! vector) and mask bit. Delivery is the hypervisor's job behind [`MsiVectors`]: the VMM
//! points one GSI per vector at the message and triggers it through an irqfd, so a device
//! thread raises an interrupt with one eventfd write and no vCPU involvement. A masked
//! vector records a pending bit instead, delivered when the guest unmasks it.

use std::io;

use serde::{Deserialize, Serialize};
use vmon_state::Persist;

/// PCI capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Size of one table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Offset of Message Control inside the capability.
pub const CAP_CONTROL_OFFSET: usize = 2;

/// One MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// How vectors reach the guest; implemented by the hypervisor layer.
pub trait MsiVectors: Send + Sync {
    /// Routes `vector` to `message`.
    fn route(&self, vector: u16, message: MsiMessage) -> io::Result<()>;
    /// Raises `vector` (already routed).
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Entry {
            address: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// Entries whose route in the hypervisor matches the table.
    routed: Vec<bool>,
    vectors: Box<dyn MsiVectors>,
}

impl Msix {
    pub fn new(count: u16, vectors: Box<dyn MsiVectors>) -> Self {
        let count = usize::from(count.clamp(1, 2048));
        Msix {
            entries: vec![Entry::default(); count],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![false; count],
            vectors,
        }
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body after ID and next pointer: Message Control, then table and PBA
    /// offsets (with the BAR index in the low three bits).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.count() - 1).to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        b
    }

    /// Which bits of the capability body the guest may write: enable and function mask.
    pub fn capability_writable() -> [u8; 2] {
        [0, 0xC0]
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote Message Control (`control` is the new value after masking).
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_unmasked_pending();
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        read_dwords(data, offset, |index| {
            let e = self.entries.get((index / 4) as usize)?;
            Some(match index % 4 {
                0 => e.address as u32,
                1 => (e.address >> 32) as u32,
                2 => e.data,
                _ => e.control,
            })
        });
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        // Table fields are dwords; the spec lets drivers use dword or qword accesses.
        if !offset.is_multiple_of(4) || !(data.len() == 4 || data.len() == 8) {
            tracing::debug!(
                offset,
                len = data.len(),
                "unaligned MSI-X table write ignored"
            );
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let dword = offset / 4 + i as u64;
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let vector = (dword / 4) as usize;
            let Some(e) = self.entries.get_mut(vector) else {
                return;
            };
            let before = *e;
            match dword % 4 {
                0 => e.address = (e.address & !0xFFFF_FFFF) | u64::from(value),
                1 => e.address = (e.address & 0xFFFF_FFFF) | u64::from(value) << 32,
                2 => e.data = value,
                _ => e.control = value & VECTOR_MASKED,
            }
            if e.address != before.address || e.data != before.data {
                self.routed[vector] = false;
            }
            if !self.entries[vector].masked() {
                self.ensure_routed(vector);
                if before.masked() {
                    self.deliver_if_pending(vector);
                }
            }
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        read_dwords(data, offset, |index| {
            let word = self.pending.get((index / 2) as usize)?;
            Some((word >> ((index % 2) * 32)) as u32)
        });
    }

    /// Raises `vector`, or records it pending while it (or the function) is masked.
    /// Returns false when MSI-X is disabled: the guest did not ask for interrupts.
    pub fn notify(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return false;
        }
        if self.function_masked || self.entries[v].masked() {
            self.pending[v / 64] |= 1 << (v % 64);
            return true;
        }
        self.ensure_routed(v);
        if let Err(e) = self.vectors.trigger(vector) {
            tracing::warn!(vector, "raising an MSI-X interrupt failed: {e}");
        }
        true
    }

    fn ensure_routed(&mut self, v: usize) {
        if self.routed[v] {
            return;
        }
        let e = self.entries[v];
        let message = MsiMessage {
            address: e.address,
            data: e.data,
        };
        match self.vectors.route(v as u16, message) {
            Ok(()) => self.routed[v] = true,
            Err(err) => tracing::warn!(vector = v, "routing an MSI-X vector failed: {err}"),
        }
    }

    fn deliver_if_pending(&mut self, v: usize) {
        let bit = 1u64 << (v % 64);
        if self.enabled && !self.function_masked && self.pending[v / 64] & bit != 0 {
            self.pending[v / 64] &= !bit;
            self.ensure_routed(v);
            if let Err(e) = self.vectors.trigger(v as u16) {
                tracing::warn!(vector = v, "raising an MSI-X interrupt failed: {e}");
            }
        }
    }

    fn deliver_unmasked_pending(&mut self) {
        for v in 0..self.entries.len() {
            if !self.entries[v].masked() {
                self.deliver_if_pending(v);
            }
        }
    }
}

/// One vector's table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

/// The table, the pending bits and the two Message Control bits: everything the guest can
/// observe of MSI-X. Whether a vector is routed in the hypervisor is not in it: routes
/// belong to the new hypervisor's wiring and are made again (see [`Msix::routes`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntryState>,
    /// One bit per vector, 64 vectors to a word (the PBA's layout).
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixStateError {
    #[error("{0} MSI-X vectors: a function has between 1 and 2048")]
    VectorCount(usize),
    #[error("{got} pending-bit words for {vectors} vectors (want {want})")]
    PendingWords {
        got: usize,
        vectors: usize,
        want: usize,
    },
    #[error("a pending bit is set for vector {0}, past the end of the table")]
    PendingPastTable(usize),
}

impl Msix {
    /// The messages of the vectors the guest has unmasked, for a restorer that wants every
    /// route in place before the first interrupt. Routing is also done on demand (the first
    /// trigger of a vector routes it), so this only moves that work earlier.
    pub fn routes(&self) -> Vec<(u16, MsiMessage)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.masked())
            .map(|(v, e)| {
                (
                    v as u16,
                    MsiMessage {
                        address: e.address,
                        data: e.data,
                    },
                )
            })
            .collect()
    }
}

impl Persist for Msix {
    type State = MsixState;
    type Wiring = Box<dyn MsiVectors>;
    type Error = MsixStateError;

    fn save(&self) -> Result<MsixState, MsixStateError> {
        Ok(MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    address: e.address,
                    data: e.data,
                    masked: e.masked(),
                })
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        })
    }

    /// Rebuilds the table without touching the hypervisor: nothing is routed or raised
    /// here, so the restorer decides when interrupts may flow again.
    fn restore(vectors: Box<dyn MsiVectors>, s: &MsixState) -> Result<Self, MsixStateError> {
        let count = s.entries.len();
        if !(1..=2048).contains(&count) {
            return Err(MsixStateError::VectorCount(count));
        }
        let want = count.div_ceil(64);
        if s.pending.len() != want {
            return Err(MsixStateError::PendingWords {
                got: s.pending.len(),
                vectors: count,
                want,
            });
        }
        // Bits past the table would never be cleared and read back as garbage in the PBA.
        if let Some(last) = s.pending.last() {
            let used = count - (want - 1) * 64;
            if used < 64 && last >> used != 0 {
                return Err(MsixStateError::PendingPastTable(
                    (want - 1) * 64 + used + (last >> used).trailing_zeros() as usize,
                ));
            }
        }
        Ok(Msix {
            entries: s
                .entries
                .iter()
                .map(|e| Entry {
                    address: e.address,
                    data: e.data,
                    control: if e.masked { VECTOR_MASKED } else { 0 },
                })
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
            routed: vec![false; count],
            vectors,
        })
    }
}

/// Fills `data` from consecutive little-endian dwords; missing dwords read as zero.
fn read_dwords(data: &mut [u8], offset: u64, dword: impl Fn(u64) -> Option<u32>) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = dword(at / 4).map_or(0, |d| (d >> ((at % 4) * 8)) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Log {
        routes: Vec<(u16, MsiMessage)>,
        triggers: Vec<u16>,
    }

    struct Recorder(Arc<Mutex<Log>>);

    impl MsiVectors for Recorder {
        fn route(&self, vector: u16, message: MsiMessage) -> io::Result<()> {
            self.0.lock().unwrap().routes.push((vector, message));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.0.lock().unwrap().triggers.push(vector);
            Ok(())
        }
    }

    fn msix(count: u16) -> (Msix, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        (Msix::new(count, Box::new(Recorder(log.clone()))), log)
    }

    fn program(m: &mut Msix, v: u64, address: u64, data: u32, masked: bool) {
        m.write_table(v * 16, &address.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (m, _) = msix(3);
        let cap = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([cap[0], cap[1]]), 2, "N-1 encoding");
        assert_eq!(u32::from_le_bytes(cap[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(cap[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(m.table_size(), 48);
        assert_eq!(m.pba_size(), 8);
    }

    #[test]
    fn disabled_msix_delivers_nothing() {
        let (mut m, log) = msix(2);
        program(&mut m, 0, 0xFEE0_0000, 0x41, false);
        assert!(!m.notify(0));
        assert!(log.lock().unwrap().triggers.is_empty());
    }

    #[test]
    fn unmasked_vector_is_routed_then_triggered() {
        let (mut m, log) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0xFEE0_1000, 0x42, false);
        assert!(m.notify(1));
        let log = log.lock().unwrap();
        assert_eq!(
            log.routes.last(),
            Some(&(
                1,
                MsiMessage {
                    address: 0xFEE0_1000,
                    data: 0x42
                }
            ))
        );
        assert_eq!(log.triggers, vec![1]);
    }

    #[test]
    fn masked_vector_is_pending_until_unmasked() {
        let (mut m, log) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xFEE0_0000, 0x30, true);
        assert!(m.notify(0));
        assert!(log.lock().unwrap().triggers.is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(log.lock().unwrap().triggers, vec![0]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, log) = msix(2);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xFEE0_0000, 0x30, false);
        m.notify(0);
        assert!(log.lock().unwrap().triggers.is_empty());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(log.lock().unwrap().triggers, vec![0]);
    }

    #[test]
    fn table_reads_back_and_out_of_range_is_harmless() {
        let (mut m, _) = msix(1);
        program(&mut m, 0, 0x1_FEE0_0000, 0x55, false);
        let mut e = [0u8; 16];
        m.read_table(0, &mut e);
        assert_eq!(
            u64::from_le_bytes(e[0..8].try_into().unwrap()),
            0x1_FEE0_0000
        );
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 0x55);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 0);
        m.write_table(16, &[0xFF; 4]);
        m.write_table(2, &[0xFF; 4]);
        m.write_table(0, &[0xFF; 2]);
        m.read_table(16, &mut e);
        assert_eq!(e, [0; 16]);
        assert!(!m.notify(7));
        // Reserved control bits stay clear.
        m.write_table(12, &0xFFFF_FFFEu32.to_le_bytes());
        m.read_table(12, &mut e[..4]);
        assert_eq!(&e[..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn state_round_trips_and_routes_again_on_first_use() {
        let (mut m, _) = msix(70);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xFEE0_0000, 0x30, false);
        program(&mut m, 69, 0xFEE0_1000, 0x31, true);
        m.notify(69);
        let state = m.save().unwrap();
        assert_eq!(state.pending, vec![0, 1 << 5]);
        let log = Arc::new(Mutex::new(Log::default()));
        let mut back = Msix::restore(Box::new(Recorder(log.clone())), &state).unwrap();
        assert!(
            log.lock().unwrap().routes.is_empty(),
            "restore routes nothing"
        );
        assert_eq!(back.save().unwrap(), state);
        assert_eq!(
            back.routes(),
            vec![(
                0,
                MsiMessage {
                    address: 0xFEE0_0000,
                    data: 0x30
                }
            )],
            "the one unmasked vector"
        );
        let (mut a, mut b) = ([0u8; 16 * 70], [0u8; 16 * 70]);
        m.read_table(0, &mut a);
        back.read_table(0, &mut b);
        assert_eq!(a, b);
        back.notify(0);
        let log = log.lock().unwrap();
        assert_eq!(log.routes.len(), 1, "routed on first use");
        assert_eq!(log.triggers, vec![0]);
    }

    #[test]
    fn bad_states_are_refused() {
        let (m, _) = msix(3);
        let good = m.save().unwrap();
        let restore = |s: &MsixState| {
            let (fresh, _) = msix(1);
            Msix::restore(fresh.vectors, s).err()
        };
        let mut s = good.clone();
        s.entries.clear();
        assert_eq!(restore(&s), Some(MsixStateError::VectorCount(0)));
        let mut s = good.clone();
        s.pending.push(0);
        assert!(matches!(
            restore(&s),
            Some(MsixStateError::PendingWords { .. })
        ));
        let mut s = good.clone();
        s.pending[0] = 1 << 3;
        assert_eq!(restore(&s), Some(MsixStateError::PendingPastTable(3)));
        let mut s = good;
        s.entries = vec![
            MsixEntryState {
                address: 0,
                data: 0,
                masked: true
            };
            3000
        ];
        assert_eq!(restore(&s), Some(MsixStateError::VectorCount(3000)));
    }

    #[test]
    fn reprogramming_a_live_vector_reroutes_it() {
        let (mut m, log) = msix(1);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xFEE0_0000, 0x30, false);
        m.notify(0);
        m.write_table(8, &0x31u32.to_le_bytes());
        m.notify(0);
        let log = log.lock().unwrap();
        assert_eq!(log.routes.last().unwrap().1.data, 0x31);
        assert_eq!(log.triggers, vec![0, 0]);
    }
}
