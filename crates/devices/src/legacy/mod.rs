//! The PC legacy devices a Linux guest probes: 16550 UARTs, the i8042 keyboard controller
//! (whose reset line is how a guest reboots), the CMOS RTC, and vmon's exit port.

pub mod exit_port;
pub mod i8042;
pub mod power;
pub mod rtc;
pub mod serial;

/// COM1..COM4 base ports and their ISA IRQs.
pub const COM1: (u16, u32) = (0x3F8, 4);
pub const COM2: (u16, u32) = (0x2F8, 3);
pub const COM3: (u16, u32) = (0x3E8, 4);
pub const COM4: (u16, u32) = (0x2E8, 3);
pub const UART_PORTS: u64 = 8;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
pub const RTC_PORT: u16 = 0x70;
