//! The i8042 keyboard controller, modelled far enough for Linux to probe it quietly and to
//! reboot through it: controller self-tests, the configuration byte, the output port, a
//! keyboard that acknowledges commands, and the CPU reset line (command 0xFE, or clearing
//! bit 0 of the output port) which ends the VM with [`GuestStop::Reboot`].

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmon_state::Persist;

use crate::bus::BusDevice;
use crate::lifecycle::{GuestStop, StopSignal};

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_TEST_KBD_PORT: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xD2;

const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;
const OUTPUT_PORT_RESET_INACTIVE: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

const KBD_ACK: u8 = 0xFA;
const KBD_BAT_PASSED: u8 = 0xAA;
const KBD_CMD_RESET: u8 = 0xFF;
const KBD_CMD_IDENTIFY: u8 = 0xF2;
const KBD_ID: [u8; 2] = [0xAB, 0x83];
/// Bound on queued bytes so a guest looping on keyboard commands cannot grow memory.
const MAX_OUTPUT: usize = 16;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Pending {
    #[default]
    None,
    WriteCtr,
    WriteOutputPort,
    WriteKbdBuffer,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Pending,
    output: VecDeque<u8>,
}

pub struct I8042 {
    state: I8042State,
    irq: Option<EventFd>,
    stop: Arc<StopSignal>,
}

impl I8042 {
    pub fn new(stop: Arc<StopSignal>, irq: Option<EventFd>) -> Self {
        I8042 {
            state: I8042State {
                ctr: CTR_KBD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE,
                output_port: OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20,
                ..Default::default()
            },
            irq,
            stop,
        }
    }

    fn push_output(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.state.output.len() < MAX_OUTPUT {
                self.state.output.push_back(b);
            }
        }
        if self.state.ctr & CTR_KBD_INTERRUPT != 0 {
            if let Some(irq) = &self.irq {
                let _ = irq.write(1);
            }
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.state.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.state.ctr & CTR_SYSTEM_FLAG != 0 {
            s |= STATUS_SYSTEM_FLAG;
        }
        if self.state.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.state.last_was_command = true;
        self.state.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push_output(&[self.state.ctr]),
            CMD_WRITE_CTR => self.state.pending = Pending::WriteCtr,
            CMD_DISABLE_AUX => self.state.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.state.ctr &= !CTR_AUX_DISABLED,
            CMD_SELF_TEST => self.push_output(&[SELF_TEST_PASSED]),
            CMD_TEST_KBD_PORT => self.push_output(&[PORT_TEST_PASSED]),
            CMD_DISABLE_KBD => self.state.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.state.ctr &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push_output(&[self.state.output_port]),
            CMD_WRITE_OUTPUT_PORT => self.state.pending = Pending::WriteOutputPort,
            CMD_WRITE_KBD_BUFFER => self.state.pending = Pending::WriteKbdBuffer,
            // 0xF0..=0xFF pulse output-port lines low for the bits that are clear; bit 0 is
            // the CPU reset line.
            0xF0..=0xFF if cmd & 1 == 0 => self.reset(),
            _ => tracing::trace!(cmd, "i8042: ignored command"),
        }
    }

    fn data(&mut self, value: u8) {
        self.state.last_was_command = false;
        match std::mem::take(&mut self.state.pending) {
            Pending::WriteCtr => self.state.ctr = value,
            Pending::WriteOutputPort => {
                self.state.output_port = value;
                if value & OUTPUT_PORT_RESET_INACTIVE == 0 {
                    self.reset();
                }
            }
            Pending::WriteKbdBuffer => self.push_output(&[value]),
            Pending::None => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_CMD_RESET => self.push_output(&[KBD_ACK, KBD_BAT_PASSED]),
            KBD_CMD_IDENTIFY => self.push_output(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            _ => self.push_output(&[KBD_ACK]),
        }
    }

    fn reset(&self) {
        tracing::debug!("i8042: guest pulsed the reset line");
        self.stop.request(GuestStop::Reboot);
    }
}

impl BusDevice for I8042 {
    /// Offset 0 is the data port (0x60), offset 4 the status/command port (0x64).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.state.output.pop_front().unwrap_or(0),
            4 => self.status(),
            _ => 0xFF,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.data(value),
            4 => self.command(value),
            _ => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("i8042 state is invalid")]
pub struct I8042StateError;

impl Persist for I8042 {
    type State = I8042State;
    type Wiring = (Arc<StopSignal>, Option<EventFd>);
    type Error = I8042StateError;

    fn save(&self) -> Result<I8042State, I8042StateError> {
        Ok(self.state.clone())
    }

    fn restore((stop, irq): Self::Wiring, state: &I8042State) -> Result<Self, I8042StateError> {
        if state.output.len() > MAX_OUTPUT {
            return Err(I8042StateError);
        }
        Ok(I8042 {
            state: state.clone(),
            irq,
            stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, Arc<StopSignal>) {
        let stop = Arc::new(StopSignal::new().unwrap());
        (I8042::new(stop.clone(), None), stop)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let (mut d, _) = device();
        assert_eq!(read(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
        d.write(4, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut d, 0), SELF_TEST_PASSED);
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[0x47]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, 0), 0x47);
        assert_eq!(read(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn pulse_reset_requests_reboot() {
        let (mut d, stop) = device();
        d.write(4, &[0xFF]); // pulses no line
        assert_eq!(stop.pending(), None);
        d.write(4, &[0xFE]);
        assert_eq!(stop.pending(), Some(GuestStop::Reboot));
    }

    #[test]
    fn output_port_reset_bit_requests_reboot() {
        let (mut d, stop) = device();
        d.write(4, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(0, &[0x03]);
        assert_eq!(stop.pending(), None);
        d.write(4, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(0, &[0x02]);
        assert_eq!(stop.pending(), Some(GuestStop::Reboot));
    }

    #[test]
    fn keyboard_acknowledges_and_output_is_bounded() {
        let (mut d, _) = device();
        d.write(0, &[KBD_CMD_RESET]);
        assert_eq!(
            (read(&mut d, 0), read(&mut d, 0)),
            (KBD_ACK, KBD_BAT_PASSED)
        );
        for _ in 0..100 {
            d.write(0, &[KBD_CMD_IDENTIFY]);
        }
        assert_eq!(d.save().unwrap().output.len(), MAX_OUTPUT);
    }

    #[test]
    fn state_round_trips() {
        let (mut d, stop) = device();
        d.write(4, &[CMD_WRITE_CTR]);
        let state = d.save().unwrap();
        let mut e = I8042::restore((stop, None), &state).unwrap();
        e.write(0, &[0x11]);
        e.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut e, 0), 0x11);
    }
}
