//! Interrupt routing: which GSI raises which interrupt, and irqfds to raise them.
//!
//! KVM keeps one routing table per VM. Setting it replaces it whole, so [`GsiRouting`]
//! holds our copy: the legacy PIC/IOAPIC pins that KVM installs by default (GSIs 0–23,
//! which the UARTs, i8042 and SCI use through irqfds) plus one MSI route per device
//! vector. Each vector owns a GSI and an irqfd: a device thread raises it by writing the
//! eventfd, and KVM injects the MSI without any vCPU thread or VMM lock in the way.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs of the IOAPIC's 24 pins; MSI routes are numbered after them.
const IOAPIC_PINS: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<Table>,
}

struct Table {
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes KVM_CREATE_IRQCHIP installs: GSIs 0–15 to both the PICs and the IOAPIC,
/// 16–23 to the IOAPIC only.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

impl GsiRouting {
    pub(crate) fn new(vm: Arc<VmFd>) -> Self {
        GsiRouting {
            vm,
            state: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    /// Allocates `count` MSI vectors, each with its own GSI and registered irqfd.
    pub fn msi_vectors(self: &Arc<Self>, count: u16) -> io::Result<MsiVectorGroup> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = {
                let mut t = lock(&self.state);
                if t.next_gsi as usize >= MAX_ROUTES {
                    return Err(io::Error::other("out of interrupt routes (GSIs)"));
                }
                t.next_gsi += 1;
                t.next_gsi - 1
            };
            let irqfd = EventFd::new(EFD_NONBLOCK)?;
            self.vm
                .register_irqfd(&irqfd, gsi)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            vectors.push((gsi, irqfd));
        }
        Ok(MsiVectorGroup {
            routing: self.clone(),
            vectors,
        })
    }

    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> io::Result<()> {
        let mut t = lock(&self.state);
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = address as u32;
        e.u.msi.address_hi = (address >> 32) as u32;
        e.u.msi.data = data;
        if t.msi.get(&gsi).is_some_and(|old| same_msi(old, &e)) {
            return Ok(());
        }
        t.msi.insert(gsi, e);
        // The table is committed under the lock so two devices cannot interleave and
        // leave KVM with the older of two tables.
        let mut entries = legacy_routes();
        entries.extend(t.msi.values().copied());
        let mut table = KvmIrqRouting::new(entries.len())
            .map_err(|_| io::Error::other("interrupt routing table too large"))?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

fn same_msi(a: &kvm_irq_routing_entry, b: &kvm_irq_routing_entry) -> bool {
    // SAFETY: both entries are MSI routes (only MSI entries are stored in `msi`), so the
    // `msi` member of the union is the initialised one.
    unsafe {
        a.u.msi.address_lo == b.u.msi.address_lo
            && a.u.msi.address_hi == b.u.msi.address_hi
            && a.u.msi.data == b.u.msi.data
    }
}

/// The vectors of one device: vector `i` is `vectors[i]`.
pub struct MsiVectorGroup {
    routing: Arc<GsiRouting>,
    vectors: Vec<(u32, EventFd)>,
}

impl MsiVectorGroup {
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    pub fn route(&self, vector: u16, address: u64, data: u32) -> io::Result<()> {
        let (gsi, _) = self.get(vector)?;
        self.routing.set_msi(*gsi, address, data)
    }

    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        self.get(vector)?.1.write(1)
    }

    fn get(&self, vector: u16) -> io::Result<&(u32, EventFd)> {
        self.vectors
            .get(usize::from(vector))
            .ok_or_else(|| io::Error::other(format!("no MSI vector {vector}")))
    }
}

impl Drop for MsiVectorGroup {
    fn drop(&mut self) {
        for (gsi, fd) in &self.vectors {
            let _ = self.routing.vm.unregister_irqfd(fd, *gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let r = legacy_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        // SAFETY: legacy_routes only builds irqchip entries.
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 == 23 && p.1 != KVM_IRQCHIP_IOAPIC));
    }
}
