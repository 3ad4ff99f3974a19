//! The hostile tiny guest: the script runner (`vmon_tinyguest::script`) drives vmon's
//! virtio-pci devices the way a buggy or malicious driver would: descriptors pointing outside
//! RAM or into MMIO, looping and over-long chains, read-only buffers where the device must
//! write, out-of-range sectors, broken rings, bad queue sizes, feature lies and config-space
//! abuse.
//!
//! Every case checks three things: the device refuses that request (virtio-blk status
//! IOERR/UNSUPP, or a used length of 0) or sets DEVICE_NEEDS_RESET; vmon keeps running (the
//! script goes on and exits 0); and a well-formed request afterwards (after a reset where the
//! device asked for one) works again, checked byte for byte against the disk image.
//!
//! vmon runs with `--disk rw.img --disk ro.img,readonly=on --rng`, so PCI bus 0 holds the
//! writable disk in slot 1, the read-only disk in slot 2 and the rng in slot 3, with their
//! BARs allocated in that order from the bottom of the MMIO hole. MSI-X stays disabled
//! unless a case enables it, so completions are found by polling the used ring.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kvm_available, run_vmon, Output, Scratch};
use vmon_tinyguest::script::{pci_address, Script, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
use vmon_tinyguest::virtio::*;

const T: Duration = Duration::from_secs(60);
/// Guest RAM (`--memory 64M`): one range from 0 (below the MMIO hole).
const RAM_END: u64 = 64 << 20;
const DISK_BYTES: usize = 1 << 20;
const SECTORS: u64 = (DISK_BYTES / SECTOR) as u64;

/// Polls of the used ring (each ~one VM exit) before giving up on a completion.
const POLLS: u32 = 200_000;
/// Polls for "nothing happens": long enough for the device thread to have acted.
const QUIET_POLLS: u32 = 2_000;

#[derive(Clone, Copy, Debug)]
struct Dev {
    slot: u8,
    bar: u64,
    /// The device's feature bits as it offers them.
    features: u64,
}

/// virtio-blk: SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES plus the common features.
const BLK: Dev = Dev {
    slot: 1,
    bar: 0xC000_0000,
    features: F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 13 | 1 << 14,
};
/// The read-only disk offers RO instead of DISCARD and WRITE_ZEROES.
const BLK_RO: Dev = Dev {
    slot: 2,
    bar: 0xC000_8000,
    features: F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1 << 2 | 1 << 5 | 1 << 6 | 1 << 9,
};
const RNG: Dev = Dev {
    slot: 3,
    bar: 0xC001_0000,
    features: F_VERSION_1 | F_INDIRECT | F_EVENT_IDX,
};

// Guest RAM the requests use (all above SCRIPT_FREE_RAM, 0x200000).
const HDR: u64 = 0x30_0000;
const DATA: u64 = 0x31_0000;
const DATA2: u64 = 0x31_8000;
const STATUS_BUF: u64 = 0x32_0000;
const TABLE: u64 = 0x33_0000;
/// Each device's rings: descriptor table, available ring, used ring.
fn rings(dev: Dev) -> (u64, u64, u64) {
    let base = 0x40_0000 + u64::from(dev.slot) * 0x1_0000;
    (base, base + 0x1000, base + 0x2000)
}

/// What one output line of the runner should be.
enum Line {
    Val(u64),
    /// Any value line (random bytes).
    Any,
    Text(String),
}

/// A virtio driver written as a script, with the output it should produce.
struct Driver {
    s: Script,
    want: Vec<Line>,
    dev: Dev,
    qsize: u16,
    /// The driver's available index and the used index it has seen.
    avail: u16,
    used: u16,
}

impl Driver {
    fn new() -> Self {
        Driver {
            s: Script::new(),
            want: Vec::new(),
            dev: BLK,
            qsize: QUEUE_MAX,
            avail: 0,
            used: 0,
        }
    }

    fn text(&mut self, t: &str) {
        assert!(!t.contains('\n'));
        self.s.print(format!("{t}\n"));
        self.want.push(Line::Text(t.into()));
    }

    // ---- RAM ----

    fn write(&mut self, size: u8, addr: u64, value: u64) {
        self.s.write(size, addr, value);
    }

    fn read(&mut self, size: u8, addr: u64, want: u64) {
        self.s.read(size, addr);
        self.want.push(Line::Val(want));
    }

    fn read_any(&mut self, size: u8, addr: u64) {
        self.s.read(size, addr);
        self.want.push(Line::Any);
    }

    /// Checks `bytes` at `addr`, eight at a time.
    fn expect_bytes(&mut self, addr: u64, bytes: &[u8]) {
        for (i, q) in bytes.chunks(8).enumerate() {
            let mut v = [0u8; 8];
            v[..q.len()].copy_from_slice(q);
            let size = q.len().next_power_of_two() as u8;
            assert_eq!(size as usize, q.len(), "expect_bytes takes whole accesses");
            self.read(size, addr + 8 * i as u64, u64::from_le_bytes(v));
        }
    }

    // ---- PCI configuration space ----

    fn cfg_select(&mut self, slot: u8, reg: u8) {
        self.s
            .outp(4, PCI_CONFIG_ADDRESS, pci_address(0, slot, 0, reg));
    }

    fn cfg_read(&mut self, size: u8, slot: u8, reg: u8, want: u64) {
        self.cfg_select(slot, reg);
        self.s.inp(size, PCI_CONFIG_DATA + u16::from(reg & 3));
        self.want.push(Line::Val(want));
    }

    fn cfg_write(&mut self, size: u8, slot: u8, reg: u8, value: u32) {
        self.cfg_select(slot, reg);
        self.s
            .outp(size, PCI_CONFIG_DATA + u16::from(reg & 3), value);
    }

    // ---- the BAR of the current device ----

    fn bar_read(&mut self, size: u8, offset: u64, want: u64) {
        self.s.read_rel(size, offset);
        self.want.push(Line::Val(want));
    }

    fn bar_write(&mut self, size: u8, offset: u64, value: u64) {
        self.s.write_rel(size, offset, value);
    }

    fn status_is(&mut self, want: u64) {
        self.bar_read(1, STATUS, want);
    }

    /// Waits for the device to set DEVICE_NEEDS_RESET on top of `before`.
    fn expect_needs_reset(&mut self, before: u64) {
        self.s.wait_ne_rel(1, STATUS, before, POLLS);
        self.want.push(Line::Val(before | NEEDS_RESET));
    }

    /// Makes `dev` the current device: its BAR becomes the base register (checking vmon put
    /// it where these tests expect), and memory decoding and bus mastering are turned on.
    fn attach(&mut self, dev: Dev) {
        self.dev = dev;
        self.s.base_from_bar0(0, dev.slot, 0);
        self.want.push(Line::Val(dev.bar));
        self.cfg_write(2, dev.slot, 0x04, 0x0006);
    }

    fn reset(&mut self) {
        self.bar_write(1, STATUS, 0);
        self.status_is(0);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, and the feature words both ways; then FEATURES_OK, which
    /// sticks only for an honest `accept`.
    fn negotiate(&mut self, accept: u64) -> bool {
        self.reset();
        self.bar_write(1, STATUS, ACK);
        self.bar_write(1, STATUS, ACK | DRIVER);
        self.status_is(ACK | DRIVER);
        let offered = self.dev.features;
        for word in 0..2 {
            self.bar_write(4, DF_SELECT, word);
            self.bar_read(4, DF, (offered >> (32 * word)) & 0xFFFF_FFFF);
        }
        for word in 0..2 {
            self.bar_write(4, GF_SELECT, word);
            self.bar_write(4, GF, (accept >> (32 * word)) & 0xFFFF_FFFF);
        }
        self.bar_write(1, STATUS, ACK | DRIVER | FEATURES_OK);
        let honest = accept & !offered == 0 && accept & F_VERSION_1 != 0;
        self.status_is(if honest {
            ACK | DRIVER | FEATURES_OK
        } else {
            ACK | DRIVER
        });
        honest
    }

    /// Programs queue 0 with `size` entries on the device's rings (zeroing their indices).
    fn queue(&mut self, size: u16) {
        let (desc, avail, used) = rings(self.dev);
        self.queue_at(size, desc, avail, used);
    }

    fn queue_at(&mut self, size: u16, desc: u64, avail: u64, used: u64) {
        for addr in [avail, used] {
            if addr + 4 <= RAM_END {
                self.write(4, addr, 0);
            }
        }
        self.qsize = size;
        self.avail = 0;
        self.used = 0;
        self.bar_write(2, Q_SELECT, 0);
        self.bar_read(2, Q_SIZE, u64::from(QUEUE_MAX));
        self.bar_write(2, Q_SIZE, u64::from(size));
        for (reg, addr) in [(Q_DESC, desc), (Q_DRIVER, avail), (Q_DEVICE, used)] {
            self.bar_write(4, reg, addr & 0xFFFF_FFFF);
            self.bar_write(4, reg + 4, addr >> 32);
        }
        self.bar_write(2, Q_ENABLE, 1);
        self.bar_read(2, Q_ENABLE, 1);
    }

    fn driver_ok(&mut self) {
        self.bar_write(1, STATUS, LIVE);
    }

    /// The whole initialisation of `dev` with VERSION_1 (plus `extra` features) and a queue
    /// of `size`.
    fn init(&mut self, dev: Dev, extra: u64, size: u16) {
        self.attach(dev);
        assert!(self.negotiate(F_VERSION_1 | extra));
        self.queue(size);
        self.driver_ok();
        self.status_is(LIVE);
    }

    // ---- descriptors and rings ----

    fn desc_at(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        for (at, value) in descriptor(table, i, addr, len, flags, next) {
            self.write(8, at, value);
        }
    }

    fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let table = rings(self.dev).0;
        self.desc_at(table, i, addr, len, flags, next);
    }

    /// Writes `bufs` (address, length, WRITE or 0) as descriptors 0..n chained in order;
    /// the head is 0.
    fn chain(&mut self, bufs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = i as u16;
            let last = usize::from(i) + 1 == bufs.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | NEXT, i + 1)
            };
            self.desc(i, addr, len, flags, next);
        }
    }

    /// Puts `head` on the available ring (without notifying).
    fn offer(&mut self, head: u16) {
        let avail = rings(self.dev).1;
        let slot = u64::from(self.avail % self.qsize);
        self.write(2, avail + 4 + 2 * slot, u64::from(head));
        self.avail = self.avail.wrapping_add(1);
        self.write(2, avail + 2, u64::from(self.avail));
    }

    fn notify(&mut self) {
        self.bar_write(2, NOTIFY, 0);
    }

    /// Waits until the used index moves past what we have seen.
    fn wait_used(&mut self) {
        let used = rings(self.dev).2;
        self.s.wait_ne(2, used + 2, u64::from(self.used), POLLS);
        self.used = self.used.wrapping_add(1);
        self.want.push(Line::Val(u64::from(self.used)));
    }

    /// Checks the used element the device returned last.
    fn used_elem(&mut self, id: u16, len: u32) {
        let used = rings(self.dev).2;
        let slot = u64::from(self.used.wrapping_sub(1) % self.qsize);
        self.read(4, used + 4 + 8 * slot, u64::from(id));
        self.read(4, used + 8 + 8 * slot, u64::from(len));
    }

    /// Offers `head`, notifies and checks the device returned it with `len` bytes written.
    fn submit(&mut self, head: u16, len: u32) {
        self.offer(head);
        self.notify();
        self.wait_used();
        self.used_elem(head, len);
    }

    /// Checks the used index stays where it is for a while: nothing was completed.
    fn expect_no_completion(&mut self) {
        let used = rings(self.dev).2;
        self.s
            .wait_ne(2, used + 2, u64::from(self.used), QUIET_POLLS);
        self.want.push(Line::Val(u64::from(self.used)));
    }

    // ---- virtio-blk ----

    fn header(&mut self, kind: u32, sector: u64) {
        self.write(8, HDR, u64::from(kind));
        self.write(8, HDR + 8, sector);
        self.write(1, STATUS_BUF, 0xFF);
    }

    /// A read of `sector` that must work: status OK, the data byte for byte as in `image`.
    fn good_read(&mut self, sector: u64, image: &[u8]) {
        self.s.fill(DATA, SECTOR as u64, 0xEE);
        self.header(T_IN, sector);
        self.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
        self.submit(0, 513);
        self.read(1, STATUS_BUF, S_OK);
        self.expect_sector(DATA, image, sector);
    }

    fn expect_sector(&mut self, addr: u64, image: &[u8], sector: u64) {
        let at = sector as usize * SECTOR;
        self.expect_bytes(addr, &image[at..at + SECTOR]);
    }

    /// Submits the chain already written at descriptor 0 and checks the used length and
    /// the status byte (0xFF: the device did not write it).
    fn blk_expect(&mut self, used_len: u32, status: u64) {
        self.write(1, STATUS_BUF, 0xFF);
        self.submit(0, used_len);
        self.read(1, STATUS_BUF, status);
    }

    /// A request of `kind` at `sector` with `data` as its payload buffers; checks that the
    /// device answered `status` with `used_len` bytes written.
    fn blk(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, u16)],
        used_len: u32,
        status: u64,
    ) {
        self.header(kind, sector);
        let mut bufs = vec![(HDR, 16, 0)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS_BUF, 1, W));
        self.chain(&bufs);
        self.blk_expect(used_len, status);
    }

    /// The script's last words: vmon must still be running to print them.
    fn done(&mut self) {
        self.text("done");
    }

    /// The output the script must produce, given what it printed (for the `Any` lines).
    fn expected_output(&self, actual: &str) -> String {
        let mut lines = actual.lines();
        let mut out = String::new();
        for w in &self.want {
            let got = lines.next().unwrap_or("");
            match w {
                Line::Val(v) => out.push_str(&format!("{v:016x}\n")),
                Line::Any if got.len() == 16 && got.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    out.push_str(got);
                    out.push('\n');
                }
                Line::Any => out.push_str("<any value line>\n"),
                Line::Text(t) => {
                    out.push_str(t);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// A disk image whose every byte is known: a hash of its offset and `seed`.
fn image(seed: u64) -> Vec<u8> {
    (0..DISK_BYTES as u64)
        .map(|i| ((i ^ seed << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

struct Run {
    out: Output,
    /// The disks' contents after vmon exited.
    rw: Vec<u8>,
    ro: Vec<u8>,
}

/// Runs `d`'s script under vmon with the two disks (contents `rw` and `ro`) and the rng,
/// and checks the output line by line and the exit status.
fn run(name: &str, d: &Driver, rw: &[u8], ro: &[u8]) -> Run {
    let dir = Scratch::new(name);
    let kernel = dir.file("guest", &vmon_tinyguest::script_elf(&d.s));
    let rw_path: PathBuf = dir.file("rw.img", rw);
    let ro_path: PathBuf = dir.file("ro.img", ro);
    let out = run_vmon(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            // The writable disk spins between requests (`poll_us`), so every hostile case
            // also meets a device that looks at the ring without a notify; and it is opened
            // with O_DIRECT, so its reads and writes go through io_uring (in flight while
            // the driver misbehaves) and unaligned guest buffers through the bounce path.
            // The read-only disk keeps the page cache, served synchronously.
            "--disk",
            &format!("path={},poll_us=50,direct=on", rw_path.display()),
            "--disk",
            &format!("path={},readonly=on", ro_path.display()),
            "--rng",
        ],
        T,
    );
    let expected = d.expected_output(&out.stdout);
    if out.stdout != expected {
        panic!(
            "{name}: guest output differs from what the script expects\n{}\nstderr:\n{}",
            first_difference(&out.stdout, &expected),
            out.stderr
        );
    }
    assert_eq!(
        out.code(),
        0,
        "{name}: exit status; stderr:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!out.stderr.contains("ERROR"), "{}", out.stderr);
    eprintln!("{name}: {:?}", out.elapsed);
    Run {
        out,
        rw: std::fs::read(&rw_path).unwrap(),
        ro: std::fs::read(&ro_path).unwrap(),
    }
}

/// The first line where `actual` and `expected` part, with the lines before it (the last
/// text line names the case).
fn first_difference(actual: &str, expected: &str) -> String {
    let (a, e): (Vec<&str>, Vec<&str>) = (actual.lines().collect(), expected.lines().collect());
    let at = (0..a.len().max(e.len()))
        .find(|&i| a.get(i) != e.get(i))
        .unwrap_or(0);
    let from = at.saturating_sub(8);
    let mut report = String::new();
    for (i, line) in a.iter().enumerate().take(at).skip(from) {
        report.push_str(&format!("  {i:4}   {line}\n"));
    }
    report.push_str(&format!(
        "  {at:4} got      {}\n       expected {}\n",
        a.get(at).unwrap_or(&"<end of output>"),
        e.get(at).unwrap_or(&"<end of output>")
    ));
    report
}

macro_rules! require_kvm {
    () => {
        if !kvm_available(module_path!()) {
            return;
        }
    };
}

/// How many times `needle` appears in vmon's log.
fn count(out: &Output, needle: &str) -> usize {
    out.stderr.matches(needle).count()
}

const NEEDS_RESET_LOG: &str = "virtio device needs reset";

#[test]
fn well_formed_requests_work() {
    require_kvm!();
    let (rw, ro) = (image(1), image(2));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    d.text("read");
    d.good_read(3, &rw);
    d.good_read(SECTORS - 1, &rw);
    d.text("write");
    d.s.fill(DATA2, 1024, 0xAB);
    d.blk(T_OUT, 5, &[(DATA2, 1024, 0)], 1, S_OK);
    d.good_read(5, &{
        let mut after = rw.clone();
        after[5 * SECTOR..7 * SECTOR].fill(0xAB);
        after
    });
    d.text("flush");
    d.blk(T_FLUSH, 0, &[], 1, S_OK);
    d.text("get id");
    d.s.fill(DATA, 24, 0xEE);
    d.blk(T_GET_ID, 0, &[(DATA, 20, W)], 21, S_OK);
    d.read(8, DATA, 0);
    d.text("read-only disk");
    d.init(BLK_RO, 0, QUEUE_MAX);
    d.good_read(7, &ro);
    d.done();
    let r = run("hostile-baseline", &d, &rw, &ro);
    let mut want = rw.clone();
    want[5 * SECTOR..7 * SECTOR].fill(0xAB);
    assert!(r.rw == want, "the write reached the image");
    assert!(r.ro == ro);
}

#[test]
fn buffers_outside_guest_ram_are_refused() {
    require_kvm!();
    let (rw, ro) = (image(3), image(4));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    let cases: [(&str, u64); 6] = [
        ("beyond the end of RAM", 0x3FFF_0000),
        ("straddling the end of RAM", RAM_END - 8),
        ("in the MMIO hole", 0xD000_0000),
        (
            "at the start of the MMIO hole (the disk's own BAR)",
            0xC000_0000,
        ),
        ("the disk's notify area", BLK.bar + NOTIFY),
        ("the LAPIC", 0xFEE0_0000),
    ];
    for (what, addr) in cases {
        d.text(what);
        // As the data buffer of a read, as the header, and as the status buffer.
        d.blk(T_IN, 0, &[(addr, 512, W)], 0, 0xFF);
        d.chain(&[(addr, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
        d.blk_expect(0, 0xFF);
        d.header(T_IN, 0);
        d.chain(&[(HDR, 16, 0), (DATA, 512, W), (addr, 16, W)]);
        d.blk_expect(0, 0xFF);
        // A write whose data would come from there.
        d.blk(T_OUT, 9, &[(addr, 512, 0)], 0, 0xFF);
    }
    d.text("a 64-bit address far away, and one that wraps");
    d.blk(T_IN, 0, &[(0x7FFF_0000_0000, 512, W)], 0, 0xFF);
    d.blk(T_IN, 0, &[(u64::MAX - 255, 512, W)], 0, 0xFF);
    d.text("still works");
    d.good_read(10, &rw);
    d.done();
    let r = run("hostile-outside-ram", &d, &rw, &ro);
    assert!(r.rw == rw, "no write reached the image");
}

#[test]
fn looping_and_dangling_chains_are_refused() {
    require_kvm!();
    let (rw, ro) = (image(5), image(6));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    d.header(T_IN, 1);
    // The loops are all device-writable, so only their length gives them away.
    d.text("a -> b -> a");
    d.desc(0, DATA, 512, W | NEXT, 1);
    d.desc(1, DATA2, 512, W | NEXT, 0);
    d.blk_expect(0, 0xFF);
    d.text("self loop");
    d.desc(0, DATA, 512, W | NEXT, 0);
    d.blk_expect(0, 0xFF);
    d.text("a loop further down the chain");
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, DATA, 512, W | NEXT, 2);
    d.desc(2, STATUS_BUF, 1, W | NEXT, 1);
    d.blk_expect(0, 0xFF);
    d.text("next index = queue size, and 0xffff");
    for next in [QUEUE_MAX, 0xFFFF] {
        d.desc(0, HDR, 16, NEXT, 1);
        d.desc(1, DATA, 512, W | NEXT, next);
        d.blk_expect(0, 0xFF);
    }
    d.text("a small queue: a loop is cut at its size");
    d.queue_reinit(16);
    d.header(T_IN, 1);
    for i in 0..16 {
        d.desc(i, DATA, 512, W | NEXT, (i + 1) % 16);
    }
    d.blk_expect(0, 0xFF);
    d.text("next index past a small queue, inside the table memory");
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, DATA, 512, W | NEXT, 16);
    d.desc(16, STATUS_BUF, 1, W, 0);
    d.blk_expect(0, 0xFF);
    d.text("still works");
    d.good_read(11, &rw);
    d.done();
    run("hostile-loops", &d, &rw, &ro);
}

impl Driver {
    /// Reset and initialise the current device again with a queue of `size`.
    fn queue_reinit(&mut self, size: u16) {
        let dev = self.dev;
        assert!(self.negotiate(F_VERSION_1 | (dev.features & F_INDIRECT)));
        self.queue(size);
        self.driver_ok();
        self.status_is(LIVE);
    }
}

#[test]
fn chains_longer_than_the_queue_are_refused() {
    require_kvm!();
    let (rw, ro) = (image(7), image(8));
    let mut d = Driver::new();
    d.init(BLK, F_INDIRECT, QUEUE_MAX);
    let max = QUEUE_MAX;

    d.text("an indirect table of twice the queue size, all chained");
    d.header(T_IN, 0);
    d.desc_at(TABLE, 0, HDR, 16, NEXT, 1);
    for i in 1..2 * max - 1 {
        d.desc_at(TABLE, i, DATA, 512, W | NEXT, i + 1);
    }
    d.desc_at(TABLE, 2 * max - 1, STATUS_BUF, 1, W, 0);
    d.desc(0, TABLE, 2 * u32::from(max) * 16, INDIRECT, 0);
    d.blk_expect(0, 0xFF);

    d.text("one more than the queue size");
    d.desc_at(TABLE, max, STATUS_BUF, 1, W, 0);
    d.desc(0, TABLE, (u32::from(max) + 1) * 16, INDIRECT, 0);
    d.blk_expect(0, 0xFF);

    d.text("direct descriptors before an indirect table, together too long");
    d.desc_at(TABLE, max - 1, STATUS_BUF, 1, W, 0);
    d.desc_at(TABLE, 0, DATA, 512, W | NEXT, 1);
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, TABLE, u32::from(max) * 16, INDIRECT, 0);
    d.blk_expect(0, 0xFF);

    d.text("exactly the queue size: header, 254 sectors, status");
    d.header(T_IN, 0);
    d.desc_at(TABLE, 0, HDR, 16, NEXT, 1);
    // Every sector lands in the same buffer: it ends up holding the last one.
    for i in 1..max - 1 {
        d.desc_at(TABLE, i, DATA, 512, W | NEXT, i + 1);
    }
    d.desc_at(TABLE, max - 1, STATUS_BUF, 1, W, 0);
    d.desc(0, TABLE, u32::from(max) * 16, INDIRECT, 0);
    d.blk_expect(254 * 512 + 1, S_OK);
    d.expect_sector(DATA, &rw, 253);

    d.text("an indirect cycle");
    d.desc_at(TABLE, 0, HDR, 16, NEXT, 1);
    d.desc_at(TABLE, 1, DATA, 512, W | NEXT, 2);
    d.desc_at(TABLE, 2, STATUS_BUF, 1, W | NEXT, 0);
    d.desc(0, TABLE, 3 * 16, INDIRECT, 0);
    d.blk_expect(0, 0xFF);

    d.text("an indirect next index past its table");
    d.desc_at(TABLE, 2, STATUS_BUF, 1, W | NEXT, 3);
    d.blk_expect(0, 0xFF);

    d.text("nested indirect, a ragged table, an empty table, a table outside RAM");
    d.desc_at(TABLE, 0, TABLE + 0x1000, 48, INDIRECT, 0);
    d.desc(0, TABLE, 16, INDIRECT, 0);
    d.blk_expect(0, 0xFF);
    d.desc_at(TABLE, 0, HDR, 16, NEXT, 1);
    d.desc_at(TABLE, 2, STATUS_BUF, 1, W, 0);
    for (addr, len) in [
        (TABLE, 40),
        (TABLE, 0),
        (0xD000_0000, 48),
        (RAM_END - 16, 48),
    ] {
        d.desc(0, addr, len, INDIRECT, 0);
        d.blk_expect(0, 0xFF);
    }

    d.text("a well-formed indirect request");
    d.header(T_IN, 12);
    d.desc(0, TABLE, 48, INDIRECT, 0);
    d.blk_expect(513, S_OK);
    d.expect_sector(DATA, &rw, 12);
    d.text("still works");
    d.good_read(13, &rw);
    d.done();
    run("hostile-long-chains", &d, &rw, &ro);
}

#[test]
fn zero_and_huge_lengths_are_refused() {
    require_kvm!();
    let (rw, ro) = (image(9), image(10));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    d.text("zero-length header");
    d.header(T_IN, 0);
    d.chain(&[(HDR, 0, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    d.blk_expect(1, S_IOERR);
    d.text("every descriptor zero-length");
    d.chain(&[(HDR, 0, 0), (DATA, 0, W), (STATUS_BUF, 0, W)]);
    d.blk_expect(0, 0xFF);
    d.text("zero-length status: the last data byte becomes the status");
    d.s.fill(DATA, 512, 0xEE);
    d.header(T_IN, 0);
    d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 0, W)]);
    d.blk_expect(1, 0xFF);
    d.read(1, DATA + 511, S_IOERR);
    d.text("a zero-length buffer inside a good request is harmless");
    d.s.fill(DATA, 512, 0xEE);
    d.header(T_IN, 14);
    d.chain(&[
        (HDR, 16, 0),
        (DATA2, 0, W),
        (DATA, 512, W),
        (STATUS_BUF, 1, W),
    ]);
    d.blk_expect(513, S_OK);
    d.expect_sector(DATA, &rw, 14);
    d.text("0xffffffff-byte buffers");
    d.blk(T_IN, 0, &[(DATA, u32::MAX, W)], 0, 0xFF);
    d.blk(T_OUT, 0, &[(DATA, u32::MAX, 0)], 0, 0xFF);
    d.header(T_IN, 0);
    d.chain(&[(HDR, u32::MAX, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    d.blk_expect(0, 0xFF);
    d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, u32::MAX, W)]);
    d.blk_expect(0, 0xFF);
    d.text("two halves of 4 GiB");
    d.blk(
        T_IN,
        0,
        &[(0x10_0000, 0x8000_0000, W), (0x10_0000, 0x8000_0000, W)],
        0,
        0xFF,
    );
    d.text("a 32 MiB buffer inside RAM: past the end of the disk");
    d.blk(T_IN, 0, &[(0x100_0000, 32 << 20, W)], 1, S_IOERR);
    d.blk(T_OUT, 0, &[(0x100_0000, 32 << 20, 0)], 1, S_IOERR);
    d.text("still works");
    d.good_read(15, &rw);
    d.done();
    let r = run("hostile-lengths", &d, &rw, &ro);
    assert!(r.rw == rw, "no write reached the image");
}

#[test]
fn buffers_with_the_wrong_direction_are_refused() {
    require_kvm!();
    let (rw, ro) = (image(11), image(12));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    d.text("read into a device-readable buffer");
    d.s.fill(DATA, 512, 0xEE);
    d.blk(T_IN, 16, &[(DATA, 512, 0)], 1, S_IOERR);
    d.read(8, DATA, 0xEEEE_EEEE_EEEE_EEEE);
    d.text("read into a buffer half readable, half writable");
    d.blk(T_IN, 16, &[(DATA, 512, 0), (DATA2, 512, W)], 1, S_IOERR);
    d.text("get-id into a device-readable buffer");
    d.blk(T_GET_ID, 0, &[(DATA, 20, 0)], 1, S_IOERR);
    d.read(8, DATA, 0xEEEE_EEEE_EEEE_EEEE);
    d.text("read with a device-readable status byte");
    d.header(T_IN, 16);
    d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, 0)]);
    d.blk_expect(0, 0xFF);
    d.read(8, DATA, 0xEEEE_EEEE_EEEE_EEEE);
    d.text("nothing writable at all");
    d.header(T_IN, 16);
    d.chain(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS_BUF, 1, 0)]);
    d.blk_expect(0, 0xFF);
    d.text("a writable header");
    d.header(T_IN, 16);
    d.chain(&[(HDR, 16, W), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    d.blk_expect(1, S_IOERR);
    d.text("a write whose data is device-writable");
    d.s.fill(DATA, 512, 0x77);
    d.blk(T_OUT, 16, &[(DATA, 512, W)], 1, S_IOERR);
    d.text("discard with device-writable segments");
    d.write(8, DATA, 16);
    d.write(8, DATA + 8, 1);
    d.blk(T_DISCARD, 0, &[(DATA, 16, W)], 1, S_IOERR);
    d.text("still works");
    d.good_read(16, &rw);
    d.done();
    let r = run("hostile-directions", &d, &rw, &ro);
    assert!(r.rw == rw, "no write reached the image");
}

#[test]
fn bad_sectors_types_and_read_only_disks_fail_the_request() {
    require_kvm!();
    let (rw, ro) = (image(13), image(14));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    d.text("reads past the end of the disk");
    d.blk(T_IN, SECTORS - 1, &[(DATA, 1024, W)], 1, S_IOERR);
    d.blk(T_IN, SECTORS, &[(DATA, 512, W)], 1, S_IOERR);
    d.blk(T_IN, u64::MAX, &[(DATA, 512, W)], 1, S_IOERR);
    d.blk(T_IN, u64::MAX / 512, &[(DATA, 512, W)], 1, S_IOERR);
    d.text("a write past the end");
    d.s.fill(DATA, 1024, 0x5A);
    d.blk(T_OUT, SECTORS - 1, &[(DATA, 1024, 0)], 1, S_IOERR);
    d.text("a partial sector");
    d.blk(T_IN, 0, &[(DATA, 100, W)], 1, S_IOERR);
    d.blk(T_OUT, 0, &[(DATA, 100, 0)], 1, S_IOERR);
    d.text("a short header");
    d.header(T_IN, 0);
    d.chain(&[(HDR, 8, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    d.blk_expect(1, S_IOERR);
    d.text("unknown request types");
    for kind in [2, 3, 0xFF, 0x8000_0000] {
        d.blk(kind, 0, &[(DATA, 512, W)], 1, S_UNSUPP);
    }
    d.text("discard and write-zeroes past the end, with bad flags, too many segments");
    for (kind, sector, count, flags, status) in [
        (T_DISCARD, SECTORS - 1, 2, 0, S_IOERR),
        (T_WRITE_ZEROES, SECTORS, 1, 0, S_IOERR),
        (T_DISCARD, 0, 1, 1, S_UNSUPP),
        (T_WRITE_ZEROES, 0, 1, 2, S_UNSUPP),
        (T_DISCARD, u64::MAX, 1, 0, S_IOERR),
    ] {
        d.write(8, DATA, sector);
        d.write(8, DATA + 8, count | flags << 32);
        d.blk(kind, 0, &[(DATA, 16, 0)], 1, status);
    }
    d.blk(T_DISCARD, 0, &[(DATA, 15, 0)], 1, S_IOERR);
    d.blk(T_DISCARD, 0, &[(DATA, 33 * 16, 0)], 1, S_IOERR);
    d.text("still works");
    d.good_read(SECTORS - 1, &rw);

    d.text("the read-only disk");
    d.init(BLK_RO, 0, QUEUE_MAX);
    d.s.fill(DATA, 512, 0x5A);
    d.blk(T_OUT, 0, &[(DATA, 512, 0)], 1, S_IOERR);
    d.write(8, DATA, 0);
    d.write(8, DATA + 8, 8);
    d.blk(T_DISCARD, 0, &[(DATA, 16, 0)], 1, S_IOERR);
    d.blk(T_WRITE_ZEROES, 0, &[(DATA, 16, 0)], 1, S_IOERR);
    d.blk(T_FLUSH, 0, &[], 1, S_OK);
    d.good_read(0, &ro);
    d.done();
    let r = run("hostile-sectors", &d, &rw, &ro);
    assert!(r.rw == rw, "no write reached the writable image");
    assert!(r.ro == ro, "the read-only image is byte-identical");
}

#[test]
fn notifications_before_driver_ok_are_not_served() {
    require_kvm!();
    let (rw, ro) = (image(15), image(16));
    let mut d = Driver::new();
    d.attach(BLK);
    d.text("notify right after reset, with a request-like ring at address 0");
    // Unconfigured queue addresses are 0: make RAM there look like a ring with work on it.
    d.write(8, 0, 0x0001_0000);
    d.reset();
    d.notify();
    d.bar_write(2, NOTIFY + 4, 1); // a queue the disk does not have
    d.bar_write(4, NOTIFY + 0xFFC, 0xFFFF_FFFF);
    d.s.wait_ne(8, 0, 0x0001_0000, QUIET_POLLS);
    d.want.push(Line::Val(0x0001_0000));
    d.status_is(0);
    d.text("notify with the queue set up but before DRIVER_OK");
    assert!(d.negotiate(F_VERSION_1));
    d.queue(QUEUE_MAX);
    d.notify();
    d.header(T_IN, 20);
    d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    d.s.fill(DATA, 512, 0xEE);
    d.offer(0);
    d.notify();
    d.expect_no_completion();
    d.read(1, STATUS_BUF, 0xFF);
    d.read(8, DATA, 0xEEEE_EEEE_EEEE_EEEE);
    d.read(8, 0, 0x0001_0000);
    d.status_is(ACK | DRIVER | FEATURES_OK);
    d.text("DRIVER_OK: the request already offered is served now");
    d.driver_ok();
    d.status_is(LIVE);
    d.wait_used();
    d.used_elem(0, 513);
    d.read(1, STATUS_BUF, S_OK);
    d.expect_sector(DATA, &rw, 20);
    d.text("a reset with a request offered and notified but not served");
    d.reset();
    d.notify();
    assert!(d.negotiate(F_VERSION_1));
    d.queue(QUEUE_MAX);
    d.header(T_IN, 21);
    d.offer(0);
    d.notify();
    d.expect_no_completion();
    d.reset();
    d.text("a reset racing requests in flight");
    d.init(BLK, 0, QUEUE_MAX);
    d.header(T_IN, 0);
    d.chain(&[(HDR, 16, 0), (0x100_0000, 1 << 20, W), (STATUS_BUF, 1, W)]);
    for _ in 0..8 {
        d.offer(0);
    }
    d.notify();
    d.reset();
    d.read_any(2, rings(BLK).2 + 2); // however far it got
    d.text("still works");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(22, &rw);
    d.read(8, 0, 0x0001_0000);
    d.done();
    run("hostile-early-notify", &d, &rw, &ro);
}

#[test]
fn bad_queue_setups_need_a_reset() {
    require_kvm!();
    let (rw, ro) = (image(17), image(18));
    let mut d = Driver::new();
    d.attach(BLK);
    let (desc, avail, used) = rings(BLK);
    let setups: [(&str, u16, u64, u64, u64); 12] = [
        ("size 3", 3, desc, avail, used),
        ("size 0", 0, desc, avail, used),
        ("size 100", 100, desc, avail, used),
        ("size 512, more than the maximum", 512, desc, avail, used),
        ("size 0xffff", 0xFFFF, desc, avail, used),
        ("descriptor table beyond RAM", 16, 0x3FFF_0000, avail, used),
        (
            "available ring in the MMIO hole",
            16,
            desc,
            0xD000_0000,
            used,
        ),
        (
            "used ring on the device's own BAR",
            16,
            desc,
            avail,
            BLK.bar,
        ),
        (
            "used ring straddling the end of RAM",
            256,
            desc,
            avail,
            RAM_END - 0x800,
        ),
        ("misaligned descriptor table", 16, desc + 8, avail, used),
        ("misaligned used ring", 16, desc, avail, used + 2),
        ("a 64-bit address", 16, desc | 1 << 40, avail, used),
    ];
    for (what, size, desc, avail, used) in setups {
        d.text(what);
        assert!(d.negotiate(F_VERSION_1));
        d.queue_at(size, desc, avail, used);
        d.bar_read(2, Q_SIZE, u64::from(size));
        d.driver_ok();
        d.expect_needs_reset(LIVE);
        // The broken device serves nothing.
        d.notify();
        d.status_is(LIVE | NEEDS_RESET);
        d.reset();
    }
    d.text("no queue enabled");
    assert!(d.negotiate(F_VERSION_1));
    d.driver_ok();
    d.expect_needs_reset(LIVE);
    d.text("queue configuration after DRIVER_OK is ignored");
    d.init(BLK, 0, 16);
    d.bar_write(2, Q_SIZE, 3);
    d.bar_read(2, Q_SIZE, 16);
    d.bar_write(4, Q_DESC, 0xD000_0000);
    d.bar_read(4, Q_DESC, rings(BLK).0);
    d.bar_write(2, Q_ENABLE, 0);
    d.bar_read(2, Q_ENABLE, 1);
    d.text("a queue of 16 works");
    d.good_read(23, &rw);
    d.good_read(24, &rw);
    d.text("a queue of 4: the rings wrap every fourth request");
    d.init(BLK, 0, 4);
    for sector in 26..36 {
        d.good_read(sector, &rw);
    }
    d.text("and so does the full size");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(25, &rw);
    d.done();
    let r = run("hostile-queue-setup", &d, &rw, &ro);
    assert_eq!(count(&r.out, NEEDS_RESET_LOG), 13, "{}", r.out.stderr);
}

#[test]
fn broken_available_rings_need_a_reset() {
    require_kvm!();
    let (rw, ro) = (image(19), image(20));
    let mut d = Driver::new();
    d.init(BLK, 0, QUEUE_MAX);
    let avail = rings(BLK).1;
    let used = rings(BLK).2;
    d.good_read(30, &rw);

    d.text("available index jumps by more than the queue size");
    d.write(2, avail + 2, u64::from(d.avail.wrapping_add(QUEUE_MAX + 1)));
    d.notify();
    d.expect_needs_reset(LIVE);
    d.read(2, used + 2, 1);
    d.text("a broken device ignores further notifications");
    d.write(2, avail + 2, 2);
    d.notify();
    d.expect_no_completion();
    d.status_is(LIVE | NEEDS_RESET);
    d.text("reset and re-init");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(31, &rw);

    // The writable disk is O_DIRECT: where the host gives vmon an io_uring its reads are
    // in flight while the device takes the next chain, so a head offered twice meets the
    // first still held. (Without one, vmon serves them one at a time and a repeated head
    // is just served twice.)
    let ring = io_uring::IoUring::new(2).is_ok();
    let mut second_heads = vec![
        (
            QUEUE_MAX,
            "a head index outside the queue, after a good request in the same batch",
        ),
        (
            0xFFFF,
            "a head index outside the queue, after a good request in the same batch",
        ),
    ];
    if ring {
        second_heads.push((
            0,
            "a chain offered twice in one batch, the first still in flight",
        ));
    }
    for (head, text) in second_heads {
        d.text(text);
        d.init(BLK, 0, QUEUE_MAX);
        d.header(T_IN, 32);
        d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
        d.offer(0);
        d.offer(head);
        d.notify();
        d.expect_needs_reset(LIVE);
        // The good request still finished, once.
        d.wait_used();
        d.used_elem(0, 513);
        d.read(1, STATUS_BUF, S_OK);
        d.expect_sector(DATA, &rw, 32);
        d.read(2, used + 2, 1);
    }
    d.text("the available index running backwards");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(33, &rw);
    d.write(2, avail + 2, 0);
    d.notify();
    d.expect_needs_reset(LIVE);

    d.text("a small queue: the index jumps by 17");
    d.init(BLK, 0, 16);
    d.write(2, avail + 2, 17);
    d.notify();
    d.expect_needs_reset(LIVE);

    d.text("still works");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(34, &rw);
    d.done();
    let r = run("hostile-avail", &d, &rw, &ro);
    let resets = 5 + usize::from(ring);
    assert_eq!(count(&r.out, NEEDS_RESET_LOG), resets, "{}", r.out.stderr);
}

#[test]
fn overlapping_rings_do_not_hang_the_device() {
    require_kvm!();
    let (rw, ro) = (image(21), image(22));
    let mut d = Driver::new();
    let (desc, avail, _) = rings(BLK);
    d.attach(BLK);
    d.text("the used ring on top of the available ring");
    assert!(d.negotiate(F_VERSION_1));
    d.queue_at(16, desc, avail, avail);
    d.driver_ok();
    d.status_is(LIVE);
    d.header(T_IN, 40);
    d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
    // ring[0] = head 0, idx = 1; the device's used element overwrites ring[0..4].
    d.write(8, avail, 0x0001_0000);
    d.notify();
    d.s.wait_ne(1, STATUS_BUF, 0xFF, POLLS);
    d.want.push(Line::Val(S_OK));
    d.expect_sector(DATA, &rw, 40);
    d.text("the descriptor table on top of the rings");
    assert!(d.negotiate(F_VERSION_1));
    d.queue_at(16, avail, avail, avail);
    d.driver_ok();
    d.write(8, avail, 0x0001_0000);
    d.notify();
    // Whatever the device makes of it, it answers or gives up; check it is still there.
    d.s.wait_ne(2, avail + 2, 1, QUIET_POLLS);
    d.want.push(Line::Any);
    d.text("still works");
    d.init(BLK, 0, QUEUE_MAX);
    d.good_read(41, &rw);
    d.done();
    run("hostile-overlap", &d, &rw, &ro);
}

#[test]
fn config_space_abuse_is_harmless() {
    require_kvm!();
    let (rw, ro) = (image(23), image(24));
    let mut d = Driver::new();
    let slot = BLK.slot;
    d.attach(BLK);

    d.text("pci: read-only identity");
    d.cfg_read(4, slot, 0x00, 0x1042_1AF4);
    d.cfg_write(4, slot, 0x00, 0xFFFF_FFFF);
    d.cfg_write(2, slot, 0x02, 0x1234);
    d.cfg_write(1, slot, 0x01, 0x00);
    d.cfg_read(4, slot, 0x00, 0x1042_1AF4);
    d.cfg_write(4, slot, 0x08, 0);
    d.cfg_read(4, slot, 0x08, 0x0180_0001);
    d.cfg_write(4, slot, 0x2C, 0);
    d.cfg_read(4, slot, 0x2C, 0x1100_1AF4);
    d.cfg_write(1, slot, 0x34, 0);
    d.cfg_read(1, slot, 0x34, 0x40);
    d.cfg_write(1, slot, 0x3D, 1); // interrupt pin
    d.cfg_read(2, slot, 0x3C, 0);
    d.text("pci: command and status");
    d.cfg_write(4, slot, 0x04, 0xFFFF_FFFF);
    d.cfg_read(4, slot, 0x04, 0x0010_0406);
    d.cfg_write(2, slot, 0x04, 0x0006);
    d.text("pci: BAR sizing, and the device stays where it is");
    d.cfg_write(4, slot, 0x10, 0xFFFF_FFFF);
    d.cfg_write(4, slot, 0x14, 0xFFFF_FFFF);
    d.cfg_read(4, slot, 0x10, 0xFFFF_8004);
    d.cfg_read(4, slot, 0x14, 0xFFFF_FFFF);
    d.bar_read(2, NUM_QUEUES, 1);
    d.cfg_write(4, slot, 0x10, 0x1234_5678);
    d.cfg_write(4, slot, 0x14, 0);
    d.cfg_read(4, slot, 0x10, 0x1234_0004);
    d.bar_read(2, NUM_QUEUES, 1);
    d.cfg_write(4, slot, 0x10, BLK.bar as u32);
    d.cfg_read(4, slot, 0x10, BLK.bar | 4);
    for bar in [0x18, 0x1C, 0x20, 0x24, 0x30] {
        d.cfg_write(4, slot, bar, 0xFFFF_FFFF);
        d.cfg_read(4, slot, bar, 0);
    }
    d.text("pci: odd sizes and offsets in the data window");
    d.cfg_select(slot, 0x00);
    for (size, port, want) in [
        (4, 0xCFD, 0xFFFF_FFFF),
        (4, 0xCFE, 0xFFFF_FFFF),
        (4, 0xCFF, 0xFFFF_FFFF),
        (2, 0xCFF, 0xFFFF),
        (2, 0xCFD, 0x421A),
        (1, 0xCFF, 0x10),
    ] {
        d.s.inp(size, port);
        d.want.push(Line::Val(want));
    }
    d.s.outp(4, 0xCFD, 0xFFFF_FFFF);
    d.s.outp(2, 0xCFF, 0xFFFF);
    d.s.outp(1, 0xCF8, 0); // not the address register
    d.s.outp(2, 0xCFA, 0);
    d.s.inp(4, PCI_CONFIG_ADDRESS);
    d.want
        .push(Line::Val(u64::from(pci_address(0, slot, 0, 0))));
    d.text("pci: reserved address bits, function 1, bus 1, register 0xfc");
    for address in [
        0xFF00_0000 | pci_address(0, slot, 0, 0xFC),
        pci_address(0, slot, 1, 0),
        pci_address(1, slot, 0, 0),
        pci_address(0, slot, 0, 0xFC) | 3,
    ] {
        d.s.outp(4, PCI_CONFIG_ADDRESS, address);
        d.s.outp(4, PCI_CONFIG_DATA, 0xFFFF_FFFF);
        d.s.outp(1, PCI_CONFIG_DATA + 3, 0xFF);
    }
    d.cfg_read(4, slot, 0xFC, 0);
    d.cfg_read(4, slot, 0x00, 0x1042_1AF4);
    // The capability list, as transport.rs builds it: MSI-X at 0x40, then the virtio
    // capabilities (common 0x4C, ISR 0x60, device 0x74, notify 0x88) and last the PCI
    // configuration access capability at 0x9C, whose data window is at 0xAC.
    d.text("pci: the MSI-X capability and the PCI configuration access capability");
    d.cfg_read(4, slot, 0x40, 0x0001_4C11);
    d.cfg_write(4, slot, 0x40, 0x3FFF_FFFF); // table size and links are read-only
    d.cfg_read(4, slot, 0x40, 0x0001_4C11);
    d.cfg_write(4, slot, 0x44, 0xFFFF_FFFF); // table and PBA offsets too
    d.cfg_write(4, slot, 0x48, 0);
    d.cfg_read(4, slot, 0x44, MSIX_TABLE);
    d.cfg_read(4, slot, 0x48, MSIX_PBA);
    d.cfg_read(4, slot, 0x9C, 0x0514_0009); // cap_len 20: struct virtio_pci_cfg_cap
    d.cfg_write(4, slot, 0x9C, 0xFFFF_FFFF);
    d.cfg_read(4, slot, 0x9C, 0x0514_0009);
    // bar 0, offset 0x2000 (capacity), length 4: the window shows the device config.
    d.cfg_write(4, slot, 0xA0, 0);
    d.cfg_write(4, slot, 0xA4, 0x2000);
    d.cfg_write(4, slot, 0xA8, 4);
    d.cfg_read(4, slot, 0xAC, SECTORS);
    // A window past the BAR, on another BAR, or of length 3 does nothing.
    for (bar, offset, len) in [(0, 0x7FFE, 4), (0, 0xFFFF_FFFE, 4), (1, 0, 4), (0, 0x12, 3)] {
        d.cfg_write(1, slot, 0xA0, bar);
        d.cfg_write(4, slot, 0xA4, offset);
        d.cfg_write(4, slot, 0xA8, len);
        d.cfg_write(4, slot, 0xAC, 0);
        d.cfg_read(4, slot, 0xAC, 0);
    }
    // Through the window: the number of queues, and a status write of 0 (a reset).
    d.cfg_write(1, slot, 0xA0, 0);
    d.cfg_write(4, slot, 0xA4, NUM_QUEUES as u32);
    d.cfg_write(4, slot, 0xA8, 2);
    d.cfg_read(2, slot, 0xAC, 1);
    d.bar_write(1, STATUS, ACK);
    d.cfg_write(4, slot, 0xA4, STATUS as u32);
    d.cfg_write(4, slot, 0xA8, 1);
    d.cfg_write(1, slot, 0xAC, 0);
    d.status_is(0);

    d.text("device config: past its end, odd sizes, writes");
    d.bar_read(8, DEVICE_CFG, SECTORS);
    d.bar_read(1, DEVICE_CFG + 1, SECTORS >> 8);
    d.bar_read(2, DEVICE_CFG + 7, 0);
    d.bar_read(4, DEVICE_CFG + 0x14, 512);
    d.bar_read(8, DEVICE_CFG + 0x38, 1);
    d.bar_read(8, DEVICE_CFG + 0x3C, 0);
    d.bar_read(8, DEVICE_CFG + 0xFF8, 0);
    d.bar_read(4, DEVICE_CFG + 0xFFE, 0);
    d.bar_write(8, DEVICE_CFG, 0);
    d.bar_write(1, DEVICE_CFG + 0xFFF, 0xFF);
    d.bar_write(4, DEVICE_CFG + 0x100, 0xFFFF_FFFF);
    d.bar_read(8, DEVICE_CFG, SECTORS);
    d.text("common config: wrong widths, unknown offsets, queues the device lacks");
    d.bar_read(4, 0x38, 0);
    d.bar_read(8, 0xFF8, 0);
    d.bar_write(2, NUM_QUEUES, 5);
    d.bar_read(2, NUM_QUEUES, 1);
    d.bar_write(4, DF, 0);
    d.bar_write(4, DF_SELECT, 1);
    d.bar_read(4, DF, 1);
    d.bar_write(4, DF_SELECT, 0xFFFF_FFFF);
    d.bar_read(4, DF, 0);
    d.bar_write(4, STATUS, u64::from(ACK as u32)); // a word write to a byte register
    d.bar_write(2, STATUS, ACK);
    d.status_is(0);
    d.bar_write(1, Q_SELECT, 1); // a byte write to a word register
    d.bar_read(2, Q_SELECT, 0);
    d.bar_write(8, 0x38, u64::MAX);
    d.bar_write(1, 0x13, 0xFF);
    for q in [1, 2, 0xFFFF] {
        d.bar_write(2, Q_SELECT, q);
        d.bar_write(2, Q_SIZE, 8);
        d.bar_write(2, Q_ENABLE, 1);
        d.bar_write(2, Q_MSIX, 0);
        d.bar_read(2, Q_SIZE, 0);
        d.bar_read(2, Q_ENABLE, 0);
        d.bar_read(2, Q_MSIX, 0xFFFF);
        d.bar_read(2, Q_NOTIFY_OFF, 0);
        d.bar_read(8, Q_DESC, 0);
    }
    d.bar_write(2, Q_SELECT, 0);
    d.bar_write(2, MSIX_CONFIG, 2); // the disk has vectors 0 and 1
    d.bar_read(2, MSIX_CONFIG, 0xFFFF);
    d.bar_write(2, MSIX_CONFIG, 1);
    d.bar_read(2, MSIX_CONFIG, 1);
    d.bar_write(2, Q_MSIX, 7);
    d.bar_read(2, Q_MSIX, 0xFFFF);
    d.text("isr and notify areas read as zero");
    d.bar_write(1, ISR, 0xFF);
    d.bar_read(1, ISR, 0);
    d.bar_read(4, ISR + 0x10, 0);
    d.bar_read(2, NOTIFY, 0);
    d.bar_read(4, NOTIFY + 0xFFC, 0);
    d.bar_read(8, NOTIFY + 8, 0);
    d.text("msi-x table: odd offsets and sizes");
    d.bar_read(4, MSIX_TABLE + 12, 1); // masked out of reset
    d.bar_write(4, MSIX_TABLE + 2, 0xFFFF_FFFF);
    d.bar_write(2, MSIX_TABLE, 0xFFFF);
    d.bar_write(1, MSIX_TABLE + 12, 0);
    d.bar_write(2, MSIX_TABLE + 12, 0);
    d.bar_write(4, MSIX_TABLE + 13, 0);
    d.bar_read(8, MSIX_TABLE, 0);
    d.bar_read(4, MSIX_TABLE + 12, 1);
    d.bar_write(8, MSIX_TABLE, 0xFEE0_0000);
    d.bar_read(4, MSIX_TABLE + 1, 0x00FE_E000);
    d.bar_read(8, MSIX_TABLE, 0xFEE0_0000);
    d.bar_write(8, MSIX_TABLE + 8, 0xFFFF_FFFF_0000_0031); // data 0x31, control: only bit 0
    d.bar_read(8, MSIX_TABLE + 8, 0x1_0000_0031);
    d.bar_write(8, MSIX_TABLE + 0x20, u64::MAX); // past the two entries
    d.bar_read(8, MSIX_TABLE + 0x20, 0);
    d.bar_read(4, MSIX_TABLE + 0xFFC, 0);
    d.bar_write(8, MSIX_PBA, u64::MAX);
    d.bar_read(8, MSIX_PBA, 0);
    d.bar_write(8, 0x6000, u64::MAX);
    d.bar_read(8, 0x7FF8, 0);
    d.text("accesses straddling region ends and the end of the BAR");
    // KVM splits an access crossing into the next BAR: its upper half lands in the
    // read-only disk's device feature select, as on real hardware.
    d.bar_write(8, 0x7FFC, u64::MAX);
    d.bar_read(8, 0x7FFC, 0xFFFF_FFFF_0000_0000);
    d.bar_read(4, BLK_RO.bar - BLK.bar, 0xFFFF_FFFF);
    d.bar_write(4, BLK_RO.bar - BLK.bar, 0);
    d.bar_read(8, 0x7FFC, 0);
    d.bar_write(4, ISR - 2, u64::from(u32::MAX));
    d.bar_read(4, ISR - 2, 0);
    d.bar_write(4, NOTIFY - 2, u64::from(u32::MAX));
    d.bar_read(8, DEVICE_CFG + 0xFFC, 0);
    d.bar_read(4, STATUS, 0);
    d.text("memory decoding off: vmon's BARs still decode");
    d.cfg_write(2, slot, 0x04, 0);
    d.bar_read(2, NUM_QUEUES, 1);
    d.cfg_write(2, slot, 0x04, 0x0006);

    d.text("msi-x enabled with a garbage message for the queue vector");
    d.bar_write(8, MSIX_TABLE + 16, 0xDEAD_BEE0);
    d.bar_write(4, MSIX_TABLE + 16 + 8, 0xFFFF_FFFF);
    d.bar_write(4, MSIX_TABLE + 16 + 12, 0);
    d.cfg_write(2, slot, 0x42, 0x8000);
    d.cfg_read(2, slot, 0x42, 0x8001);
    d.attach(BLK);
    assert!(d.negotiate(F_VERSION_1));
    d.queue(QUEUE_MAX);
    d.bar_write(2, Q_MSIX, 1);
    d.bar_read(2, Q_MSIX, 1);
    d.driver_ok();
    d.good_read(42, &rw);
    d.text("and masked: the vector is pending");
    d.bar_write(4, MSIX_TABLE + 16 + 12, 1);
    d.good_read(43, &rw);
    d.bar_read(8, MSIX_PBA, 2);
    d.cfg_write(2, slot, 0x42, 0);
    d.bar_write(4, MSIX_TABLE + 16 + 12, 0);
    d.text("notify through the PCI configuration access window, and off its register");
    for (how, sector) in [("window", 45), ("unaligned", 46)] {
        d.s.fill(DATA, SECTOR as u64, 0xEE);
        d.header(T_IN, sector);
        d.chain(&[(HDR, 16, 0), (DATA, 512, W), (STATUS_BUF, 1, W)]);
        d.offer(0);
        if how == "window" {
            d.cfg_write(1, slot, 0xA0, 0);
            d.cfg_write(4, slot, 0xA4, NOTIFY as u32);
            d.cfg_write(4, slot, 0xA8, 2);
            d.cfg_write(2, slot, 0xAC, 0);
        } else {
            // Not the registered address, so no ioeventfd: the transport sees it.
            d.bar_write(2, NOTIFY + 2, 0);
        }
        d.wait_used();
        d.used_elem(0, 513);
        d.read(1, STATUS_BUF, S_OK);
        d.expect_sector(DATA, &rw, sector);
    }
    d.text("still works");
    d.good_read(44, &rw);
    d.done();
    run("hostile-config", &d, &rw, &ro);
}

#[test]
fn feature_negotiation_lies_do_not_stick() {
    require_kvm!();
    let (rw, ro) = (image(25), image(26));
    let mut d = Driver::new();
    d.attach(BLK);
    d.text("features the device did not offer");
    for lie in [
        F_VERSION_1 | 1 << 0,      // BARRIER
        F_VERSION_1 | 1 << 31,     // unassigned
        F_VERSION_1 | 1 << 33,     // ACCESS_PLATFORM is not offered
        F_VERSION_1 | 1 << 63,     // way out there
        BLK.features | 1 << 34,    // everything offered plus RING_PACKED
        F_VERSION_1 | 0xFFFF_FFFF, // every low bit
    ] {
        assert!(!d.negotiate(lie));
    }
    d.text("without VERSION_1");
    assert!(!d.negotiate(0));
    assert!(!d.negotiate(BLK.features & !F_VERSION_1));
    d.text("DRIVER_OK anyway, without FEATURES_OK");
    d.bar_write(1, STATUS, ACK | DRIVER | DRIVER_OK);
    d.status_is(ACK | DRIVER | DRIVER_OK | NEEDS_RESET);
    d.text("FEATURES_OK and DRIVER_OK in one write, with a lie");
    d.reset();
    d.bar_write(1, STATUS, ACK | DRIVER);
    d.bar_write(4, GF_SELECT, 0);
    d.bar_write(4, GF, 1);
    d.bar_write(4, GF_SELECT, 1);
    d.bar_write(4, GF, 1);
    d.queue(QUEUE_MAX);
    d.driver_ok();
    d.status_is(ACK | DRIVER);
    d.text("the driver sets NEEDS_RESET or FAILED itself");
    d.bar_write(1, STATUS, ACK | DRIVER | NEEDS_RESET);
    d.status_is(ACK | DRIVER);
    d.bar_write(1, STATUS, ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
    d.status_is(ACK | DRIVER);
    d.text("an honest second try without a reset");
    d.bar_write(4, GF_SELECT, 0);
    d.bar_write(4, GF, 0);
    d.bar_write(1, STATUS, ACK | DRIVER | FEATURES_OK);
    d.status_is(ACK | DRIVER | FEATURES_OK);
    d.text("features are fixed once accepted");
    d.bar_write(4, GF_SELECT, 0);
    d.bar_write(4, GF, 0xFFFF_FFFF);
    d.bar_read(4, GF, 0);
    d.bar_write(4, GF_SELECT, 1);
    d.bar_read(4, GF, 1);
    d.queue(QUEUE_MAX);
    d.driver_ok();
    d.status_is(LIVE);
    d.good_read(50, &rw);
    d.text("everything offered works too");
    d.attach(BLK);
    assert!(d.negotiate(BLK.features));
    d.queue(QUEUE_MAX);
    d.driver_ok();
    d.status_is(LIVE);
    d.good_read(51, &rw);
    d.done();
    let r = run("hostile-features", &d, &rw, &ro);
    assert_eq!(count(&r.out, NEEDS_RESET_LOG), 1, "{}", r.out.stderr);
}

#[test]
fn rng_survives_huge_and_read_only_buffers() {
    require_kvm!();
    let (rw, ro) = (image(27), image(28));
    let mut d = Driver::new();
    d.init(RNG, 0, QUEUE_MAX);
    const BIG: u64 = 0x100_0000;
    d.text("a 16 MiB buffer gets 64 KiB");
    d.write(8, BIG, 0x4444);
    d.write(8, BIG + 0x1_0000, 0x1234_5678);
    d.chain(&[(BIG, 16 << 20, W)]);
    d.submit(0, 0x1_0000);
    d.read_any(8, BIG);
    d.read(8, BIG + 0x1_0000, 0x1234_5678);
    d.text("a 0xffffffff-byte buffer");
    d.chain(&[(BIG, u32::MAX, W)]);
    d.submit(0, 0);
    d.text("a read-only buffer");
    d.write(8, DATA, 0x1111);
    d.chain(&[(DATA, 64, 0)]);
    d.submit(0, 0);
    d.read(8, DATA, 0x1111);
    d.text("read-only then writable: only the writable part is filled");
    d.write(8, DATA2, 0x2222);
    d.chain(&[(DATA, 64, 0), (DATA2, 8, W)]);
    d.submit(0, 8);
    d.read(8, DATA, 0x1111);
    d.read_any(8, DATA2);
    d.text("writable then read-only");
    d.chain(&[(DATA2, 8, W), (DATA, 64, 0)]);
    d.submit(0, 0);
    d.text("outside RAM, a loop, a zero-length buffer");
    d.chain(&[(0xD000_0000, 64, W)]);
    d.submit(0, 0);
    d.desc(0, DATA2, 8, W | NEXT, 0);
    d.submit(0, 0);
    d.chain(&[(DATA2, 0, W)]);
    d.submit(0, 0);
    d.text("still works");
    d.write(8, DATA2, 0);
    d.write(8, DATA2 + 8, 0);
    d.write(8, DATA2 + 16, 0x3333);
    d.chain(&[(DATA2, 16, W)]);
    d.submit(0, 16);
    d.read_any(8, DATA2);
    d.read(8, DATA2 + 16, 0x3333);
    d.text("an avail index jump breaks the rng queue too");
    let avail = rings(RNG).1;
    d.write(2, avail + 2, u64::from(d.avail.wrapping_add(1000)));
    d.notify();
    d.expect_needs_reset(LIVE);
    d.init(RNG, 0, QUEUE_MAX);
    d.chain(&[(DATA2, 16, W)]);
    d.submit(0, 16);
    d.done();
    let r = run("hostile-rng", &d, &rw, &ro);
    // The random bytes replaced the markers the guest wrote there.
    let v = vmon_tinyguest::script::parse_values(&r.out.stdout);
    assert!(!v.contains(&0x4444) && !v.contains(&0x2222), "{v:x?}");
    assert_eq!(count(&r.out, NEEDS_RESET_LOG), 1, "{}", r.out.stderr);
}
