//! Devices the guest reaches through port I/O and MMIO, and the buses that route an access
//! to the device owning that address.
//!
//! A vCPU thread that takes an I/O exit calls [`bus::Bus::read`]/[`bus::Bus::write`]; the
//! bus finds the device and calls it with the offset into its range. Devices never block:
//! anything slow (terminal input, later virtio backends) happens on other threads.
//! Addresses nobody owns read as all-ones and ignore writes, like an empty ISA bus.

#![deny(unsafe_code)]

pub mod bus;
pub mod legacy;
pub mod lifecycle;
pub mod pci;

pub use bus::{Bus, BusDevice, BusError};
pub use lifecycle::{GuestStop, StopSignal};
