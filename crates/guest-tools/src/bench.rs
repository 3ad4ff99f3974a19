//! I/O measurements taken inside the guest (and, with the same binary, on the host for the
//! baseline): each prints one line `NAME VALUE UNIT` for the benchmark to parse.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use crate::{exact, number};

const MIB: usize = 1 << 20;

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (callers pass at least 4096).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Opens `path` with O_DIRECT when it is a block device (the guest's page cache stays out
/// of the figure); regular files (the host baseline, e.g. on tmpfs) are read as they are.
fn open(path: &str, write: bool) -> Result<File, String> {
    let is_block = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .map_err(|e| format!("{path}: {e}"))?;
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if is_block {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| format!("{path}: {e}"))
}

fn mb_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / MIB as f64 / t.as_secs_f64()
}

/// `seq-read PATH MIB`: reads MIB MiB in 1 MiB requests.
pub fn seq_read_cmd(args: &[String]) -> Result<(), String> {
    let [path, mib] = exact(args, "PATH MIB")?;
    let mib: usize = number("MIB", mib)?;
    let f = open(path, false)?;
    let mut buf = Aligned::new(MIB);
    let start = Instant::now();
    for i in 0..mib {
        f.read_exact_at(buf.as_mut(), (i * MIB) as u64)
            .map_err(|e| format!("read at {i} MiB: {e}"))?;
    }
    println!("seq-read {:.1} MB/s", mb_per_s(mib * MIB, start.elapsed()));
    Ok(())
}

/// `seq-write PATH MIB`: writes MIB MiB in 1 MiB requests, then fdatasync.
pub fn seq_write_cmd(args: &[String]) -> Result<(), String> {
    let [path, mib] = exact(args, "PATH MIB")?;
    let mib: usize = number("MIB", mib)?;
    let f = open(path, true)?;
    let mut buf = Aligned::new(MIB);
    buf.as_mut().fill(0xA5);
    let start = Instant::now();
    for i in 0..mib {
        f.write_all_at(buf.as_mut(), (i * MIB) as u64)
            .map_err(|e| format!("write at {i} MiB: {e}"))?;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    println!("seq-write {:.1} MB/s", mb_per_s(mib * MIB, start.elapsed()));
    Ok(())
}

/// `rand-read PATH SECONDS`: 4 KiB reads at random aligned offsets, one at a time.
pub fn rand_read_cmd(args: &[String]) -> Result<(), String> {
    let [path, secs] = exact(args, "PATH SECONDS")?;
    let secs: f64 = number("SECONDS", secs)?;
    let f = open(path, false)?;
    let size = f
        .metadata()
        .ok()
        .filter(|m| m.len() > 0)
        .map(|m| m.len())
        .or_else(|| {
            let mut g = &f;
            std::io::Seek::seek(&mut g, std::io::SeekFrom::End(0)).ok()
        })
        .ok_or("cannot tell the size")?;
    let blocks = size / 4096;
    let mut buf = Aligned::new(4096);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    while start.elapsed() < deadline {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.read_exact_at(buf.as_mut(), (x % blocks) * 4096)
                .map_err(|e| format!("read: {e}"))?;
            ops += 1;
        }
    }
    println!(
        "rand-read-4k {:.0} IOPS",
        ops as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `tcp-send HOST:PORT MIB`: connects and sends MIB MiB.
pub fn tcp_send_cmd(args: &[String]) -> Result<(), String> {
    let [addr, mib] = exact(args, "HOST:PORT MIB")?;
    let mib: usize = number("MIB", mib)?;
    let mut s = connect_retrying(addr)?;
    let buf = vec![0x5Au8; 256 * 1024];
    let start = Instant::now();
    for _ in 0..mib * 4 {
        s.write_all(&buf).map_err(|e| format!("send: {e}"))?;
    }
    s.shutdown(std::net::Shutdown::Write).ok();
    // Wait for the receiver's count so the time covers delivery, not just buffering.
    let mut ack = String::new();
    s.read_to_string(&mut ack).ok();
    println!("tcp-send {:.1} MB/s", mb_per_s(mib * MIB, start.elapsed()));
    Ok(())
}

fn connect_retrying(addr: &str) -> Result<TcpStream, String> {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > give_up => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `tcp-recv PORT`: accepts one connection, counts bytes to EOF, answers with the count.
pub fn tcp_recv_cmd(args: &[String]) -> Result<(), String> {
    let [port] = exact(args, "PORT")?;
    let port: u16 = number("PORT", port)?;
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind: {e}"))?;
    println!("listening");
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    let _ = writeln!(s, "{total}");
    println!(
        "tcp-recv {:.1} MB/s {total} bytes",
        mb_per_s(total, start.elapsed())
    );
    Ok(())
}
