//! Recognising and loading kernels: bzImage (64-bit boot protocol) and ELF (64-bit entry, or
//! PVH's 32-bit entry when the image carries the PVH note).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmon_memory::layout::HIGH_MEMORY_START;

use crate::BootError;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const SETUP_HEADER_OFFSET: usize = 0x1F1;
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    LinuxBoot64,
    /// ELF entry point in long mode (no PVH note), RSI = zero page as well.
    Elf64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh32,
}

#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub mode: EntryMode,
    /// First byte after the loaded image: the initrd must not go below this.
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Largest command line (without NUL) this kernel reads.
    pub fn cmdline_capacity(&self) -> usize {
        match &self.setup_header {
            // Protocol 2.06 added cmdline_size; older kernels read 255 bytes.
            Some(h) if h.version >= 0x0206 => {
                (h.cmdline_size as usize).min(crate::layout::CMDLINE_MAX_SIZE - 1)
            }
            Some(_) => 255,
            None => crate::layout::CMDLINE_MAX_SIZE - 1,
        }
    }
}

/// The kind of image a file holds, judged from its first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Identifies a kernel image and checks the header fields we rely on, before anything is
/// copied into guest memory, so a wrong or damaged file gets a precise reason.
pub fn inspect(image: &[u8], file_len: u64) -> Result<KernelFormat, String> {
    if image.len() >= 4 && &image[..4] == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    let read_u32 = |off: usize| {
        image
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    match read_u32(0x202) {
        Some(HDRS_MAGIC) if image.len() >= 0x238 => {}
        _ => return Err("not a bzImage or ELF".into()),
    }
    let setup_sects = match image[SETUP_HEADER_OFFSET] {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(read_u32(0x1F4).unwrap_or(0));
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    let expected = (setup_sects + 1) * 512 + syssize * 16;
    if file_len < expected {
        return Err(format!(
            "truncated bzImage: its header promises {expected} bytes, the file has {file_len}"
        ));
    }
    if version < 0x020C {
        return Err(format!(
            "bzImage boot protocol {}.{:02} is too old: vmon needs 2.12 or later for the 64-bit entry",
            version >> 8,
            version & 0xFF
        ));
    }
    let xloadflags = u16::from_le_bytes([image[0x236], image[0x237]]);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)".into());
    }
    Ok(KernelFormat::BzImage)
}

fn open_and_inspect(path: &Path) -> Result<(File, KernelFormat), BootError> {
    let bad = |reason: String| BootError::BadKernel {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut head = Vec::with_capacity(1024);
    (&mut file)
        .take(1024)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let format = inspect(&head, meta.len()).map_err(bad)?;
    Ok((file, format))
}

/// Checks that `path` is a readable kernel image we can boot, without loading it: lets the
/// VMM reject a bad file before it opens KVM or maps memory.
pub fn check(path: &Path) -> Result<KernelFormat, BootError> {
    open_and_inspect(path).map(|(_, format)| format)
}

/// Loads the kernel at `path` into guest memory.
pub fn load<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let bad = |reason: String| BootError::BadKernel {
        path: path.to_path_buf(),
        reason,
    };
    let (mut file, format) = open_and_inspect(path)?;
    match format {
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(|e| bad(format!("bzImage: {e}")))?;
            Ok(LoadedKernel {
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                mode: EntryMode::LinuxBoot64,
                end: result.kernel_end,
                setup_header: result.setup_header,
            })
        }
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(|e| bad(format!("ELF: {e}")))?;
            let (entry, mode) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr, EntryMode::Pvh32),
                _ => (result.kernel_load, EntryMode::Elf64),
            };
            Ok(LoadedKernel {
                entry,
                mode,
                end: result.kernel_end,
                setup_header: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: u16, xloadflags: u16, setup_sects: u8, syssize: u32) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[0x1F1] = setup_sects;
        image[0x1F4..0x1F8].copy_from_slice(&syssize.to_le_bytes());
        image[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image
    }

    #[test]
    fn recognises_elf() {
        assert_eq!(inspect(b"\x7fELF\x02\x01", 6), Ok(KernelFormat::Elf));
    }

    #[test]
    fn recognises_a_good_bzimage() {
        let image = fake_bzimage(0x020F, 1, 4, 100);
        assert_eq!(inspect(&image, 5 * 512 + 1600), Ok(KernelFormat::BzImage));
    }

    #[test]
    fn rejects_other_files() {
        let err = inspect(b"#!/bin/sh\necho hi\n", 18).unwrap_err();
        assert_eq!(err, "not a bzImage or ELF");
        assert_eq!(inspect(&[], 0).unwrap_err(), "not a bzImage or ELF");
    }

    #[test]
    fn rejects_truncated_bzimage() {
        let image = fake_bzimage(0x020F, 1, 4, 100);
        let err = inspect(&image, 3000).unwrap_err();
        assert!(err.starts_with("truncated bzImage"), "{err}");
        assert!(err.contains("4160"), "{err}");
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let image = fake_bzimage(0x020F, 1, 0, 0);
        assert!(inspect(&image, 5 * 512 - 1).is_err());
        assert!(inspect(&image, 5 * 512).is_ok());
    }

    #[test]
    fn rejects_old_or_32bit_only_bzimage() {
        let old = fake_bzimage(0x0206, 1, 4, 0);
        assert!(inspect(&old, 1 << 20).unwrap_err().contains("too old"));
        let no64 = fake_bzimage(0x020F, 0, 4, 0);
        assert!(inspect(&no64, 1 << 20).unwrap_err().contains("64-bit"));
    }

    #[test]
    fn cmdline_capacity_follows_the_header() {
        let mut header = setup_header {
            version: 0x020F,
            cmdline_size: 2047,
            ..Default::default()
        };
        let mut kernel = LoadedKernel {
            entry: GuestAddress(0),
            mode: EntryMode::LinuxBoot64,
            end: 0,
            setup_header: Some(header),
        };
        assert_eq!(kernel.cmdline_capacity(), 2047);
        header.version = 0x0205;
        kernel.setup_header = Some(header);
        assert_eq!(kernel.cmdline_capacity(), 255);
        kernel.setup_header = None;
        assert_eq!(kernel.cmdline_capacity(), 2047);
    }
}
