//! Address-range routing for port I/O and MMIO.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {start:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { start: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

struct Range {
    start: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices sorted by address; lookups are a binary search. Built once before the vCPUs
/// start and shared read-only afterwards, so lookups take no lock.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        start: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(start));
        }
        let end = start
            .checked_add(len)
            .ok_or(BusError::Overlap { start, len })?;
        if self
            .ranges
            .iter()
            .any(|r| start < r.start + r.len && r.start < end)
        {
            return Err(BusError::Overlap { start, len });
        }
        let at = self.ranges.partition_point(|r| r.start < start);
        self.ranges.insert(at, Range { start, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        (addr - r.start < r.len).then_some((r, addr - r.start))
    }

    /// Reads from the device at `addr`. Returns false (and all-ones data) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xFF);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Returns false if none is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: a device's state is
/// plain data, and one failed access must not take the whole VM down with a poison error.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3F8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3FD, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x60, &[0xAB]));
        assert!(bus.write(0x3FF, &[1, 2]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0xAB])]);
        assert_eq!(b.lock().unwrap().writes, vec![(7, vec![1, 2])]);
    }

    #[test]
    fn unclaimed_addresses_read_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0xFF; 4]);
        assert!(!bus.write(0x80, &[1]));
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        assert!(!bus.read(0x14, &mut data));
        assert!(!bus.read(0x0F, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10F, 1),
            Err(BusError::Overlap {
                start: 0x10F,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xF8, 0x9),
            Err(BusError::Overlap {
                start: 0xF8,
                len: 9
            })
        );
        assert!(bus.insert(dev(), 0xF8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x110, 1).is_ok());
        assert_eq!(bus.insert(dev(), 0x200, 0), Err(BusError::Empty(0x200)));
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
    }
}
