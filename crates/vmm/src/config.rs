//! What a VM is made of, independent of how the user said it (flags now, files later).

use std::path::PathBuf;

use vmon_memory::MemSize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory: MemSize,
    /// Expose VMX/SVM to the guest.
    pub nested: bool,
    /// Forward the host's stdin to COM1 (off for tests and detached VMs).
    pub console_input: bool,
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemSize::from_mib(256),
            nested: false,
            console_input: true,
        }
    }
}
