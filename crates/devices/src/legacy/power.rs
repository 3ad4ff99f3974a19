//! ACPI sleep control and status registers (hardware-reduced ACPI, ACPI 6 §4.8.3.7): how a
//! guest powers itself off. The guest writes its `\_S5` sleep type with SLP_EN; vmon ends the
//! VM with [`GuestStop::PowerOff`]. Other sleep states are not offered (the DSDT lists S5
//! only), so any other request is ignored.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::lifecycle::{GuestStop, StopSignal};

/// Control register at offset 0, status register at offset 1.
pub const SLEEP_PORTS: (u16, u64) = (0x600, 2);
/// The sleep type the DSDT announces for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_ENABLE: u8 = 0x20;

pub struct SleepControl {
    stop: Arc<StopSignal>,
}

impl SleepControl {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        SleepControl { stop }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: no wake event pending. Control reads as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE {
            self.stop.request(GuestStop::PowerOff);
        } else if value & SLEEP_ENABLE != 0 {
            tracing::debug!(
                sleep_type,
                "ignoring a request for a sleep state we do not offer"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = SleepControl::new(stop.clone());
        dev.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | SLEEP_ENABLE]); // S3: not offered
        dev.write(1, &[0xFF]); // status register
        assert_eq!(stop.pending(), None);
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        assert_eq!(stop.pending(), Some(GuestStop::PowerOff));
        let mut b = [0xAAu8; 2];
        dev.read(1, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
