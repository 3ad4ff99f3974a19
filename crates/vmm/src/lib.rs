//! The VMM: builds a machine from a [`VmConfig`] and runs it until the guest or the host
//! ends it.
//!
//! Threads: the caller's thread becomes the *main loop* ([`machine::Machine::run`]): it
//! forwards terminal input to the UART, receives host signals through a signalfd and waits
//! for a stop request. Each vCPU runs on its own thread ([`vcpu_loop`]), calling `KVM_RUN`
//! and dispatching I/O exits to the buses. Each active virtio device serves its queues on
//! its own thread (see vmon-virtio), woken by ioeventfds and raising MSI-X through irqfds.

pub mod config;
pub mod config_file;
pub mod control;
pub mod exit;
pub mod machine;
mod pci_devices;
mod signals;
pub mod snapshot;
pub mod terminal;
mod vcpu_loop;

pub use config::VmConfig;
pub use exit::{exit_codes, VmOutcome, VmmError};
pub use machine::Machine;
