//! The MC146818 CMOS real-time clock at ports 0x70/0x71, reading the host's wall clock.
//!
//! Time registers are computed from the host clock at every read, so the guest sees the real
//! date and time and never a stale update. Status B's data mode (BCD or binary) and 12/24-hour
//! bits are honoured. Writes to the time registers are ignored: the guest's clock is the
//! host's (kvmclock gives it the same wall time). NVRAM bytes are kept.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmon_state::Persist;

use crate::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0A;
const REG_STATUS_B: u8 = 0x0B;
const REG_STATUS_C: u8 = 0x0C;
const REG_STATUS_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz periodic rate; update-in-progress never set.
const STATUS_A_DEFAULT: u8 = 0x26;
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
const STATUS_D_POWER_GOOD: u8 = 0x80;
const INDEX_MASK: u8 = 0x7F;
const HOUR_PM: u8 = 0x80;

/// A calendar time as the RTC shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u8,
}

impl DateTime {
    /// Converts seconds since 1970-01-01 UTC (Howard Hinnant's days-to-civil algorithm).
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (RTC weekday 5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    pub index: u8,
    pub status_b: u8,
    pub nvram: Vec<u8>,
}

pub struct Rtc {
    state: RtcState,
    clock: fn() -> u64,
}

fn host_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_clock)
    }
}

impl Rtc {
    /// An RTC reading its time from `clock` (seconds since the epoch); tests pass a fixed one.
    pub fn with_clock(clock: fn() -> u64) -> Self {
        Rtc {
            state: RtcState {
                index: 0,
                status_b: STATUS_B_24H,
                nvram: vec![0; 128],
            },
            clock,
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.state.status_b & STATUS_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn register(&self, reg: u8) -> u8 {
        let now = DateTime::from_unix((self.clock)());
        match reg {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS if self.state.status_b & STATUS_B_24H != 0 => self.encode(now.hour),
            REG_HOURS => {
                let h12 = match now.hour % 12 {
                    0 => 12,
                    h => h,
                };
                self.encode(h12) | if now.hour >= 12 { HOUR_PM } else { 0 }
            }
            REG_WEEKDAY => self.encode(now.weekday),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode((now.year % 100) as u8),
            REG_CENTURY => self.encode((now.year / 100) as u8),
            REG_STATUS_A => STATUS_A_DEFAULT,
            REG_STATUS_B => self.state.status_b,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_POWER_GOOD,
            r => self.state.nvram[usize::from(r & INDEX_MASK)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS..=REG_YEAR | REG_CENTURY => {
                tracing::debug!(reg, value, "rtc: ignoring a write to the clock")
            }
            REG_STATUS_B => self.state.status_b = value,
            REG_STATUS_A | REG_STATUS_C | REG_STATUS_D => {}
            r => self.state.nvram[usize::from(r & INDEX_MASK)] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.state.index,
            1 => self.register(self.state.index),
            _ => 0xFF,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; it is not part of the index.
            0 => self.state.index = value & INDEX_MASK,
            1 => self.write_register(self.state.index, value),
            _ => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("rtc state is invalid")]
pub struct RtcStateError;

impl Persist for Rtc {
    type State = RtcState;
    type Wiring = ();
    type Error = RtcStateError;

    fn save(&self) -> Result<RtcState, RtcStateError> {
        Ok(self.state.clone())
    }

    fn restore(_: (), state: &RtcState) -> Result<Self, RtcStateError> {
        if state.nvram.len() != 128 || state.index > INDEX_MASK {
            return Err(RtcStateError);
        }
        Ok(Rtc {
            state: state.clone(),
            clock: host_clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22 14:05:09 UTC, a Sunday.
    const FIXED: u64 = 1_795_356_309;

    fn rtc() -> Rtc {
        Rtc::with_clock(|| FIXED)
    }

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_date_conversion() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        assert_eq!(
            DateTime::from_unix(FIXED),
            DateTime {
                year: 2026,
                month: 11,
                day: 22,
                hour: 14,
                minute: 5,
                second: 9,
                weekday: 1
            }
        );
        // Leap day.
        let d = DateTime::from_unix(951_782_400);
        assert_eq!((d.year, d.month, d.day), (2000, 2, 29));
    }

    #[test]
    fn reads_bcd_by_default() {
        let mut r = rtc();
        assert_eq!(read(&mut r, REG_YEAR), 0x26);
        assert_eq!(read(&mut r, REG_CENTURY), 0x20);
        assert_eq!(read(&mut r, REG_MONTH), 0x11);
        assert_eq!(read(&mut r, REG_DAY), 0x22);
        assert_eq!(read(&mut r, REG_HOURS), 0x14);
        assert_eq!(read(&mut r, REG_MINUTES), 0x05);
        assert_eq!(read(&mut r, REG_SECONDS), 0x09);
        assert_eq!(read(&mut r, REG_WEEKDAY), 0x01);
        assert_eq!(read(&mut r, REG_STATUS_D), 0x80);
        assert_eq!(
            read(&mut r, REG_STATUS_A) & 0x80,
            0,
            "never update-in-progress"
        );
    }

    #[test]
    fn honours_binary_and_12_hour_modes() {
        let mut r = rtc();
        r.write(0, &[REG_STATUS_B]);
        r.write(1, &[STATUS_B_BINARY]);
        assert_eq!(read(&mut r, REG_YEAR), 26);
        assert_eq!(read(&mut r, REG_HOURS), 2 | HOUR_PM);
    }

    #[test]
    fn nvram_is_kept_and_clock_writes_ignored() {
        let mut r = rtc();
        r.write(0, &[0x40]);
        r.write(1, &[0xAB]);
        r.write(0, &[REG_YEAR]);
        r.write(1, &[0x99]);
        assert_eq!(read(&mut r, 0x40), 0xAB);
        assert_eq!(read(&mut r, REG_YEAR), 0x26);
        let state = r.save().unwrap();
        let mut back = Rtc::restore((), &state).unwrap();
        assert_eq!(read(&mut back, 0x40), 0xAB);
    }
}
