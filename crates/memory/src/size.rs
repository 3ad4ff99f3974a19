//! Memory sizes as users write them: `512M`, `2G`, `1.5G`, `1024` (MiB), `4096MiB`.
//!
//! In configuration files a size is either such a string or a whole number of MiB, and is
//! written back as a string in the largest exact unit (`"2G"`), which parses to the same size.

use std::fmt;
use std::str::FromStr;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A size in bytes. Parsed with binary units; a bare number means MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemSize(u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("'{0}' is not a size (examples: 512M, 2G, 1024 for MiB)")]
    Malformed(String),
    #[error("unknown unit '{0}' (use K, M, G or T)")]
    UnknownUnit(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

impl MemSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }
    pub const fn from_mib(mib: u64) -> Self {
        Self(mib * MIB)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }
    pub const fn mib(self) -> u64 {
        self.0 / MIB
    }

    /// A rounded rendering for messages about host sizes: "23.5 GiB".
    pub fn approx(self) -> String {
        let b = self.0 as f64;
        match self.0 {
            0 => "none".into(),
            n if n >= TIB => format!("{:.1} TiB", b / TIB as f64),
            n if n >= GIB => format!("{:.1} GiB", b / GIB as f64),
            n if n >= MIB => format!("{:.1} MiB", b / MIB as f64),
            _ => self.to_string(),
        }
    }

    /// The shortest form the parser reads back exactly: `"2G"`, `"4608M"`, `"1000B"`. Unlike
    /// [`fmt::Display`] ("2 GiB") it is meant for files, not for people.
    pub fn to_compact(self) -> String {
        let b = self.0;
        let unit = [(TIB, 'T'), (GIB, 'G'), (MIB, 'M'), (KIB, 'K')]
            .into_iter()
            .find(|&(size, _)| b != 0 && b.is_multiple_of(size));
        match unit {
            Some((size, letter)) => format!("{}{letter}", b / size),
            None => format!("{b}B"),
        }
    }
}

impl FromStr for MemSize {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SizeError::Empty);
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() || number.matches('.').count() > 1 || number.ends_with('.') {
            return Err(SizeError::Malformed(text.to_string()));
        }
        let multiplier = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "M" | "MB" | "MIB" => MIB,
            "B" => 1,
            "K" | "KB" | "KIB" => KIB,
            "G" | "GB" | "GIB" => GIB,
            "T" | "TB" | "TIB" => TIB,
            _ => return Err(SizeError::UnknownUnit(unit.to_string())),
        };
        let overflow = || SizeError::Overflow(text.to_string());
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u64 = whole
            .parse()
            .map_err(|_| SizeError::Malformed(text.to_string()))?;
        let mut bytes = whole.checked_mul(multiplier).ok_or_else(overflow)?;
        if !fraction.is_empty() {
            // Fractions are exact to the byte for any unit a person writes (1.5G, 0.25T):
            // fraction * multiplier / 10^digits, computed in u128 so it cannot overflow.
            let digits = u32::try_from(fraction.len()).map_err(|_| overflow())?;
            let scale = 10u128.checked_pow(digits).ok_or_else(overflow)?;
            let numerator: u128 = fraction
                .parse()
                .map_err(|_| SizeError::Malformed(text.to_string()))?;
            let extra = numerator * u128::from(multiplier) / scale;
            bytes = bytes
                .checked_add(u64::try_from(extra).map_err(|_| overflow())?)
                .ok_or_else(overflow)?;
        }
        Ok(MemSize(bytes))
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= TIB && b.is_multiple_of(TIB) {
            write!(f, "{} TiB", b / TIB)
        } else if b >= GIB && b.is_multiple_of(GIB) {
            write!(f, "{} GiB", b / GIB)
        } else if b >= MIB && b.is_multiple_of(MIB) {
            write!(f, "{} MiB", b / MIB)
        } else if b >= KIB && b.is_multiple_of(KIB) {
            write!(f, "{} KiB", b / KIB)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

impl serde::Serialize for MemSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_compact())
    }
}

impl<'de> serde::Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = MemSize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size like \"512M\" or \"2G\", or a whole number of MiB")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<MemSize, E> {
        text.parse().map_err(E::custom)
    }

    // A bare number means MiB, as on the command line.
    fn visit_u64<E: serde::de::Error>(self, mib: u64) -> Result<MemSize, E> {
        mib.checked_mul(MIB)
            .map(MemSize)
            .ok_or_else(|| E::custom(SizeError::Overflow(format!("{mib} MiB"))))
    }

    // TOML integers are signed.
    fn visit_i64<E: serde::de::Error>(self, mib: i64) -> Result<MemSize, E> {
        match u64::try_from(mib) {
            Ok(mib) => self.visit_u64(mib),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(mib), &self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<u64, SizeError> {
        s.parse::<MemSize>().map(MemSize::bytes)
    }

    #[test]
    fn units() {
        assert_eq!(parse("512M"), Ok(512 * MIB));
        assert_eq!(parse("2G"), Ok(2 * GIB));
        assert_eq!(parse("1024"), Ok(1024 * MIB));
        assert_eq!(parse("4096MiB"), Ok(4096 * MIB));
        assert_eq!(parse("1k"), Ok(KIB));
        assert_eq!(parse("1T"), Ok(TIB));
        assert_eq!(parse("1.5G"), Ok(3 * GIB / 2));
        assert_eq!(parse(" 256 M "), Ok(256 * MIB));
        assert_eq!(parse("4608"), Ok(4608 * MIB));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(""), Err(SizeError::Empty));
        assert!(matches!(parse("abc"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse("-1G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse("1.2.3G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse("1."), Err(SizeError::Malformed(_))));
        assert!(matches!(parse("12Q"), Err(SizeError::UnknownUnit(_))));
        assert!(matches!(
            parse("99999999999999999999T"),
            Err(SizeError::Malformed(_) | SizeError::Overflow(_))
        ));
        assert!(matches!(parse("20000000T"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn display_picks_the_largest_exact_unit() {
        assert_eq!(MemSize::from_mib(2048).to_string(), "2 GiB");
        assert_eq!(MemSize::from_bytes(3 * TIB).to_string(), "3 TiB");
        assert_eq!(MemSize::from_mib(4608).to_string(), "4608 MiB");
        assert_eq!(MemSize::from_bytes(1024).to_string(), "1 KiB");
        assert_eq!(MemSize::from_bytes(1000).to_string(), "1000 bytes");
        assert_eq!(MemSize::from_bytes(24_684_084 * KIB).approx(), "23.5 GiB");
        assert_eq!(MemSize::from_bytes(0).approx(), "none");
    }

    #[test]
    fn serde_reads_strings_and_mib_and_writes_what_it_reads() {
        let read = |json: &str| serde_json::from_str::<MemSize>(json).map(MemSize::bytes);
        assert_eq!(read(r#""512M""#).unwrap(), 512 * MIB);
        assert_eq!(read(r#""1.5G""#).unwrap(), 3 * GIB / 2);
        assert_eq!(read("1024").unwrap(), GIB);
        let err = |json: &str| read(json).unwrap_err().to_string();
        assert!(err("-1").contains("whole number of MiB"), "{}", err("-1"));
        assert!(err("1.5").contains("whole number of MiB"), "{}", err("1.5"));
        assert!(err("true").contains("whole number of MiB"));
        assert!(err(r#""12Q""#).contains("unknown unit"));
        assert!(err("18446744073709551615").contains("too large"));
        for bytes in [
            0,
            1000,
            KIB,
            3 * MIB / 2,
            4608 * MIB,
            2 * GIB,
            3 * TIB,
            u64::MAX,
        ] {
            let size = MemSize::from_bytes(bytes);
            let json = serde_json::to_string(&size).unwrap();
            assert!(json.starts_with('"'), "{json}");
            assert_eq!(
                serde_json::from_str::<MemSize>(&json).unwrap(),
                size,
                "{json}"
            );
        }
        assert_eq!(MemSize::from_mib(2048).to_compact(), "2G");
        assert_eq!(MemSize::from_mib(4608).to_compact(), "4608M");
        assert_eq!(MemSize::from_bytes(0).to_compact(), "0B");
    }
}
