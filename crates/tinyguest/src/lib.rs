//! Tiny purpose-built x86-64 guest kernels for vmon's integration tests.
//!
//! [`programs`] builds guest code with iced-x86's `CodeAssembler`;
//! [`image`] wraps it in an ELF64, PVH ELF or bzImage file, in memory.
//! See `README.md` for the boot contract the programs rely on.
//!
//! ```
//! use vmon_tinyguest::*;
//! let kernel = elf64(&serial_print_then_exit(b"hello\n", 7), DEFAULT_LOAD_ADDR);
//! let bz = bzimage(&bzimage_check_boot_params());
//! let pvh = elf64_pvh(&pvh_hello(), DEFAULT_LOAD_ADDR);
//! # let _ = (kernel, bz, pvh);
//! ```

mod asm;
pub mod image;
pub mod programs;
pub mod script;
pub mod virtio;

pub use asm::{COM1, COM1_LSR, EXIT_PORT};
pub use image::*;
pub use programs::*;
pub use script::{parse_values, script_elf, script_pvh_elf, script_runner, value_line, Script};
