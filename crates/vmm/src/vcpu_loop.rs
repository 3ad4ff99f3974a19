//! The vCPU thread: `KVM_RUN`, dispatch the exit, repeat.
//!
//! This is the whole exit path: an `in`/`out` or MMIO access that KVM does not handle in the
//! kernel comes back here as a [`VcpuExit`], goes to the bus, and the next `KVM_RUN` hands
//! the device's answer to the guest. Anything that ends the VM is reported to the main loop
//! through an [`OutcomeSlot`]; the thread then returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_EXIT_INTERNAL_ERROR;
use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmon_devices::Bus;
use vmon_hypervisor::Vcpu;
use vmon_memory::GuestMemory;

use crate::control::{ExitReason, VcpuStats, VmControl};
use crate::exit::VmOutcome;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Where vCPU threads report how the VM ended; the first report wins.
pub(crate) struct OutcomeSlot {
    event: EventFd,
    outcome: Mutex<Option<VmOutcome>>,
}

impl OutcomeSlot {
    pub fn new() -> std::io::Result<Self> {
        Ok(OutcomeSlot {
            event: EventFd::new(EFD_NONBLOCK)?,
            outcome: Mutex::new(None),
        })
    }

    pub fn report(&self, outcome: VmOutcome) {
        let mut slot = vmon_devices::bus::lock(&self.outcome);
        if slot.is_none() {
            *slot = Some(outcome);
        }
        let _ = self.event.write(1);
    }

    pub fn take(&self) -> Option<VmOutcome> {
        vmon_devices::bus::lock(&self.outcome).take()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }
}

pub(crate) struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub memory: GuestMemory,
    pub running: Arc<AtomicBool>,
    pub outcome: Arc<OutcomeSlot>,
    pub control: Arc<VmControl>,
    pub stats: Arc<VcpuStats>,
}

/// Human-readable names for KVM_INTERNAL_ERROR_* suberrors.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// The vCPU thread's body. A panic in it (a bug) ends the VM with a fault instead of
/// leaving a VM whose vCPU is silently gone.
pub(crate) fn run(mut vcpu: Vcpu, ctx: VcpuContext) {
    let index = vcpu.index();
    ctx.stats.set_current_thread();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(&mut vcpu, &ctx)));
    ctx.stats.clear_thread();
    if result.is_err() {
        ctx.outcome.report(VmOutcome::Fault(format!(
            "vCPU {index} thread panicked (a vmon bug)"
        )));
    }
}

fn run_loop(vcpu: &mut Vcpu, ctx: &VcpuContext) {
    let index = vcpu.index();
    let stats = &ctx.stats;
    while ctx.running.load(Ordering::Acquire) {
        // A VM stopped while paused must not run guest code once more on the way out.
        if !ctx.control.wait_if_paused(vcpu) {
            break;
        }
        let exit = vcpu.fd_mut().run();
        stats.count(match &exit {
            Ok(VcpuExit::IoIn(..)) => ExitReason::IoIn,
            Ok(VcpuExit::IoOut(..)) => ExitReason::IoOut,
            Ok(VcpuExit::MmioRead(..)) => ExitReason::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => ExitReason::MmioWrite,
            Ok(VcpuExit::Hlt) => ExitReason::Hlt,
            Ok(VcpuExit::IrqWindowOpen) => ExitReason::IrqWindow,
            Ok(VcpuExit::Intr) => ExitReason::Interrupted,
            Ok(VcpuExit::Shutdown) => ExitReason::Shutdown,
            Ok(VcpuExit::InternalError) => ExitReason::InternalError,
            Ok(VcpuExit::FailEntry(..)) => ExitReason::FailEntry,
            Ok(VcpuExit::SystemEvent(..)) => ExitReason::SystemEvent,
            Ok(_) => ExitReason::Other,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitReason::Interrupted
            }
            Err(_) => ExitReason::Other,
        });
        let outcome = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    tracing::trace!(port, len = data.len(), "read from an unclaimed port");
                }
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "write to an unclaimed port");
                }
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::debug!(addr, len = data.len(), "MMIO read from unclaimed address");
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::debug!(addr, len = data.len(), "MMIO write to unclaimed address");
                }
                continue;
            }
            // With the in-kernel LAPIC, KVM handles HLT itself; an exit here is spurious.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::Shutdown) => VmOutcome::TripleFault(vcpu.describe_fault(&ctx.memory)),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.fd_mut().get_kvm_run();
                let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the `internal` member of the union is the one
                    // KVM filled in.
                    unsafe { run.__bindgen_anon_1.internal.suberror }
                } else {
                    0
                };
                VmOutcome::Fault(format!(
                    "KVM internal error, suberror {suberror} ({}): {}",
                    internal_error_name(suberror),
                    vcpu.describe_fault(&ctx.memory)
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => VmOutcome::Fault(format!(
                "the CPU refused to enter the guest (hardware reason {reason:#x}, host CPU {cpu}): {}",
                vcpu.describe_fault(&ctx.memory)
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmOutcome::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmOutcome::Reboot,
                KVM_SYSTEM_EVENT_CRASH => VmOutcome::Panic,
                other => VmOutcome::Fault(format!("unexpected KVM system event {other}")),
            },
            Ok(other) => {
                let exit = format!("{other:?}");
                VmOutcome::Fault(format!(
                    "unexpected KVM exit {exit}: {}",
                    vcpu.describe_fault(&ctx.memory)
                ))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => VmOutcome::Fault(format!("KVM_RUN failed on vCPU {index}: {e}")),
        };
        tracing::debug!(vcpu = index, ?outcome, "vCPU stopping");
        ctx.outcome.report(outcome);
        return;
    }
}
