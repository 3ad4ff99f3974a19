//! vmon's exit port: the guest→host channel for an exit status.
//!
//! An 8-bit write of N to I/O port 0x510 ends the VM, and `vmon` exits with status N. The
//! default guest's init uses it to hand back the status of `vmon run -- CMD`; tiny test guests
//! use it to report results. Wider writes use their low byte; reads return all-ones.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::lifecycle::{GuestStop, StopSignal};

pub const EXIT_PORT: u16 = 0x510;

pub struct ExitPort {
    stop: Arc<StopSignal>,
}

impl ExitPort {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        ExitPort { stop }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&status)) = (offset, data.first()) {
            self.stop.request(GuestStop::ExitStatus(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_requests_exit_with_that_status() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut port = ExitPort::new(stop.clone());
        let mut b = [0u8; 2];
        port.read(0, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
        port.write(0, &[]);
        assert_eq!(stop.pending(), None);
        port.write(0, &[7, 0, 0, 0]);
        assert_eq!(stop.pending(), Some(GuestStop::ExitStatus(7)));
    }
}
