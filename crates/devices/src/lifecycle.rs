//! How devices tell the VMM that the guest wants to stop: reset through the i8042, a status
//! on the exit port, (later) ACPI power-off. The first request wins; the VMM's main loop waits
//! on the eventfd.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest asked for a reset (i8042 pulse, triple-fault-free reboot).
    Reboot,
    /// The guest wrote an exit status to the vmon exit port.
    ExitStatus(u8),
    /// The guest powered off through ACPI (S5).
    PowerOff,
}

pub struct StopSignal {
    event: EventFd,
    request: Mutex<Option<GuestStop>>,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            event: EventFd::new(EFD_NONBLOCK)?,
            request: Mutex::new(None),
        })
    }

    /// Records `stop` unless an earlier request is pending, and wakes the main loop.
    pub fn request(&self, stop: GuestStop) {
        let mut pending = crate::bus::lock(&self.request);
        if pending.is_none() {
            *pending = Some(stop);
        }
        // A failed write means the counter is saturated: the loop is already woken.
        let _ = self.event.write(1);
    }

    pub fn pending(&self) -> Option<GuestStop> {
        crate::bus::lock(&self.request).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_wakes() {
        let s = StopSignal::new().unwrap();
        assert_eq!(s.pending(), None);
        s.request(GuestStop::ExitStatus(7));
        s.request(GuestStop::Reboot);
        assert_eq!(s.pending(), Some(GuestStop::ExitStatus(7)));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
