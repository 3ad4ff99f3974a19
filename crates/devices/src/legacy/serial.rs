//! A 16550A UART (vm-superio's model) with an input backlog.
//!
//! vm-superio's receive FIFO holds 64 bytes; a paste into the console is longer. Bytes that do
//! not fit wait in `backlog` and move into the FIFO each time the guest reads the receive
//! register, so input is never dropped and the producer (the stdin thread) never blocks.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmon_state::Persist;

use crate::bus::BusDevice;

const RECEIVE_BUFFER: u8 = 0;
/// Cap on buffered input: beyond this the console is not being read and we drop input.
const MAX_BACKLOG: usize = 1 << 20;

/// Raises the UART's interrupt line through a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub type Output = Box<dyn Write + Send>;

pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, Output>,
    backlog: VecDeque<u8>,
}

impl SerialPort {
    pub fn new(irq: EventFd, out: Output) -> Self {
        SerialPort {
            uart: Serial::new(IrqLine(irq), out),
            backlog: VecDeque::new(),
        }
    }

    /// Queues bytes from the host for the guest to read.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = MAX_BACKLOG.saturating_sub(self.backlog.len());
        if room < bytes.len() {
            tracing::warn!(dropped = bytes.len() - room, "serial input backlog full");
        }
        self.backlog.extend(&bytes[..bytes.len().min(room)]);
        self.feed_fifo();
    }

    fn feed_fifo(&mut self) {
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            let chunk = front.len().min(self.uart.fifo_capacity());
            if chunk == 0 {
                break;
            }
            match self.uart.enqueue_raw_bytes(&front[..chunk]) {
                Ok(n) if n > 0 => {
                    self.backlog.drain(..n);
                }
                _ => break,
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; a wider access gets the register in the low byte.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
        if offset as u8 == RECEIVE_BUFFER {
            self.feed_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if let Err(e) = self.uart.write(offset as u8, value) {
            // A closed stdout (EPIPE) must not stop the guest; the byte is lost.
            tracing::debug!(error = ?e, "serial output");
        }
    }
}

/// The UART registers plus the undelivered input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub fifo: Vec<u8>,
    pub backlog: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("serial port state is invalid: {0}")]
pub struct SerialStateError(String);

impl Persist for SerialPort {
    type State = SerialPortState;
    type Wiring = (EventFd, Output);
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialPortState, SerialStateError> {
        let s = self.uart.state();
        Ok(SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            fifo: s.in_buffer,
            backlog: self.backlog.iter().copied().collect(),
        })
    }

    fn restore(
        (irq, out): (EventFd, Output),
        s: &SerialPortState,
    ) -> Result<Self, SerialStateError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.fifo.clone(),
        };
        let uart = Serial::from_state(&state, IrqLine(irq), NoEvents, out)
            .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(SerialPort {
            uart,
            backlog: s.backlog.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, Shared) {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (SerialPort::new(irq, Box::new(out.clone())), out)
    }

    fn read_byte(p: &mut SerialPort, offset: u64) -> u8 {
        let mut b = [0u8];
        p.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn transmits_to_the_output() {
        let (mut p, out) = port();
        for b in b"hi\n" {
            p.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_ne!(read_byte(&mut p, 5) & 0x20, 0, "THR empty");
    }

    #[test]
    fn long_input_is_delivered_in_order_without_loss() {
        let (mut p, _) = port();
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        p.queue_input(&input);
        let mut got = Vec::new();
        while read_byte(&mut p, 5) & 1 != 0 {
            got.push(read_byte(&mut p, 0));
        }
        assert_eq!(got, input);
    }

    #[test]
    fn state_round_trips_with_pending_input() {
        let (mut p, _) = port();
        p.write(3, &[0x03]);
        p.write(7, &[0x5A]);
        p.queue_input(&[b'x'; 100]);
        let state = p.save().unwrap();
        assert_eq!(state.fifo.len() + state.backlog.len(), 100);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut q = SerialPort::restore((irq, Box::new(io::sink())), &state).unwrap();
        assert_eq!(q.save().unwrap(), state);
        assert_eq!(read_byte(&mut q, 7), 0x5A);
        assert_eq!(read_byte(&mut q, 0), b'x');
    }

    #[test]
    fn wide_and_empty_accesses_are_harmless() {
        let (mut p, _) = port();
        let mut wide = [0xEEu8; 4];
        p.read(7, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        p.write(0, &[]);
        p.write(9, &[1]);
    }
}
