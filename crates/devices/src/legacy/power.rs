//! ACPI fixed-hardware power management registers (ACPI 6 §4.8.1): the PM1a event block
//! (status, enable) and the PM1a control register, which is how a guest powers itself off:
//! it writes its `\_S5` sleep type with SLP_EN, and vmon ends the VM with
//! [`GuestStop::PowerOff`]. Other sleep states are not offered (the DSDT lists S5 only), so
//! any other request is ignored.
//!
//! The one event raised is the fixed-feature power button (PWRBTN_STS), which is how the
//! host asks for an orderly shutdown: distributions map it to "power off" (systemd-logind,
//! acpid), where Ctrl-Alt-Del usually means reboot. The SCI is a level-triggered line held
//! high while an enabled status bit is set, as on real chipsets.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmon_state::Persist;

use crate::bus::BusDevice;
use crate::lifecycle::{GuestStop, StopSignal};

/// PM1a_EVT_BLK (4 bytes) followed by PM1a_CNT_BLK (2 bytes).
pub const PM_PORTS: (u16, u64) = (0x600, 6);
pub const PM1A_CONTROL_OFFSET: u16 = 4;
/// ISA IRQ of the system control interrupt (the conventional 9).
pub const SCI_IRQ: u8 = 9;
/// The sleep type the DSDT announces for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;

const STATUS: usize = 0;
const CONTROL: usize = 4;
const ENABLE: usize = 2;
const SCI_EN: u16 = 1;
/// PWRBTN_STS and PWRBTN_EN: bit 8 of the status and enable registers.
const PWRBTN: u16 = 1 << 8;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_EN: u16 = 1 << 13;

/// A level-triggered interrupt line (the SCI); `set_level` is called on every change the
/// guest or the host makes, and must tolerate repeats.
pub trait IrqLine: Send {
    fn set_level(&self, high: bool);
}

/// What PmControl needs from the machine.
pub struct PmWiring {
    pub stop: Arc<StopSignal>,
    pub sci: Box<dyn IrqLine>,
}

pub struct PmControl {
    /// The six register bytes: status, enable, control.
    regs: [u8; 6],
    stop: Arc<StopSignal>,
    sci: Box<dyn IrqLine>,
}

impl PmControl {
    pub fn new(wiring: PmWiring) -> Self {
        PmControl {
            regs: [0; 6],
            stop: wiring.stop,
            sci: wiring.sci,
        }
    }

    fn control(&self) -> u16 {
        u16::from_le_bytes([self.regs[CONTROL], self.regs[CONTROL + 1]])
    }

    fn word(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI if the guest enabled
    /// the event. A guest without an ACPI button driver never enables it and so never
    /// hears the press; the caller's timeout deals with such guests.
    pub fn press_power_button(&mut self) {
        let status = self.word(STATUS) | PWRBTN;
        self.regs[STATUS..STATUS + 2].copy_from_slice(&status.to_le_bytes());
        self.update_sci();
    }

    /// Whether the guest's ACPI driver has enabled the power-button event.
    pub fn power_button_enabled(&self) -> bool {
        self.word(ENABLE) & PWRBTN != 0
    }

    fn update_sci(&self) {
        self.sci
            .set_level(self.word(STATUS) & self.word(ENABLE) & PWRBTN != 0);
    }
}

impl BusDevice for PmControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = match at {
                // ACPI mode is always on: SCI_EN reads as set.
                CONTROL => self.regs[at] | SCI_EN as u8,
                _ => self.regs.get(at).copied().unwrap_or(0xFF),
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset as usize + i;
            match at {
                // Status bits are write-one-to-clear.
                STATUS | 1 => self.regs[at] &= !b,
                2..=5 => self.regs[at] = b,
                _ => {}
            }
        }
        if (offset as usize) < CONTROL {
            self.update_sci();
        }
        let control = self.control();
        let touched_control = (offset as usize + data.len()) > CONTROL;
        if touched_control && control & SLP_EN != 0 {
            let sleep_type = (control >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            // SLP_EN is a write-only trigger: it never reads back as set.
            self.regs[CONTROL + 1] &= !((SLP_EN >> 8) as u8);
            if sleep_type == u16::from(S5_SLEEP_TYPE) {
                self.stop.request(GuestStop::PowerOff);
            } else {
                tracing::debug!(
                    sleep_type,
                    "ignoring a request for a sleep state we do not offer"
                );
            }
        }
    }
}

/// The PM1 status, enable and control registers as the guest last left them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmState {
    pub registers: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
#[error("PM register state is invalid")]
pub struct PmStateError;

impl Persist for PmControl {
    type State = PmState;
    type Wiring = PmWiring;
    type Error = PmStateError;

    fn save(&self) -> Result<PmState, PmStateError> {
        Ok(PmState {
            registers: self.regs,
        })
    }

    fn restore(wiring: PmWiring, state: &PmState) -> Result<Self, PmStateError> {
        let pm = PmControl {
            regs: state.registers,
            stop: wiring.stop,
            sci: wiring.sci,
        };
        pm.update_sci();
        Ok(pm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    /// Records every level the device drives the SCI to.
    #[derive(Clone, Default)]
    struct Line(Arc<Mutex<Vec<bool>>>);

    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    impl Line {
        fn level(&self) -> Option<bool> {
            self.0.lock().unwrap().last().copied()
        }
    }

    fn wiring(stop: &Arc<StopSignal>, line: &Line) -> PmWiring {
        PmWiring {
            stop: stop.clone(),
            sci: Box::new(line.clone()),
        }
    }

    fn device() -> (PmControl, Arc<StopSignal>) {
        let (dev, stop, _) = device_with_line();
        (dev, stop)
    }

    fn device_with_line() -> (PmControl, Arc<StopSignal>, Line) {
        let stop = Arc::new(StopSignal::new().unwrap());
        let line = Line::default();
        (PmControl::new(wiring(&stop, &line)), stop, line)
    }

    #[test]
    fn power_button_raises_the_sci_only_when_enabled_until_acknowledged() {
        let (mut dev, stop, line) = device_with_line();
        // No driver yet: the status bit latches, the line stays low.
        dev.press_power_button();
        assert_eq!(line.level(), Some(false));
        let mut w = [0u8; 2];
        dev.read(0, &mut w);
        assert_eq!(u16::from_le_bytes(w) & PWRBTN, PWRBTN);
        // The driver clears stale status, then enables the event.
        dev.write(0, &PWRBTN.to_le_bytes());
        dev.write(2, &PWRBTN.to_le_bytes());
        assert!(dev.power_button_enabled());
        assert_eq!(line.level(), Some(false));
        dev.press_power_button();
        assert_eq!(line.level(), Some(true));
        // Acknowledging (write one to clear) drops the line.
        dev.write(1, &[(PWRBTN >> 8) as u8]);
        assert_eq!(line.level(), Some(false));
        assert_eq!(stop.pending(), None);
        // Disabling the event with the status still set also drops it.
        dev.press_power_button();
        assert_eq!(line.level(), Some(true));
        dev.write(2, &[0, 0]);
        assert_eq!(line.level(), Some(false));
    }

    const S5: u16 = (S5_SLEEP_TYPE as u16) << SLP_TYP_SHIFT;

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let (mut dev, stop) = device();
        dev.write(4, &S5.to_le_bytes()); // type without SLP_EN
        dev.write(4, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes()); // S3: not offered
        assert_eq!(stop.pending(), None);
        dev.write(4, &(S5 | SLP_EN).to_le_bytes());
        assert_eq!(stop.pending(), Some(GuestStop::PowerOff));
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, stop) = device();
        dev.write(2, &[0x20, 0x01]);
        let state = dev.save().unwrap();
        let line = Line::default();
        let mut back = PmControl::restore(wiring(&stop, &line), &state).unwrap();
        let mut w = [0u8; 2];
        back.read(2, &mut w);
        assert_eq!(w, [0x20, 0x01]);
    }

    #[test]
    fn byte_writes_of_the_high_half_count() {
        let (mut dev, stop) = device();
        dev.write(5, &[((S5 | SLP_EN) >> 8) as u8]);
        assert_eq!(stop.pending(), Some(GuestStop::PowerOff));
    }

    #[test]
    fn sci_enabled_and_slp_en_never_reads_back() {
        let (mut dev, _) = device();
        let mut w = [0u8; 2];
        dev.read(4, &mut w);
        assert_eq!(u16::from_le_bytes(w) & SCI_EN, SCI_EN);
        dev.write(4, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        dev.read(4, &mut w);
        assert_eq!(u16::from_le_bytes(w) & SLP_EN, 0);
    }

    #[test]
    fn enable_register_keeps_its_value_and_status_clears_on_write() {
        let (mut dev, _) = device();
        dev.write(2, &[0x20, 0x01]);
        let mut w = [0u8; 2];
        dev.read(2, &mut w);
        assert_eq!(w, [0x20, 0x01]);
        dev.regs[0] = 0x11;
        dev.write(0, &[0x01]);
        dev.read(0, &mut w);
        assert_eq!(w[0], 0x10);
        let mut wide = [0u8; 8];
        dev.read(4, &mut wide); // runs past the block
        assert_eq!(&wide[2..], &[0xFF; 6]);
    }
}
