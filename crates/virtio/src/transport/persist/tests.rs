//! Snapshots of whole functions, driven through their registers as a driver would.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmon_devices::bus::BusDevice;
use vmon_devices::pci::msix::MsiMessage;
use vmon_devices::pci::PciDevice;

use super::*;
use crate::block::{Block, Disk, DiskOptions};
use crate::chain::tests::{desc, memory, F_NEXT, F_WRITE};
use crate::rate_limiter::Limits;
use crate::transport::{COMMON, DEVICE_CONFIG, ISR, MSIX_PBA, MSIX_TABLE, NOTIFY};
use crate::vsock::packet::{Header, HEADER_LEN, HOST_CID, OP_REQUEST};
use crate::vsock::{Vsock, VsockBackend, VsockOptions};
use crate::{chain, ActivateError, Activation, PauseError, COMMON_FEATURES};
use crate::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const BAR: u64 = 0xC000_0000;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
/// What the tests give a device to finish its requests in flight when it is paused.
const QUIESCE: Duration = Duration::from_secs(5);

type Mock<'a> = MockSplitQueue<'a, GuestMemory>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// MSI vectors that remember what they were asked to do.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(&'static str, u16)>>>);

impl Recorder {
    fn log(&self) -> Vec<(&'static str, u16)> {
        lock(&self.0).clone()
    }

    fn triggers(&self, vector: u16) -> usize {
        self.log()
            .iter()
            .filter(|&&e| e == ("trigger", vector))
            .count()
    }
}

impl MsiVectors for Recorder {
    fn route(&self, vector: u16, _: MsiMessage) -> std::io::Result<()> {
        lock(&self.0).push(("route", vector));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        lock(&self.0).push(("trigger", vector));
        Ok(())
    }
}

/// What a [`Probe`] was handed.
#[derive(Default)]
struct ProbeLog {
    /// `resumed` of each activation.
    activations: Vec<bool>,
    /// The queues while it is active; the test plays its thread.
    queues: Vec<Queue>,
}

/// A device without a thread whose queues the test can reach.
struct Probe(Arc<Mutex<ProbeLog>>);

impl VirtioDevice for Probe {
    fn device_type(&self) -> u16 {
        crate::device_id::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(b"probe config", offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut log = lock(&self.0);
        log.activations.push(a.resumed);
        log.queues = a.queues.into_iter().map(|q| q.queue).collect();
        Ok(())
    }
    fn reset(&mut self) {
        lock(&self.0).queues.clear();
    }
    fn pause(&mut self, _: Duration) -> Result<Vec<Queue>, PauseError> {
        Ok(std::mem::take(&mut lock(&self.0).queues))
    }
    fn save_state(&self) -> DeviceState {
        DeviceState::Stateless
    }
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Stateless => Ok(()),
            other => Err(DeviceStateError::wrong_kind(other, "probe")),
        }
    }
    fn metrics(&self) -> Arc<dyn crate::metrics::DeviceMetrics> {
        crate::metrics::CounterSet::new(&[])
    }
}

fn probe(mem: &GuestMemory, vectors: Recorder) -> (VirtioPci, Arc<Mutex<ProbeLog>>) {
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let f = VirtioPci::new(
        Box::new(Probe(log.clone())),
        mem.clone(),
        BAR,
        Box::new(vectors),
    )
    .unwrap();
    (f, log)
}

fn wiring(device: impl VirtioDevice + 'static, mem: &GuestMemory, v: Recorder) -> VirtioPciWiring {
    VirtioPciWiring {
        device: Box::new(device),
        memory: mem.clone(),
        vectors: Box::new(v),
    }
}

fn restore_probe(
    mem: &GuestMemory,
    s: &VirtioPciState,
) -> Result<(VirtioPci, Arc<Mutex<ProbeLog>>), VirtioStateError> {
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let f = VirtioPci::restore(wiring(Probe(log.clone()), mem, Recorder::default()), s)?;
    Ok((f, log))
}

/// Through serde_json, as a state file would carry it.
fn through_json(s: &VirtioPciState) -> VirtioPciState {
    let json = serde_json::to_string(s).unwrap();
    serde_json::from_str(&json).unwrap()
}

// Register access, as a driver makes it.

fn write(f: &mut VirtioPci, offset: u64, value: u64, len: usize) {
    f.write(offset, &value.to_le_bytes()[..len]);
}

fn read(f: &mut VirtioPci, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.read(offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn cfg_write(f: &mut VirtioPci, offset: usize, bytes: &[u8]) {
    f.write_config(offset, bytes);
}

fn cfg_read32(f: &mut VirtioPci, offset: usize) -> u64 {
    let mut b = [0u8; 4];
    f.read_config(offset, &mut b);
    u64::from(u32::from_le_bytes(b))
}

fn status(f: &mut VirtioPci) -> u8 {
    read(f, COMMON + 0x14, 1) as u8
}

/// Memory decoding on and MSI-X enabled, as Linux leaves a virtio function.
fn enable_msix(f: &mut VirtioPci) {
    cfg_write(f, 4, &[0x06, 0x04]);
    let control = f.msix_cap + msix::CAP_CONTROL_OFFSET;
    cfg_write(f, control + 1, &[0x80]);
}

fn program_vector(f: &mut VirtioPci, v: u64, address: u64, data: u32, masked: bool) {
    let at = MSIX_TABLE + v * 16;
    write(f, at, address, 8);
    write(f, at + 8, u64::from(data), 4);
    write(f, at + 12, u64::from(masked), 4);
}

/// ACKNOWLEDGE, DRIVER, the features, FEATURES_OK.
fn negotiate(f: &mut VirtioPci, features: u64) {
    write(f, COMMON + 0x14, 1, 1);
    write(f, COMMON + 0x14, 3, 1);
    for word in 0..2 {
        write(f, COMMON + 0x08, word, 4);
        write(f, COMMON + 0x0C, features >> (32 * word) & 0xFFFF_FFFF, 4);
    }
    write(f, COMMON + 0x14, 0xB, 1);
    assert_eq!(status(f), 0xB, "features accepted");
}

fn setup_queue(f: &mut VirtioPci, index: u16, vq: &Mock<'_>, vector: u16) {
    write(f, COMMON + 0x16, u64::from(index), 2);
    write(f, COMMON + 0x18, 16, 2);
    write(f, COMMON + 0x1A, u64::from(vector), 2);
    write(f, COMMON + 0x20, vq.desc_table_addr().0, 8);
    // The other two as dword pairs, as some drivers write them.
    for (at, addr) in [(0x28, vq.avail_addr().0), (0x30, vq.used_addr().0)] {
        write(f, COMMON + at, addr & 0xFFFF_FFFF, 4);
        write(f, COMMON + at + 4, addr >> 32, 4);
    }
    write(f, COMMON + 0x1C, 1, 2);
}

fn driver_ok(f: &mut VirtioPci) {
    write(f, COMMON + 0x14, 0xF, 1);
}

/// Every register the guest can read, each with a name for the assertion message. Reading
/// the ISR clears it, so it comes last; selectors are put back as found.
fn dump(f: &mut VirtioPci) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for off in (0..256).step_by(4) {
        out.push((format!("config space {off:#04x}"), cfg_read32(f, off)));
    }
    let selects = [
        read(f, COMMON, 4),
        read(f, COMMON + 0x08, 4),
        read(f, COMMON + 0x16, 2),
    ];
    for sel in 0..3 {
        write(f, COMMON, sel, 4);
        out.push((format!("device_feature[{sel}]"), read(f, COMMON + 0x04, 4)));
        write(f, COMMON + 0x08, sel, 4);
        out.push((format!("driver_feature[{sel}]"), read(f, COMMON + 0x0C, 4)));
    }
    for (name, off, len) in [
        ("msix_config", 0x10, 2),
        ("num_queues", 0x12, 2),
        ("device_status", 0x14, 1),
        ("config_generation", 0x15, 1),
    ] {
        out.push((name.to_string(), read(f, COMMON + off, len)));
    }
    for q in 0..3 {
        write(f, COMMON + 0x16, q, 2);
        for (name, off, len) in [
            ("size", 0x18, 2),
            ("msix_vector", 0x1A, 2),
            ("enable", 0x1C, 2),
            ("notify_off", 0x1E, 2),
            ("desc", 0x20, 8),
            ("driver", 0x28, 8),
            ("device", 0x30, 8),
        ] {
            out.push((format!("queue {q} {name}"), read(f, COMMON + off, len)));
        }
    }
    write(f, COMMON, selects[0], 4);
    write(f, COMMON + 0x08, selects[1], 4);
    write(f, COMMON + 0x16, selects[2], 2);
    for (name, off, len) in [
        ("device_feature_select", 0x00, 4),
        ("driver_feature_select", 0x08, 4),
        ("queue_select", 0x16, 2),
    ] {
        out.push((name.to_string(), read(f, COMMON + off, len)));
    }
    for off in (0..16).step_by(4) {
        out.push((
            format!("device config {off}"),
            read(f, DEVICE_CONFIG + off, 4),
        ));
    }
    for off in (0..3 * 16).step_by(4) {
        out.push((
            format!("MSI-X table {off:#x}"),
            read(f, MSIX_TABLE + off, 4),
        ));
    }
    out.push(("MSI-X PBA".into(), read(f, MSIX_PBA, 8)));
    out.push(("ISR".into(), read(f, ISR, 1)));
    out
}

fn assert_same_registers(restored: &mut VirtioPci, original: &mut VirtioPci) {
    let (a, b) = (dump(restored), dump(original));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "restored (left) and original (right) differ");
    }
}

fn used_idx(vq: &Mock<'_>) -> u16 {
    u16::from_le(vq.used().idx().load())
}

fn wait_used(vq: &Mock<'_>, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(vq) != n {
        assert!(
            Instant::now() < deadline,
            "the device used {} chains, not {n}",
            used_idx(vq)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The used element `i`: (descriptor head, length).
fn used_elem(mem: &GuestMemory, vq: &Mock<'_>, i: u16) -> (u32, u32) {
    let at = vq.used_addr().0 + 4 + 8 * u64::from(i % 16);
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

/// A running probe function whose queue 0 has served one chain, with MSI-X vectors 0 and 1
/// live and 2 masked.
fn busy_probe(mem: &GuestMemory, vq: &Mock<'_>) -> (VirtioPci, Arc<Mutex<ProbeLog>>) {
    let (mut f, log) = probe(mem, Recorder::default());
    enable_msix(&mut f);
    program_vector(&mut f, 0, 0xFEE0_0000, 0x41, false);
    program_vector(&mut f, 1, 0xFEE0_1000, 0x42, false);
    program_vector(&mut f, 2, 0xFEE0_2000, 0x43, true);
    negotiate(&mut f, FEATURES | 1);
    setup_queue(&mut f, 0, vq, 0);
    driver_ok(&mut f);
    assert!(f.is_running());
    vq.add_desc_chains(&[desc(0x8_0000, 64, F_WRITE, 0)], 0)
        .unwrap();
    let mut l = lock(&log);
    let q = &mut l.queues[0];
    let p = chain::pop(q, mem).unwrap().unwrap();
    chain::complete(q, mem, p.head, 64).unwrap();
    drop(l);
    (f, log)
}

#[test]
fn every_register_reads_back_the_same_after_a_restore() {
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (mut f, _) = busy_probe(&mem, &vq);
    // Queue 1 configured but not enabled, with a size no queue can have: it reads back as
    // written, and matters only if the driver enables it.
    write(&mut f, COMMON + 0x16, 1, 2);
    write(&mut f, COMMON + 0x18, 3, 2);
    write(&mut f, COMMON + 0x1A, 1, 2);
    write(&mut f, COMMON + 0x10, 2, 2);
    // A configuration change while its vector is masked: ISR bit, generation, pending bit.
    f.interrupt.signal_config();
    // The PCI-access window pointed at the device configuration.
    let window = f.pci_cfg_cap;
    cfg_write(&mut f, window + 8, &0x2000u32.to_le_bytes());
    cfg_write(&mut f, window + 12, &4u32.to_le_bytes());
    write(&mut f, COMMON, 1, 4);
    write(&mut f, COMMON + 0x08, 1, 4);
    assert!(matches!(f.save(), Err(VirtioStateError::NotQuiesced)));
    f.quiesce(QUIESCE).unwrap();
    assert!(!f.is_running());
    let state = f.save().unwrap();
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.queues[0].next_used, 1);
    assert_eq!(state.msix.pending, vec![1 << 2]);
    let back = through_json(&state);
    assert_eq!(back, state);

    let vectors = Recorder::default();
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let mut g =
        VirtioPci::restore(wiring(Probe(log.clone()), &mem, vectors.clone()), &back).unwrap();
    assert_eq!(
        g.save().unwrap(),
        state,
        "saving again gives the same state"
    );
    assert_same_registers(&mut g, &mut f);
    assert!(!g.is_running(), "parked until the VMM resumes it");
    assert!(
        vectors.log().is_empty(),
        "a restore raises and routes nothing"
    );
    assert_eq!(g.msix_routes().len(), 2, "vectors 0 and 1 are live");

    g.resume();
    assert!(g.is_running());
    let l = lock(&log);
    assert_eq!(l.activations, vec![true]);
    let q = &l.queues[0];
    assert_eq!((q.size(), q.next_avail(), q.next_used()), (16, 1, 1));
    assert!(q.event_idx_enabled());
    // The driver's used_event (0) says it has not looked at the chain used before the
    // snapshot: its interrupt may have been lost, so it comes again, once.
    assert_eq!(vectors.triggers(0), 1);
    assert_eq!(vectors.triggers(1), 0);
}

#[test]
fn quiesce_and_resume_within_a_process_continue_the_queues() {
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (mut f, log) = busy_probe(&mem, &vq);
    let before = dump(&mut f);
    f.quiesce(QUIESCE).unwrap();
    f.quiesce(QUIESCE).unwrap(); // twice is harmless
    assert!(
        lock(&log).queues.is_empty(),
        "the queues are back with the transport"
    );
    f.resume();
    f.resume();
    let after = dump(&mut f);
    let n = before.len() - 1;
    assert_eq!(after[..n], before[..n], "nothing the guest sees changed");
    // But for the ISR: the driver's used_event says it has not seen the used chain, so its
    // interrupt comes again (a spurious one at worst).
    assert_eq!(after[n], ("ISR".into(), 1));
    let l = lock(&log);
    assert_eq!(l.activations, vec![false, true]);
    assert_eq!(l.queues[0].next_avail(), 1);
}

#[test]
fn a_function_saved_before_driver_ok_restores_inactive() {
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (mut f, _) = probe(&mem, Recorder::default());
    negotiate(&mut f, FEATURES);
    setup_queue(&mut f, 0, &vq, 0);
    f.quiesce(QUIESCE).unwrap(); // nothing running: nothing to do
    let state = through_json(&f.save().unwrap());
    let (mut g, log) = restore_probe(&mem, &state).unwrap();
    g.resume();
    assert!(!g.is_running());
    assert!(lock(&log).activations.is_empty());
    assert_same_registers(&mut g, &mut f);
    // The driver goes on where it was: DRIVER_OK starts the device afresh.
    driver_ok(&mut g);
    assert!(g.is_running());
    assert_eq!(lock(&log).activations, vec![false]);
    assert_eq!(status(&mut g), 0xF);
}

#[test]
fn a_function_that_needs_a_reset_still_needs_it_after_a_restore() {
    let mem = memory();
    let (mut f, _) = probe(&mem, Recorder::default());
    negotiate(&mut f, FEATURES);
    // A queue of 3 entries cannot be: DRIVER_OK fails the device.
    write(&mut f, COMMON + 0x18, 3, 2);
    write(&mut f, COMMON + 0x1C, 1, 2);
    driver_ok(&mut f);
    assert_eq!(status(&mut f), 0xF | status::NEEDS_RESET);
    let state = through_json(&f.save().unwrap());
    let (mut g, log) = restore_probe(&mem, &state).unwrap();
    g.resume();
    assert_eq!(status(&mut g), 0xF | status::NEEDS_RESET);
    assert!(lock(&log).activations.is_empty());
    write(&mut g, COMMON + 0x14, 0, 1);
    assert_eq!(status(&mut g), 0);
}

/// A disk of 8 sectors, each filled with its own number, removed on drop.
struct TestDisk(PathBuf);

impl TestDisk {
    fn new(name: &str, sectors: u8) -> TestDisk {
        let path = std::env::temp_dir().join(format!(
            "vmon-virtio-snap-{name}-{}.img",
            std::process::id()
        ));
        let bytes: Vec<u8> = (0..sectors).flat_map(|s| [s; 512]).collect();
        std::fs::write(&path, bytes).unwrap();
        TestDisk(path)
    }

    fn options(&self) -> DiskOptions {
        DiskOptions {
            path: self.0.clone(),
            readonly: false,
            serial: Some("snap".into()),
            direct: false,
            limits: Limits::default(),
            poll: std::time::Duration::ZERO,
            aio: Default::default(),
        }
    }

    fn block(&self) -> Block {
        Block::new(Disk::open(&self.options()).unwrap(), "vda".into())
    }
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where one read request's pieces go in guest memory.
struct Read {
    header: u64,
    data: u64,
    status: u64,
}

impl Read {
    fn at(base: u64) -> Read {
        Read {
            header: base,
            data: base + 0x1000,
            status: base + 0x2000,
        }
    }

    /// Offers a read of `sector` as descriptors `first..first + 3`.
    fn offer(&self, mem: &GuestMemory, vq: &Mock<'_>, first: u16, sector: u64) {
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(self.header)).unwrap();
        mem.write_obj(0xFFu8, GuestAddress(self.status)).unwrap();
        vq.add_desc_chains(
            &[
                desc(self.header, 16, F_NEXT, first + 1),
                desc(self.data, 512, F_NEXT | F_WRITE, first + 2),
                desc(self.status, 1, F_WRITE, 0),
            ],
            first,
        )
        .unwrap();
    }

    fn data(&self, mem: &GuestMemory) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        mem.read_slice(&mut b, GuestAddress(self.data)).unwrap();
        b
    }

    fn status(&self, mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(self.status)).unwrap()
    }
}

/// `block` behind a transport, set up by the driver (with MSI-X vector 0 programmed if
/// `msix`) and running, with a read of sector 1 offered and notified.
fn started_disk(block: Block, mem: &GuestMemory, vq: &Mock<'_>, msix: bool) -> (VirtioPci, Read) {
    let mut f = VirtioPci::new(
        Box::new(block),
        mem.clone(),
        BAR,
        Box::new(Recorder::default()),
    )
    .unwrap();
    if msix {
        enable_msix(&mut f);
        program_vector(&mut f, 0, 0xFEE0_0000, 0x41, false);
    }
    negotiate(&mut f, FEATURES);
    setup_queue(&mut f, 0, vq, 0);
    driver_ok(&mut f);
    let first = Read::at(0x2_0000);
    first.offer(mem, vq, 0, 1);
    write(&mut f, NOTIFY, 0, 2);
    (f, first)
}

#[test]
fn block_requests_are_served_once_across_a_restore() {
    let disk = TestDisk::new("blk", 8);
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (mut f, first) = started_disk(disk.block(), &mem, &vq, true);
    wait_used(&vq, 1);
    assert_eq!((first.status(&mem), first.data(&mem)), (0, vec![1; 512]));

    f.quiesce(QUIESCE).unwrap();
    let json = serde_json::to_string(&f.save().unwrap()).unwrap();
    drop(f); // lets go of the disk's lock, as the old process would
             // Were the first request served again, this would be overwritten.
    mem.write_slice(&[0xEE; 512], GuestAddress(first.data))
        .unwrap();
    // Offered while the VM was being moved: its notification never reaches the new process.
    let second = Read::at(0x3_0000);
    second.offer(&mem, &vq, 3, 3);

    let state: VirtioPciState = serde_json::from_str(&json).unwrap();
    let vectors = Recorder::default();
    let mut g = VirtioPci::restore(wiring(disk.block(), &mem, vectors.clone()), &state).unwrap();
    assert!(vectors.log().is_empty());
    g.resume();
    wait_used(&vq, 2);
    assert_eq!((second.status(&mem), second.data(&mem)), (0, vec![3; 512]));
    assert_eq!(used_elem(&mem, &vq, 1), (3, 513));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&vq), 2, "nothing served twice");
    assert_eq!(first.data(&mem), vec![0xEE; 512]);
    // The first request's interrupt again (the driver had not looked), and none for the
    // second: the driver's used_event asked for none.
    assert_eq!(vectors.triggers(0), 1);

    // Notifications reach the restored device.
    let third = Read::at(0x4_0000);
    third.offer(&mem, &vq, 6, 5);
    write(&mut g, NOTIFY, 0, 2);
    wait_used(&vq, 3);
    assert_eq!((third.status(&mem), third.data(&mem)), (0, vec![5; 512]));
}

#[test]
fn a_block_state_does_not_fit_another_disk() {
    let disk = TestDisk::new("blk-a", 8);
    let other = TestDisk::new("blk-b", 16);
    let saved = disk.block().save_state();
    let mut b = other.block();
    assert!(matches!(
        b.restore_state(&saved),
        Err(DeviceStateError::Mismatch(_))
    ));
    let mut b = disk.block();
    assert_eq!(b.restore_state(&saved), Ok(()));
    assert!(matches!(
        b.restore_state(&DeviceState::Stateless),
        Err(DeviceStateError::WrongKind { .. })
    ));
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmon-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn vsock_tells_the_driver_once_that_its_connections_are_gone() {
    const EVENTS: u64 = 0x2_0000;
    const RX_BUF: u64 = 0x3_0000;
    let dir = Scratch::new("vsock");
    let opts = VsockOptions {
        cid: 3,
        socket: dir.0.join("v.sock"),
    };
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x1_1000), 16);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x1_2000), 16);
    let mut f = VirtioPci::new(
        Box::new(Vsock::new(3, VsockBackend::bind(&opts).unwrap())),
        mem.clone(),
        BAR,
        Box::new(Recorder::default()),
    )
    .unwrap();
    enable_msix(&mut f);
    for v in 0..4 {
        program_vector(&mut f, v, 0xFEE0_0000, 0x40 + v as u32, false);
    }
    negotiate(&mut f, FEATURES);
    for (i, vq) in [&rx, &tx, &ev].into_iter().enumerate() {
        setup_queue(&mut f, i as u16, vq, i as u16);
    }
    // Linux posts its event buffers at probe time, before DRIVER_OK.
    mem.write_slice(&[0xFF; 8], GuestAddress(EVENTS)).unwrap();
    ev.add_desc_chains(
        &[desc(EVENTS, 4, F_WRITE, 0), desc(EVENTS + 4, 4, F_WRITE, 0)],
        0,
    )
    .unwrap();
    rx.add_desc_chains(&[desc(RX_BUF, HEADER_LEN as u32 + 256, F_WRITE, 0)], 0)
        .unwrap();
    driver_ok(&mut f);
    assert!(f.is_running());

    // Within the process, connections survive a pause: nothing to tell the driver.
    f.quiesce(QUIESCE).unwrap();
    f.resume();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&ev), 0);

    f.quiesce(QUIESCE).unwrap();
    let state = through_json(&f.save().unwrap());
    assert_eq!(
        state.device,
        DeviceState::Vsock(crate::vsock::VsockState { cid: 3 })
    );
    drop(f);
    let vectors = Recorder::default();
    let device = Vsock::new(3, VsockBackend::bind(&opts).unwrap());
    let mut g = VirtioPci::restore(wiring(device, &mem, vectors.clone()), &state).unwrap();
    g.resume();
    wait_used(&ev, 1);
    assert_eq!(used_elem(&mem, &ev, 0), (0, 4));
    let mut events = [0u8; 8];
    mem.read_slice(&mut events, GuestAddress(EVENTS)).unwrap();
    assert_eq!(
        events,
        [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF],
        "TRANSPORT_RESET is id 0"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&ev), 1, "exactly one event");
    assert_eq!(vectors.triggers(2), 1, "the event queue's interrupt");

    // New connections work: a host program asks for guest port 1234.
    let mut client = UnixStream::connect(&opts.socket).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    wait_used(&rx, 1);
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw, GuestAddress(RX_BUF)).unwrap();
    let h = Header::parse(&raw).unwrap();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.dst_port),
        (OP_REQUEST, HOST_CID, 3, 1234)
    );
}

#[test]
fn vsock_waits_for_an_event_buffer_to_post_the_reset() {
    const EVENTS: u64 = 0x2_0000;
    let dir = Scratch::new("vsock-late");
    let opts = VsockOptions {
        cid: 3,
        socket: dir.0.join("v.sock"),
    };
    let mem = memory();
    let queues: Vec<Mock<'_>> = (0..3)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 + i * 0x1000), 16))
        .collect();
    let mut f = VirtioPci::new(
        Box::new(Vsock::new(3, VsockBackend::bind(&opts).unwrap())),
        mem.clone(),
        BAR,
        Box::new(Recorder::default()),
    )
    .unwrap();
    negotiate(&mut f, FEATURES);
    for (i, vq) in queues.iter().enumerate() {
        setup_queue(&mut f, i as u16, vq, NO_VECTOR);
    }
    driver_ok(&mut f);
    f.quiesce(QUIESCE).unwrap();
    let state = through_json(&f.save().unwrap());
    drop(f);
    let device = Vsock::new(3, VsockBackend::bind(&opts).unwrap());
    let mut g = VirtioPci::restore(wiring(device, &mem, Recorder::default()), &state).unwrap();
    g.resume();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&queues[2]), 0, "no buffer, no event yet");
    // Still owed after another pause.
    g.quiesce(QUIESCE).unwrap();
    g.resume();
    // A buffer too small for the event goes back empty; the next one carries it.
    queues[2]
        .add_desc_chains(
            &[desc(EVENTS, 2, F_WRITE, 0), desc(EVENTS + 8, 4, F_WRITE, 0)],
            0,
        )
        .unwrap();
    write(&mut g, NOTIFY + 8, 2, 2);
    wait_used(&queues[2], 2);
    assert_eq!(used_elem(&mem, &queues[2], 0), (0, 0));
    assert_eq!(used_elem(&mem, &queues[2], 1), (1, 4));
}

/// A saved busy probe function, and the memory its queue lives in.
fn saved_probe() -> (GuestMemory, VirtioPciState) {
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let (mut f, _) = busy_probe(&mem, &vq);
    f.quiesce(QUIESCE).unwrap();
    let state = f.save().unwrap();
    drop(f);
    (mem, state)
}

#[test]
fn queues_that_do_not_hold_up_against_memory_need_a_reset() {
    let (mem, good) = saved_probe();
    type Edit = fn(&mut QueueSnapshot);
    let cases: [(&str, Edit); 10] = [
        ("size not a power of two", |q| q.size = 3),
        ("size above the maximum", |q| q.size = 32),
        ("size zero", |q| q.size = 0),
        ("a chain in flight", |q| q.next_avail = 2),
        ("indices the used ring does not show", |q| {
            q.next_avail = 5;
            q.next_used = 5;
        }),
        ("indices far beyond the ring", |q| {
            q.next_avail = 40_000;
            q.next_used = 40_000;
        }),
        ("descriptors outside RAM", |q| q.desc_table = 1 << 40),
        ("misaligned descriptors", |q| q.desc_table = 0x1_0001),
        ("used ring across the end of RAM", |q| {
            q.used_ring = 0xF_FFF0
        }),
        ("EVENT_IDX not as negotiated", |q| q.event_idx = false),
    ];
    for (what, edit) in cases {
        let mut s = good.clone();
        edit(&mut s.queues[0]);
        let (mut g, log) = restore_probe(&mem, &through_json(&s)).unwrap();
        g.resume();
        assert_eq!(
            status(&mut g) & status::NEEDS_RESET,
            status::NEEDS_RESET,
            "{what}"
        );
        assert!(lock(&log).activations.is_empty(), "{what}");
        // The driver's way out.
        write(&mut g, COMMON + 0x14, 0, 1);
        assert_eq!(status(&mut g), 0, "{what}");
    }
    // The driver offering more chains than the queue holds.
    let avail_idx = GuestAddress(0x1_0000 + 16 * 16 + 2);
    mem.write_obj(1u16 + 17, avail_idx).unwrap();
    let (mut g, _) = restore_probe(&mem, &good).unwrap();
    g.resume();
    assert_eq!(status(&mut g) & status::NEEDS_RESET, status::NEEDS_RESET);
    mem.write_obj(1u16, avail_idx).unwrap();
    let (mut g, log) = restore_probe(&mem, &good).unwrap();
    g.resume();
    assert!(g.is_running(), "the untouched state resumes");
    assert_eq!(lock(&log).activations, vec![true]);
}

#[test]
fn states_no_such_function_could_have_are_refused() {
    let (mem, good) = saved_probe();
    type Edit = fn(&mut VirtioPciState);
    let cases: [(&str, Edit); 16] = [
        ("device type", |s| s.device_type = 1),
        ("offered features", |s| s.device_features ^= 1 << 5),
        ("queue count", |s| {
            s.queues.pop();
        }),
        ("maximum size", |s| s.queues[1].max_size = 32),
        ("vector count", |s| {
            s.msix.entries.pop();
        }),
        ("queue vector", |s| s.queues[1].msix_vector = 7),
        ("config vector", |s| s.config_msix_vector = 3),
        ("ISR", |s| s.isr = 4),
        ("NEEDS_RESET in the status", |s| s.status |= 0x40),
        ("features never offered", |s| s.driver_features |= 1 << 40),
        ("DRIVER_OK alone", |s| s.status = 0x7),
        ("another device's IDs", |s| s.config_space.regs[0] ^= 1),
        ("short configuration space", |s| {
            s.config_space.regs.truncate(10)
        }),
        ("MSI-X enable out of step", |s| s.msix.enabled = false),
        ("another kind of device", |s| {
            s.device = DeviceState::Vsock(crate::vsock::VsockState { cid: 3 })
        }),
        ("misaligned BAR", |s| s.bar = BAR + 0x100),
    ];
    for (what, edit) in cases {
        let mut s = good.clone();
        edit(&mut s);
        match restore_probe(&mem, &through_json(&s)) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(_) => panic!("{what}: restored"),
        }
    }
}

/// Every number and flag of a saved state set to values around every boundary: each
/// restore fails or yields a function that resumes, answers every register and saves
/// again. None may panic.
#[test]
fn mangled_states_never_panic() {
    let (mem, good) = saved_probe();
    let value = serde_json::to_value(&good).unwrap();
    let mut leaves = Vec::new();
    collect_leaves(&value, String::new(), &mut leaves);
    assert!(leaves.len() > 100, "{} leaves", leaves.len());
    let numbers: [u64; 15] = [
        0,
        1,
        2,
        3,
        15,
        16,
        17,
        0xFF,
        0x100,
        0xFFFF,
        0x1_0000,
        u64::from(u32::MAX),
        1 << 40,
        0xFFFF_FFFF_FFFF_8000,
        u64::MAX,
    ];
    let mut restored = 0;
    for path in &leaves {
        let mut replacements: Vec<serde_json::Value> =
            numbers.iter().map(|&n| serde_json::json!(n)).collect();
        replacements.push(serde_json::json!(true));
        replacements.push(serde_json::json!(false));
        for r in replacements {
            let mut v = value.clone();
            *v.pointer_mut(path).unwrap() = r;
            let Ok(s) = serde_json::from_value::<VirtioPciState>(v) else {
                continue;
            };
            if let Ok((mut g, _)) = restore_probe(&mem, &s) {
                restored += 1;
                g.resume();
                dump(&mut g);
                g.quiesce(QUIESCE).unwrap();
                g.save().unwrap();
            }
        }
    }
    assert!(restored > 100, "only {restored} mangled states restored");
}

fn collect_leaves(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                collect_leaves(v, format!("{path}/{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                collect_leaves(v, format!("{path}/{i}"), out);
            }
        }
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => out.push(path),
        _ => {}
    }
}

#[test]
fn a_disk_whose_storage_does_not_answer_fails_the_pause_and_serves_on() {
    // The "storage" is a pipe: a read stays in flight until the test writes its data.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into an array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nothing else.
    let (storage, answer) = unsafe {
        use std::os::unix::io::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    if let Err(e) = crate::uring::Uring::new(std::os::unix::io::AsRawFd::as_raw_fd(&storage), 8) {
        eprintln!("skipped: this host refuses io_uring: {e}");
        return;
    }
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let disk = Disk::on_file_for_tests(storage, 8);
    let (mut f, first) = started_disk(Block::new(disk, "vda".into()), &mem, &vq, false);
    // Dropped before `f` when a check fails: the stuck read then ends (end of file), and
    // stopping the device does not wait for it forever.
    let mut answer = answer;
    wait_taken(&mem, &vq, 1);

    let asked = Instant::now();
    let refused = f.quiesce(Duration::from_millis(200));
    let waited = asked.elapsed();
    assert_eq!(
        refused.as_ref().map_err(ToString::to_string),
        Err("vda: requests still in flight after 200ms (the storage is not answering)".into())
    );
    assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
    assert!(
        waited < Duration::from_secs(3),
        "the pause hung: {waited:?}"
    );
    assert!(f.is_running(), "the device goes on");
    assert_eq!(status(&mut f) & status::NEEDS_RESET, 0);

    // While the read is still stuck, the device serves what does not need the storage:
    // it went back to serving, not on waiting for the storage.
    let id = 0x5_0000;
    let id_status = 0x5_1000;
    mem.write_slice(
        &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        GuestAddress(id),
    )
    .unwrap();
    mem.write_obj(0xFFu8, GuestAddress(id_status)).unwrap();
    vq.add_desc_chains(
        &[
            desc(id, 16, F_NEXT, 4),
            desc(id + 0x100, 20, F_NEXT | F_WRITE, 5),
            desc(id_status, 1, F_WRITE, 0),
        ],
        3,
    )
    .unwrap();
    write(&mut f, NOTIFY, 0, 2);
    wait_used(&vq, 1);
    assert_eq!(
        used_elem(&mem, &vq, 0),
        (3, 21),
        "the identify request, first"
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(id_status)).unwrap(), 0);
    assert_eq!(first.status(&mem), 0xFF, "the read still waits");

    // The storage answers: the read completes, and the device serves new requests.
    answer.write_all(&[0xA1; 512]).unwrap();
    wait_used(&vq, 2);
    assert_eq!((first.status(&mem), first.data(&mem)), (0, vec![0xA1; 512]));
    let second = Read::at(0x3_0000);
    second.offer(&mem, &vq, 6, 2);
    write(&mut f, NOTIFY, 0, 2);
    answer.write_all(&[0xB2; 512]).unwrap();
    wait_used(&vq, 3);
    assert_eq!(
        (second.status(&mem), second.data(&mem)),
        (0, vec![0xB2; 512])
    );

    // Storage that answers within the time given: the pause waits for it and succeeds.
    let third = Read::at(0x4_0000);
    third.offer(&mem, &vq, 9, 3);
    write(&mut f, NOTIFY, 0, 2);
    wait_taken(&mem, &vq, 4);
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        answer.write_all(&[0xC3; 512]).unwrap();
        answer
    });
    f.quiesce(QUIESCE).unwrap();
    assert!(!f.is_running());
    assert_eq!(used_idx(&vq), 4, "paused with nothing in flight");
    assert_eq!((third.status(&mem), third.data(&mem)), (0, vec![0xC3; 512]));
    let _answer = late.join().unwrap();
    f.resume();
    assert!(f.is_running());
}

/// Waits until the device has taken `n` chains from the 16-entry queue `vq`: with
/// EVENT_IDX, it re-arms notifications at the end of each pass by publishing how far it
/// got (avail_event).
fn wait_taken(mem: &GuestMemory, vq: &Mock<'_>, n: u16) {
    let avail_event = GuestAddress(vq.used_addr().0 + 4 + 8 * 16);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(avail_event).unwrap() != n {
        assert!(Instant::now() < deadline, "the device never took chain {n}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A device whose thread panics at its first notification: a stand-in for a bug a guest
/// reaches. It starts its thread as the real devices do (`Worker::spawn_device`). It has no
/// backend to lose, as rng has none; the others' backends go down with their thread.
#[derive(Default)]
struct Crasher {
    worker: Option<crate::worker::Worker<Vec<Queue>>>,
}

impl VirtioDevice for Crasher {
    fn device_type(&self) -> u16 {
        crate::device_id::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let q = a.queues.into_iter().next().expect("one queue");
        let worker = crate::worker::Worker::spawn_device(
            "crasher".into(),
            a.interrupt,
            move |mut events| {
                events
                    .add(std::os::unix::io::AsRawFd::as_raw_fd(&q.notify), 0, false)
                    .unwrap();
                match events.wait() {
                    crate::worker::Wake::Ready(_) => panic!("a deliberate panic: chain 3"),
                    crate::worker::Wake::Stop => vec![q.queue],
                }
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
    fn pause(&mut self, _: Duration) -> Result<Vec<Queue>, PauseError> {
        let w = self.worker.take().expect("active");
        w.stop().ok_or(PauseError::ThreadDied)
    }
    fn save_state(&self) -> DeviceState {
        DeviceState::Stateless
    }
    fn restore_state(&mut self, _: &DeviceState) -> Result<(), DeviceStateError> {
        Ok(())
    }
    fn metrics(&self) -> Arc<dyn crate::metrics::DeviceMetrics> {
        crate::metrics::CounterSet::new(&[])
    }
}

#[test]
fn a_device_thread_that_panics_fails_its_device_and_nothing_else() {
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let vectors = Recorder::default();
    let mut f = VirtioPci::new(
        Box::new(Crasher::default()),
        mem.clone(),
        BAR,
        Box::new(vectors.clone()),
    )
    .unwrap();
    enable_msix(&mut f);
    program_vector(&mut f, 0, 0xFEE0_0000, 0x41, false);
    program_vector(&mut f, 1, 0xFEE0_1000, 0x42, false);
    write(&mut f, COMMON + 0x10, 1, 2); // configuration changes on vector 1
    negotiate(&mut f, FEATURES);
    setup_queue(&mut f, 0, &vq, 0);
    driver_ok(&mut f);
    assert_eq!(status(&mut f), 0xF);

    // The thread panics. The driver sees DEVICE_NEEDS_RESET and gets a configuration
    // interrupt, instead of a device that went silent.
    write(&mut f, NOTIFY, 0, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut f) & status::NEEDS_RESET == 0 {
        assert!(
            Instant::now() < deadline,
            "the device never reported its failure"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(&mut f), 0xF | status::NEEDS_RESET);
    assert_eq!(vectors.triggers(1), 1, "one configuration interrupt");

    // A snapshot's pause goes ahead (the function is saved as needing a reset) rather than
    // waiting on a thread that is gone.
    let started = Instant::now();
    f.quiesce(QUIESCE).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    let state = through_json(&f.save().unwrap());
    assert!(state.needs_reset);
    f.resume();

    // The driver resets the device and brings it up again. A device with no backend to
    // lose serves again (here, a new thread waiting for its next notification).
    write(&mut f, COMMON + 0x14, 0, 1);
    assert_eq!(status(&mut f), 0);
    negotiate(&mut f, FEATURES);
    setup_queue(&mut f, 0, &vq, 0);
    driver_ok(&mut f);
    assert_eq!(status(&mut f), 0xF);
    assert!(f.is_running());
}
