//! The state-file container: one serialised value in a file that says what it is.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VMONSNAP"
//!      8     4  format version, u32 little-endian (STATE_FORMAT_VERSION)
//!     12    16  kind, ASCII, NUL-padded ("vm-state")
//!     28     8  payload length in bytes, u64 little-endian (at most MAX_STATE_PAYLOAD)
//!     36     4  CRC-32 of the payload, u32 little-endian
//!     40     4  CRC-32 of bytes 0..40 (the header above), u32 little-endian
//!     44     …  payload: the value as JSON, exactly `payload length` bytes, then end of file
//! ```
//!
//! Why each part is there:
//! - The magic and the kind turn "wrong file" into a sentence instead of a JSON error: a guest
//!   memory file, a disk image or a different vmon state kind is refused before anything is
//!   parsed.
//! - The version comes right after the magic and is checked before anything else is read, so a
//!   later vmon may change everything after it and an older one still says "version 2; this
//!   vmon reads version 1" rather than "corrupted".
//! - The header has its own checksum so that the payload length is trusted before it is used:
//!   a flipped bit in the length reads as "corrupted", not as "truncated", and a file can never
//!   make the reader allocate more than [`MAX_STATE_PAYLOAD`].
//! - The checksum is CRC-32 (the zlib/gzip/PNG polynomial, via `crc32fast`). It is there to
//!   catch accidents (a torn copy, a bad disk, an editor), not tampering: a CRC is no
//!   signature, and a snapshot directory must be trusted like a kernel image. For accidents any
//!   CRC-32 finds every error burst up to 32 bits and all but 1 in 2^32 others; CRC-32C would
//!   only improve detection of 4-bit patterns in payloads over 11 KiB, which is not worth a
//!   less common checksum. What it buys is that anyone can check a file by hand: the same
//!   number comes out of Python's `zlib.crc32`, `gzip` and most hex editors.
//! - The payload is JSON (serde_json): state files are small (registers, device state; guest
//!   memory has its own file), and a person can read one with `tail -c +45 FILE | jq`.
//!
//! Files are written atomically: a temporary file in the same directory, `fsync`, `rename`
//! over the target, `fsync` of the directory. A reader therefore sees either the old file or
//! the new one, also after a crash, and never a half-written one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{de::DeserializeOwned, Serialize};

use crate::STATE_FORMAT_VERSION;

/// The first bytes of every vmon state file.
pub const STATE_MAGIC: [u8; 8] = *b"VMONSNAP";
/// Bytes of header before the payload.
pub const STATE_HEADER_LEN: usize = 44;
/// Longest kind name: the size of the NUL-padded kind field.
pub const STATE_KIND_MAX: usize = 16;
/// The largest payload written or read. A VM's state (registers, LAPICs, device queues) is
/// tens of KiB; this bound lets the reader refuse a corrupt length before allocating.
pub const MAX_STATE_PAYLOAD: u64 = 64 << 20;

const VERSION_AT: usize = 8;
const KIND_AT: usize = 12;
const LEN_AT: usize = KIND_AT + STATE_KIND_MAX;
const PAYLOAD_CRC_AT: usize = LEN_AT + 8;
const HEADER_CRC_AT: usize = PAYLOAD_CRC_AT + 4;

/// Why a state file could not be written or read. Every message is one line that names the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    #[error("{} is not a vmon state file (it does not start with \"VMONSNAP\")", path.display())]
    NotStateFile { path: PathBuf },
    #[error(
        "state file {} has format version {found}; this vmon reads version {supported}",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state file {} is truncated: its {part} has {found} of {expected} bytes",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        part: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("state file {} is corrupted: {detail}", path.display())]
    Corrupted { path: PathBuf, detail: String },
    #[error("state file {} holds {found:?} state, not {expected:?}", path.display())]
    WrongKind {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "state file {}: a payload of {len} bytes is over the limit of {max} bytes",
        path.display()
    )]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// `reason` is serde's message with control characters escaped: it quotes the payload
    /// (an unknown field's name, say), and a crafted payload must not break the one line.
    #[error("state file {} has {kind:?} state that does not parse: {reason}", path.display())]
    Parse {
        path: PathBuf,
        kind: String,
        reason: String,
    },
    #[error("cannot serialise {kind:?} state for {}: {source}", path.display())]
    Serialize {
        path: PathBuf,
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "cannot write state file {}: kind {kind:?} is not 1 to {STATE_KIND_MAX} ASCII letters, digits, '-' or '_'",
        path.display()
    )]
    InvalidKind { path: PathBuf, kind: String },
    #[error("cannot write state file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Serialises `value` and writes it to `path` as a `kind` state file, replacing any file there
/// atomically. The file is readable by its owner only: vCPU and device state can hold guest
/// secrets.
pub fn write_state<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<(), StateFileError> {
    let bytes = encode(path, kind, value)?;
    write_atomically(path, &bytes).map_err(|source| StateFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads a `kind` state file written by [`write_state`]. Refuses, with one line naming the
/// file, anything that is not exactly such a file: missing, truncated, foreign, of another
/// kind or version, corrupted, oversized or not parsing as `T`.
pub fn read_state<T: DeserializeOwned>(path: &Path, kind: &str) -> Result<T, StateFileError> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever, before
    // the regular-file check could refuse it. It has no effect on regular files.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StateFileError::Missing {
                path: path.to_owned(),
            },
            _ => StateFileError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| StateFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(StateFileError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    decode(file, path, kind)
}

/// The whole file as bytes: header, then payload.
pub(crate) fn encode<T: Serialize>(
    path: &Path,
    kind: &str,
    value: &T,
) -> Result<Vec<u8>, StateFileError> {
    if !valid_kind(kind) {
        return Err(StateFileError::InvalidKind {
            path: path.to_owned(),
            kind: kind.to_owned(),
        });
    }
    let payload = serde_json::to_vec(value).map_err(|source| StateFileError::Serialize {
        path: path.to_owned(),
        kind: kind.to_owned(),
        source,
    })?;
    let len = payload.len() as u64;
    if len > MAX_STATE_PAYLOAD {
        return Err(StateFileError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_STATE_PAYLOAD,
        });
    }
    let mut bytes = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    let mut kind_field = [0u8; STATE_KIND_MAX];
    kind_field[..kind.len()].copy_from_slice(kind.as_bytes());
    bytes.extend_from_slice(&kind_field);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&bytes[..HEADER_CRC_AT]);
    bytes.extend_from_slice(&header_crc.to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Kind names stay printable and short so they fit the header field and read well in errors.
fn valid_kind(kind: &str) -> bool {
    (1..=STATE_KIND_MAX).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reads one state file from `reader`; `path` is only for messages. Shared by [`read_state`]
/// and the fuzz entry point, so the fuzzer runs exactly the code a restore runs.
pub(crate) fn decode<R: Read, T: DeserializeOwned>(
    mut reader: R,
    path: &Path,
    kind: &str,
) -> Result<T, StateFileError> {
    let read_error = |source| StateFileError::Read {
        path: path.to_owned(),
        source,
    };
    let truncated = |part, found: usize, expected: usize| StateFileError::Truncated {
        path: path.to_owned(),
        part,
        found: found as u64,
        expected: expected as u64,
    };

    let mut header = [0u8; STATE_HEADER_LEN];
    let got = read_up_to(&mut reader, &mut header).map_err(read_error)?;
    // A short file that is a prefix of the magic (an empty file, say) was cut off; one that
    // is not was never ours.
    let magic_len = got.min(STATE_MAGIC.len());
    if header[..magic_len] != STATE_MAGIC[..magic_len] {
        return Err(StateFileError::NotStateFile {
            path: path.to_owned(),
        });
    }
    if got < KIND_AT {
        return Err(truncated("header", got, STATE_HEADER_LEN));
    }
    let version = le_u32(&header[VERSION_AT..]);
    if version != STATE_FORMAT_VERSION {
        return Err(StateFileError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    if got < STATE_HEADER_LEN {
        return Err(truncated("header", got, STATE_HEADER_LEN));
    }
    let stored = le_u32(&header[HEADER_CRC_AT..]);
    let computed = crc32fast::hash(&header[..HEADER_CRC_AT]);
    if stored != computed {
        return Err(StateFileError::Corrupted {
            path: path.to_owned(),
            detail: format!("header checksum is {computed:08x}, the file says {stored:08x}"),
        });
    }
    let found_kind =
        parse_kind(&header[KIND_AT..LEN_AT]).ok_or_else(|| StateFileError::Corrupted {
            path: path.to_owned(),
            detail: "the kind field is not a kind name".into(),
        })?;
    if found_kind != kind {
        return Err(StateFileError::WrongKind {
            path: path.to_owned(),
            found: found_kind.to_owned(),
            expected: kind.to_owned(),
        });
    }
    let len = le_u64(&header[LEN_AT..]);
    if len > MAX_STATE_PAYLOAD {
        return Err(StateFileError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_STATE_PAYLOAD,
        });
    }
    // Bounded just above, so the allocation is at most MAX_STATE_PAYLOAD.
    let len = len as usize;
    let mut payload = vec![0u8; len];
    let got = read_up_to(&mut reader, &mut payload).map_err(read_error)?;
    if got < len {
        return Err(truncated("payload", got, len));
    }
    let mut extra = [0u8; 1];
    if read_up_to(&mut reader, &mut extra).map_err(read_error)? != 0 {
        return Err(StateFileError::Corrupted {
            path: path.to_owned(),
            detail: format!(
                "it goes on after the {len}-byte payload its header declares (byte {})",
                STATE_HEADER_LEN + len
            ),
        });
    }
    let stored = le_u32(&header[PAYLOAD_CRC_AT..]);
    let computed = crc32fast::hash(&payload);
    if stored != computed {
        return Err(StateFileError::Corrupted {
            path: path.to_owned(),
            detail: format!("payload checksum is {computed:08x}, the header says {stored:08x}"),
        });
    }
    serde_json::from_slice(&payload).map_err(|e| StateFileError::Parse {
        path: path.to_owned(),
        kind: kind.to_owned(),
        reason: one_line(&e.to_string()),
    })
}

fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            let plain = (!c.is_control()).then_some(c);
            escaped.into_iter().flatten().chain(plain)
        })
        .collect()
}

/// The kind name in a NUL-padded field, if the field holds one and nothing else.
fn parse_kind(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let (name, padding) = field.split_at(end);
    let name = std::str::from_utf8(name).ok()?;
    (valid_kind(name) && padding.iter().all(|&b| b == 0)).then_some(name)
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

/// Fills `buf` as far as the input goes; unlike `read_exact` it says how far that was, which
/// the truncation message needs.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Replaces `path` with `bytes` so that a reader, or the file system after a crash, sees the
/// old content or the new one and nothing in between.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = TempPath::new(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp.path())?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(temp.path(), path)?;
    temp.keep();
    // The rename is durable only once the directory entry is on disk too.
    File::open(parent_dir(path))?.sync_all()
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary name beside the target (same directory, so `rename` stays on one file system),
/// removed again unless [`TempPath::keep`] is called.
pub struct TempPath(Option<PathBuf>);

impl TempPath {
    pub fn new(target: &Path) -> io::Result<Self> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
        let unique = format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        Ok(Self(Some(parent_dir(target).join(unique))))
    }

    pub fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// The file was renamed into place: nothing left to remove.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        rip: u64,
        name: String,
        regs: Vec<u64>,
        devices: BTreeMap<String, u32>,
    }

    fn sample() -> Sample {
        Sample {
            rip: 0xffff_ffff_8100_0000,
            name: "vcpu0".into(),
            regs: vec![1, 2, 3, u64::MAX],
            devices: [("uart".to_string(), 4), ("blk".to_string(), 9)]
                .into_iter()
                .collect(),
        }
    }

    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vmon-state-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn decode_bytes(bytes: &[u8]) -> Result<Sample, StateFileError> {
        decode(bytes, Path::new("mem.state"), "vm-state")
    }

    fn valid_bytes() -> Vec<u8> {
        encode(Path::new("x"), "vm-state", &sample()).unwrap()
    }

    /// Every message is one line naming the file, whatever went wrong.
    fn assert_one_line_naming(e: &StateFileError, name: &str) {
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains(name), "{text}");
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = TestDir::new("round-trip");
        let path = dir.path("vm.state");
        write_state(&path, "vm-state", &sample()).unwrap();
        let back: Sample = read_state(&path, "vm-state").unwrap();
        assert_eq!(back, sample());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"VMONSNAP");
        assert_eq!(bytes[8..12], STATE_FORMAT_VERSION.to_le_bytes());
        assert_eq!(&bytes[12..20], b"vm-state");
        assert_eq!(
            bytes.len() as u64,
            STATE_HEADER_LEN as u64 + le_u64(&bytes[28..])
        );
        // The payload is plain JSON, checkable by hand.
        let json: serde_json::Value = serde_json::from_slice(&bytes[STATE_HEADER_LEN..]).unwrap();
        assert_eq!(json["name"], "vcpu0");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn floats_come_back_exactly() {
        let floats = vec![
            2.2222222222222222e33f64,
            0.1,
            -0.0,
            f64::MIN_POSITIVE,
            1e-320,
        ];
        let bytes = encode(Path::new("x"), "vm-state", &floats).unwrap();
        let back: Vec<f64> = decode(&bytes[..], Path::new("x"), "vm-state").unwrap();
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&floats));
    }

    #[test]
    fn checksum_is_the_standard_crc32() {
        // The check value of CRC-32/ISO-HDLC, so `zlib.crc32` and friends agree with us.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn replaces_atomically_and_leaves_no_temporary_files() {
        let dir = TestDir::new("atomic");
        let path = dir.path("vm.state");
        write_state(&path, "vm-state", &sample()).unwrap();
        // A reader holding the old file keeps seeing it whole after the replacement.
        let old = File::open(&path).unwrap();
        let mut newer = sample();
        newer.rip = 7;
        newer.name = "x".repeat(10_000);
        write_state(&path, "vm-state", &newer).unwrap();
        let old: Sample = decode(old, &path, "vm-state").unwrap();
        assert_eq!(old, sample());
        let now: Sample = read_state(&path, "vm-state").unwrap();
        assert_eq!(now, newer);
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vm.state")]);
    }

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = TestDir::new("failed-write");
        let path = dir.path("vm.state");
        write_state(&path, "vm-state", &sample()).unwrap();
        // Maps with non-string keys do not serialise to JSON.
        let bad: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        let e = write_state(&path, "vm-state", &bad).unwrap_err();
        assert!(matches!(e, StateFileError::Serialize { .. }), "{e}");
        assert_one_line_naming(&e, "vm.state");
        let e = write_state(&path, "no spaces", &sample()).unwrap_err();
        assert!(matches!(e, StateFileError::InvalidKind { .. }), "{e}");
        let e = write_state(&path, "a-kind-longer-than-16", &sample()).unwrap_err();
        assert!(matches!(e, StateFileError::InvalidKind { .. }), "{e}");
        let e = write_state(&dir.path("no-such-dir/vm.state"), "vm-state", &sample()).unwrap_err();
        assert!(matches!(e, StateFileError::Write { .. }), "{e}");
        assert_one_line_naming(&e, "no-such-dir/vm.state");
        let back: Sample = read_state(&path, "vm-state").unwrap();
        assert_eq!(back, sample());
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn missing_file_and_not_a_file() {
        let dir = TestDir::new("missing");
        let path = dir.path("absent.state");
        let e = read_state::<Sample>(&path, "vm-state").unwrap_err();
        assert!(matches!(e, StateFileError::Missing { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("state file {} does not exist", path.display())
        );
        let e = read_state::<Sample>(&dir.0, "vm-state").unwrap_err();
        assert!(
            matches!(
                e,
                StateFileError::NotRegularFile { .. } | StateFileError::Read { .. }
            ),
            "{e}"
        );
        assert_one_line_naming(&e, &dir.0.display().to_string());
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = TestDir::new("fifo");
        let path = dir.path("fifo.state");
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let e = read_state::<Sample>(&path, "vm-state").unwrap_err();
        assert!(matches!(e, StateFileError::NotRegularFile { .. }), "{e}");
    }

    #[test]
    fn truncation_at_every_offset_says_truncated() {
        let bytes = valid_bytes();
        for cut in 0..bytes.len() {
            let e = decode_bytes(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(e, StateFileError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
            assert_one_line_naming(&e, "mem.state");
        }
        assert_eq!(
            decode_bytes(&bytes[..0]).unwrap_err().to_string(),
            "state file mem.state is truncated: its header has 0 of 44 bytes"
        );
        let e = decode_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "payload has {} of {} bytes",
                bytes.len() - STATE_HEADER_LEN - 3,
                bytes.len() - STATE_HEADER_LEN
            )),
            "{e}"
        );
    }

    #[test]
    fn truncated_file_on_disk() {
        let dir = TestDir::new("truncated");
        let path = dir.path("vm.state");
        write_state(&path, "vm-state", &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_state::<Sample>(&path, "vm-state").unwrap_err();
        assert!(matches!(e, StateFileError::Truncated { .. }), "{e}");
        assert_one_line_naming(&e, &path.display().to_string());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = valid_bytes();
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[at] ^= flip;
                let e = decode_bytes(&bad).unwrap_err();
                let expected = match at {
                    0..8 => matches!(e, StateFileError::NotStateFile { .. }),
                    8..12 => matches!(e, StateFileError::UnsupportedVersion { .. }),
                    _ => matches!(e, StateFileError::Corrupted { .. }),
                };
                assert!(expected, "byte {at} ^ {flip:#x}: {e}");
                assert_one_line_naming(&e, "mem.state");
            }
        }
    }

    #[test]
    fn foreign_files_are_not_state_files() {
        let elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0";
        for bytes in [&elf[..], b"{\"rip\":1}", &[0u8; 4096], b"VMONSNAQ........"] {
            let e = decode_bytes(bytes).unwrap_err();
            assert!(matches!(e, StateFileError::NotStateFile { .. }), "{e}");
        }
        assert_eq!(
            decode_bytes(elf).unwrap_err().to_string(),
            "mem.state is not a vmon state file (it does not start with \"VMONSNAP\")"
        );
    }

    #[test]
    fn wrong_kind_is_named() {
        let bytes = encode(Path::new("x"), "blk-state", &sample()).unwrap();
        let e = decode_bytes(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "state file mem.state holds \"blk-state\" state, not \"vm-state\""
        );
    }

    /// Rewrites header fields of a valid file and fixes the header checksum, as a newer or a
    /// hostile writer would.
    fn with_header(mut bytes: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        edit(&mut bytes[..STATE_HEADER_LEN]);
        let crc = crc32fast::hash(&bytes[..HEADER_CRC_AT]);
        bytes[HEADER_CRC_AT..STATE_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn other_versions_are_named() {
        let bytes = with_header(valid_bytes(), |h| {
            h[VERSION_AT..KIND_AT].copy_from_slice(&2u32.to_le_bytes())
        });
        assert_eq!(
            decode_bytes(&bytes).unwrap_err().to_string(),
            "state file mem.state has format version 2; this vmon reads version 1"
        );
        // The version is checked as soon as it is read, before the rest of the header, whose
        // layout a later version may change.
        let e = decode_bytes(&bytes[..12]).unwrap_err();
        assert!(
            matches!(e, StateFileError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn absurd_length_is_refused_before_allocating() {
        for len in [MAX_STATE_PAYLOAD + 1, u64::MAX] {
            let bytes = with_header(valid_bytes(), |h| {
                h[LEN_AT..PAYLOAD_CRC_AT].copy_from_slice(&len.to_le_bytes())
            });
            let e = decode_bytes(&bytes).unwrap_err();
            assert!(matches!(e, StateFileError::TooLarge { .. }), "{e}");
        }
    }

    #[test]
    fn kind_field_with_garbage_is_corrupted() {
        let bytes = with_header(valid_bytes(), |h| h[KIND_AT + 10] = b'!');
        let e = decode_bytes(&bytes).unwrap_err();
        assert!(matches!(e, StateFileError::Corrupted { .. }), "{e}");
    }

    #[test]
    fn trailing_bytes_are_corrupted() {
        let mut bytes = valid_bytes();
        bytes.push(b'\n');
        let e = decode_bytes(&bytes).unwrap_err();
        assert!(matches!(e, StateFileError::Corrupted { .. }), "{e}");
    }

    #[test]
    fn payload_of_the_wrong_shape_names_serde_s_reason() {
        #[derive(Serialize)]
        struct Other {
            rip: &'static str,
        }
        let bytes = encode(Path::new("x"), "vm-state", &Other { rip: "no" }).unwrap();
        let e = decode_bytes(&bytes).unwrap_err();
        assert!(matches!(e, StateFileError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("invalid type: string \"no\""), "{e}");
        assert_one_line_naming(&e, "mem.state");
        // serde quotes an unknown field's name as it is; a newline in it must not reach the
        // message.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Strict {}
        let map: BTreeMap<&str, u8> = [("a\nb", 1)].into_iter().collect();
        let bytes = encode(Path::new("x"), "vm-state", &map).unwrap();
        let e = decode::<_, Strict>(&bytes[..], Path::new("mem.state"), "vm-state").unwrap_err();
        assert!(e.to_string().contains("unknown field `a\\nb`"), "{e}");
        assert_one_line_naming(&e, "mem.state");
    }

    #[test]
    fn oversized_value_is_not_written() {
        let dir = TestDir::new("oversized");
        let path = dir.path("big.state");
        let big = "x".repeat(MAX_STATE_PAYLOAD as usize);
        let e = write_state(&path, "vm-state", &big).unwrap_err();
        assert!(matches!(e, StateFileError::TooLarge { .. }), "{e}");
        assert!(!path.exists());
    }
}
