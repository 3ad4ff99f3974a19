//! Per-device counters, read by the management API while the device thread counts.
//!
//! A device owns one [`CounterSet`] for its life (it survives driver resets, so counters are
//! monotonic as Prometheus expects). Counting is a relaxed atomic add on the device thread;
//! a reader takes a [`snapshot`](DeviceMetrics::snapshot) without stopping the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the VMM asks of any device's counters.
pub trait DeviceMetrics: Send + Sync {
    /// Counter names (snake_case, stable: dashboards depend on them) with their values.
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

/// A fixed list of named counters.
#[derive(Debug)]
pub struct CounterSet {
    names: &'static [&'static str],
    values: Box<[AtomicU64]>,
}

impl CounterSet {
    pub fn new(names: &'static [&'static str]) -> Arc<Self> {
        Arc::new(CounterSet {
            names,
            values: names.iter().map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Adds `by` to counter `index` (an index into the names given to [`new`](Self::new)).
    pub fn add(&self, index: usize, by: u64) {
        if let Some(v) = self.values.get(index) {
            v.fetch_add(by, Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.values
            .get(index)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }
}

impl DeviceMetrics for CounterSet {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.names
            .iter()
            .zip(self.values.iter())
            .map(|(&n, v)| (n, v.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_index_and_ignores_unknown_indices() {
        static NAMES: [&str; 2] = ["requests", "bytes"];
        let c = CounterSet::new(&NAMES);
        c.add(0, 1);
        c.add(1, 4096);
        c.add(1, 512);
        c.add(7, 1);
        assert_eq!(c.snapshot(), vec![("requests", 1), ("bytes", 4608)]);
        assert_eq!(c.get(1), 4608);
        assert_eq!(c.get(9), 0);
    }
}
