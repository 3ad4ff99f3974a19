//! How much memory the host has, so a guest larger than the host is refused up front.
//!
//! Mapping is lazy, so a huge `mmap` would succeed, but KVM allocates bookkeeping per guest
//! page when the slot is registered (the shadow-paging reverse maps on PVM hosts, 8 bytes per
//! 4 KiB page): a 20 TiB guest would ask the host kernel for 40 GiB before the guest ran an
//! instruction. The limit is RAM plus swap: a guest may overcommit the host together with its
//! neighbours, but not alone.

use crate::size::MemSize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    pub ram: MemSize,
    pub swap: MemSize,
}

impl HostMemory {
    pub fn read() -> Option<HostMemory> {
        Self::parse(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }

    /// Parses `/proc/meminfo` text.
    pub fn parse(meminfo: &str) -> Option<HostMemory> {
        let field = |name: &str| -> Option<u64> {
            meminfo.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
                kib.checked_mul(1024)
            })
        };
        Some(HostMemory {
            ram: MemSize::from_bytes(field("MemTotal")?),
            swap: MemSize::from_bytes(field("SwapTotal").unwrap_or(0)),
        })
    }

    pub fn limit(&self) -> MemSize {
        MemSize::from_bytes(self.ram.bytes().saturating_add(self.swap.bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24567712 kB\nMemFree:        22000000 kB\nSwapTotal:       1048576 kB\n";
        let host = HostMemory::parse(text).unwrap();
        assert_eq!(host.ram.bytes(), 24_567_712 * 1024);
        assert_eq!(host.swap, MemSize::from_mib(1024));
        assert_eq!(host.limit().bytes(), (24_567_712 + 1_048_576) * 1024);
    }

    #[test]
    fn missing_swap_is_zero_and_missing_total_is_unknown() {
        assert_eq!(
            HostMemory::parse("MemTotal: 1024 kB\n")
                .unwrap()
                .swap
                .bytes(),
            0
        );
        assert_eq!(HostMemory::parse("MemFree: 1 kB\n"), None);
        assert_eq!(HostMemory::parse("MemTotal: lots kB\n"), None);
    }
}
