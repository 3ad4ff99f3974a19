//! What a script needs to drive vmon's virtio-pci devices: the register layout of the
//! device's BAR 0 as vmon lays it out (the virtio capabilities point at these offsets; a
//! script that hard-codes them is checking vmon's layout too), status bits, descriptor
//! flags and the virtio-blk request format. Shared by the hostile-driver tests and the
//! tiny-guest block benchmark.

// Feature bits.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_INDIRECT: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;

// Device status bits.
pub const ACK: u64 = 1;
pub const DRIVER: u64 = 2;
pub const DRIVER_OK: u64 = 4;
pub const FEATURES_OK: u64 = 8;
pub const NEEDS_RESET: u64 = 0x40;
/// The status of a device a driver has finished setting up.
pub const LIVE: u64 = ACK | DRIVER | FEATURES_OK | DRIVER_OK;

// Common configuration registers (BAR0 + 0).
pub const DF_SELECT: u64 = 0x00;
pub const DF: u64 = 0x04;
pub const GF_SELECT: u64 = 0x08;
pub const GF: u64 = 0x0C;
pub const MSIX_CONFIG: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const STATUS: u64 = 0x14;
pub const Q_SELECT: u64 = 0x16;
pub const Q_SIZE: u64 = 0x18;
pub const Q_MSIX: u64 = 0x1A;
pub const Q_ENABLE: u64 = 0x1C;
pub const Q_NOTIFY_OFF: u64 = 0x1E;
pub const Q_DESC: u64 = 0x20;
pub const Q_DRIVER: u64 = 0x28;
pub const Q_DEVICE: u64 = 0x30;
// The other structures in vmon's BAR 0.
pub const ISR: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
/// Queue notifications: queue `q` notifies at `NOTIFY + 4 * q` (vmon's multiplier is 4).
pub const NOTIFY: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;

/// The largest queue vmon's devices offer.
pub const QUEUE_MAX: u16 = 256;

// Descriptor flags.
pub const NEXT: u16 = 1;
pub const W: u16 = 2;
pub const INDIRECT: u16 = 4;

// virtio-blk request types and status values.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u64 = 0;
pub const S_IOERR: u64 = 1;
pub const S_UNSUPP: u64 = 2;
pub const SECTOR: usize = 512;

/// The 16 bytes of descriptor `index` in a table at `table`, as the two 8-byte stores a
/// script makes: (address, value).
pub fn descriptor(
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> [(u64, u64); 2] {
    let at = table + 16 * u64::from(index);
    let rest = u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48;
    [(at, addr), (at + 8, rest)]
}
