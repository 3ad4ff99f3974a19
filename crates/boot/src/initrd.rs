//! Placing the initial ramdisk: as high in low memory as the kernel allows, page aligned,
//! above the kernel image (the boot protocol's advice, and what keeps it out of the way of
//! the kernel's own decompression).

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmon_memory::layout::PAGE_SIZE;

use crate::BootError;

/// Default `initrd_addr_max` for kernels that do not state one (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Where an initrd of `size` bytes goes. `addr_max` is the highest address the kernel can
/// read it at (inclusive), `low_end` the end of RAM below 4 GiB, `kernel_end` the first byte
/// after the kernel image.
pub fn place(
    size: u64,
    addr_max: Option<u32>,
    low_end: u64,
    kernel_end: u64,
) -> Result<InitrdPlacement, String> {
    let addr_max = addr_max
        .filter(|&m| m != 0)
        .map_or(DEFAULT_INITRD_ADDR_MAX, u64::from);
    let ceiling = (addr_max + 1).min(low_end);
    let addr = ceiling
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            format!(
                "{size} bytes do not fit between the kernel's end ({kernel_end:#x}) and {ceiling:#x}; give the guest more memory"
            )
        })?;
    Ok(InitrdPlacement { addr, size })
}

fn bad(path: &Path) -> impl Fn(String) -> BootError + '_ {
    move |reason| BootError::BadInitrd {
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens the initrd and returns it with its size, refusing anything but a non-empty file.
fn open(path: &Path) -> Result<(File, u64), BootError> {
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(bad(path)("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(bad(path)("the file is empty".into()));
    }
    Ok((file, meta.len()))
}

/// Checks that the initrd can be read, before any guest memory exists.
pub fn check(path: &Path) -> Result<(), BootError> {
    open(path).map(|_| ())
}

/// Reads the initrd at `path` into guest memory.
pub fn load(
    mem: &impl GuestMemory,
    path: &Path,
    addr_max: Option<u32>,
    low_end: u64,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let bad = bad(path);
    let (mut file, size) = open(path)?;
    let placement = place(size, addr_max, low_end, kernel_end).map_err(&bad)?;
    mem.read_exact_volatile_from(
        GuestAddress(placement.addr),
        &mut file,
        placement.size as usize,
    )
    .map_err(|e| bad(format!("reading it into guest memory: {e}")))?;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn goes_to_the_top_of_low_memory() {
        let p = place(10 * MIB + 5, Some(0x7FFF_FFFF), 256 * MIB, 20 * MIB).unwrap();
        assert_eq!(p.addr, (256 * MIB - 10 * MIB - 5) & !0xFFF);
        assert_eq!(p.addr % PAGE_SIZE, 0);
        assert!(p.addr + p.size <= 256 * MIB);
    }

    #[test]
    fn respects_initrd_addr_max() {
        let p = place(MIB, Some(0x37FF_FFFF), 3072 * MIB, 20 * MIB).unwrap();
        assert_eq!(p.addr + MIB, 0x3800_0000);
        let p = place(MIB, None, 3072 * MIB, 20 * MIB).unwrap();
        assert_eq!(p.addr + MIB, 0x3800_0000);
    }

    #[test]
    fn refuses_when_it_would_overlap_the_kernel() {
        assert!(place(40 * MIB, None, 64 * MIB, 30 * MIB).is_err());
        assert!(place(u64::MAX, None, 64 * MIB, 0).is_err());
    }
}
