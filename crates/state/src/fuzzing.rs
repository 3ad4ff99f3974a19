//! Entry point for fuzzing the state-file reader: the cargo-fuzz target `state_file` in
//! `fuzz/` calls [`state_file`], and the unit test below feeds it pseudo-random inputs so it
//! keeps compiling and passing on stable.
//!
//! The input is read twice through the very decoder `read_state` uses:
//! - as a whole file, raw: anything may come back, but never a panic, and an error is one
//!   line naming the file;
//! - with its tail wrapped as the payload of an intact container, so the fuzzer gets past the
//!   checksums to the JSON and typed decoding that a random file almost never reaches; byte 0
//!   then chooses whether to truncate the file or flip one byte in it, and either must be
//!   refused as what it is.
//!
//! Beyond "does not panic" it checks that the answer is consistent: the untyped and the typed
//! reading agree about the container, a file that reads back re-encodes to one that reads
//! back equal, and an intact container fails only on its payload.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::file::{decode, encode, StateFileError, MAX_STATE_PAYLOAD, STATE_HEADER_LEN};

const KIND: &str = "vm-state";
const PATH: &str = "fuzz/vm.state";

/// A typed payload shaped like real state: integers of several widths, strings, sequences,
/// maps, options and an enum, so serde's error paths for each are reached.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    version: u32,
    vcpus: Vec<Vcpu>,
    devices: BTreeMap<String, Device>,
    clock: Option<u64>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Vcpu {
    id: u8,
    regs: [u64; 4],
    msrs: Vec<(u32, u64)>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Device {
    Serial { lsr: u8, fifo: Vec<u8> },
    Block { sectors: u64, path: String },
    Rng,
}

/// Which container-level answer a reading gave, ignoring the payload's type.
fn container_outcome<T>(r: &Result<T, StateFileError>) -> &'static str {
    match r {
        Ok(_) | Err(StateFileError::Parse { .. }) => "intact",
        Err(StateFileError::Missing { .. }) => "missing",
        Err(StateFileError::Read { .. }) => "read",
        Err(StateFileError::NotRegularFile { .. }) => "not-regular",
        Err(StateFileError::NotStateFile { .. }) => "foreign",
        Err(StateFileError::UnsupportedVersion { .. }) => "version",
        Err(StateFileError::Truncated { .. }) => "truncated",
        Err(StateFileError::Corrupted { .. }) => "corrupted",
        Err(StateFileError::WrongKind { .. }) => "kind",
        Err(StateFileError::TooLarge { .. }) => "too-large",
        Err(StateFileError::Serialize { .. })
        | Err(StateFileError::InvalidKind { .. })
        | Err(StateFileError::Write { .. }) => "write",
    }
}

fn check_message(e: &StateFileError) {
    let text = e.to_string();
    assert!(!text.contains('\n'), "multi-line error: {text:?}");
    assert!(text.contains(PATH), "error does not name the file: {text}");
}

/// Reads `bytes` as a file both untyped and typed; returns the untyped result.
fn read_both(bytes: &[u8]) -> Result<Value, StateFileError> {
    let path = Path::new(PATH);
    let value: Result<Value, _> = decode(bytes, path, KIND);
    let typed: Result<Sample, _> = decode(bytes, path, KIND);
    for e in [value.as_ref().err(), typed.as_ref().err()]
        .into_iter()
        .flatten()
    {
        check_message(e);
        assert!(
            !matches!(
                e,
                StateFileError::Serialize { .. }
                    | StateFileError::InvalidKind { .. }
                    | StateFileError::Write { .. }
            ),
            "a reader gave a writer's error: {e}"
        );
    }
    assert_eq!(
        container_outcome(&value),
        container_outcome(&typed),
        "the payload type changed the container's verdict"
    );
    if let Ok(v) = &value {
        // What reads back must survive a round trip unchanged.
        let again = encode(path, KIND, v).expect("a value that was read must encode");
        let back: Value = decode(&again[..], path, KIND).expect("re-encoded file must read");
        assert_eq!(&back, v);
    }
    if let Ok(t) = &typed {
        let again = encode(path, KIND, t).expect("a typed value that was read must encode");
        let back: Sample = decode(&again[..], path, KIND).expect("re-encoded file must read");
        assert_eq!(&back, t);
    }
    value
}

/// An intact container around `payload`, built independently of `encode` so a bug there is
/// not mirrored here: the same layout, spelled out.
fn container(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    bytes.extend_from_slice(b"VMONSNAP");
    bytes.extend_from_slice(&crate::STATE_FORMAT_VERSION.to_le_bytes());
    let mut kind = [0u8; 16];
    kind[..KIND.len()].copy_from_slice(KIND.as_bytes());
    bytes.extend_from_slice(&kind);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&header_crc.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// The fuzz target.
pub fn state_file(data: &[u8]) {
    // 1. The bytes as a whole file.
    let raw = read_both(data);
    if raw.is_ok() {
        // Only an intact container of our kind and version can read back.
        assert!(data.len() >= STATE_HEADER_LEN && data.starts_with(b"VMONSNAP"));
    }

    // 2. The bytes after the first as the payload of an intact container.
    let Some((&control, payload)) = data.split_first() else {
        return;
    };
    let file = container(payload);
    let parses = serde_json::from_slice::<Value>(payload).is_ok();
    let fits = payload.len() as u64 <= MAX_STATE_PAYLOAD;
    match read_both(&file) {
        Ok(_) => assert!(parses && fits),
        Err(StateFileError::Parse { .. }) => assert!(!parses && fits),
        Err(StateFileError::TooLarge { .. }) => assert!(!fits),
        Err(e) => panic!("an intact container was refused: {e}"),
    }

    // 3. The same container, damaged as byte 0 says: cut short or one byte flipped.
    let at = usize::from(control >> 1) * file.len() / 128;
    let mut damaged = file;
    if control & 1 == 0 {
        damaged.truncate(at);
        match read_both(&damaged) {
            Err(StateFileError::Truncated { .. }) => {}
            other => panic!("cut at {at}: {:?}", other.map(|_| ())),
        }
    } else {
        let at = at.min(damaged.len() - 1);
        damaged[at] ^= control | 1;
        match read_both(&damaged) {
            Err(
                StateFileError::NotStateFile { .. }
                | StateFileError::UnsupportedVersion { .. }
                | StateFileError::Corrupted { .. },
            ) => {}
            other => panic!("byte {at} flipped: {:?}", other.map(|_| ())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: reproducible inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Pieces of plausible payloads, so random inputs reach past serde's first token.
    const PIECES: &[&str] = &[
        "{\"version\":1,",
        "\"vcpus\":[",
        "{\"id\":0,\"regs\":[1,2,3,4],\"msrs\":[[16,5]]}",
        "{\"id\":300,\"regs\":[1],\"msrs\":[]}",
        "],",
        "\"devices\":{",
        "\"com1\":{\"Serial\":{\"lsr\":96,\"fifo\":[1,2]}}",
        "\"vda\":{\"Block\":{\"sectors\":8,\"path\":\"/x\"}}",
        "\"rng\":\"Rng\"",
        "\"x\":\"Floppy\"",
        "},",
        "\"clock\":null}",
        "\"clock\":18446744073709551616}",
        "\"extra\":true,",
        ",",
        "[[[[[[[[[[[[[[[[",
        "1e999",
        "\"\\ud800\"",
        "-0",
        "\u{7f}",
        "\0",
    ];

    fn random_input(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
        let mut v = vec![rng.next() as u8];
        match rng.below(4) {
            // A real file, perhaps damaged further below.
            0 => v = valid.to_vec(),
            // Random bytes.
            1 => (0..rng.below(200)).for_each(|_| v.push(rng.next() as u8)),
            // Plausible JSON pieces.
            _ => {
                for _ in 0..rng.below(24) {
                    v.extend_from_slice(PIECES[rng.below(PIECES.len())].as_bytes());
                }
            }
        }
        for _ in 0..rng.below(3) {
            if !v.is_empty() {
                let at = rng.below(v.len());
                v[at] ^= rng.next() as u8;
            }
        }
        v
    }

    fn valid_file() -> Vec<u8> {
        let sample = Sample {
            version: 1,
            vcpus: vec![Vcpu {
                id: 0,
                regs: [1, 2, 3, 4],
                msrs: vec![(0x10, 5)],
            }],
            devices: [("rng".to_string(), Device::Rng)].into_iter().collect(),
            clock: Some(9),
        };
        encode(Path::new(PATH), KIND, &sample).unwrap()
    }

    #[test]
    fn random_inputs() {
        let valid = valid_file();
        let mut rng = Rng(0x5eed_0f57_a7e5);
        for _ in 0..2000 {
            state_file(&random_input(&mut rng, &valid));
        }
    }

    #[test]
    fn known_inputs() {
        let valid = valid_file();
        state_file(&valid);
        state_file(b"");
        state_file(b"\x01");
        state_file(b"\x00{}");
        state_file(b"\xff{\"version\":1,\"vcpus\":[],\"devices\":{},\"clock\":null}");
        // Found by the fuzzer: a float serde_json read one ulp off without float_roundtrip.
        state_file(b"22222222222222222222222222222222221");
        // Found by the fuzzer: serde quoted a field name with a newline into the message.
        state_file(b"A{\"versi\\nhon\":1}");
        // The typed payload must really be reachable: an intact container of a Sample.
        let mut framed = vec![0u8];
        framed.extend_from_slice(&valid[STATE_HEADER_LEN..]);
        let file = container(&valid[STATE_HEADER_LEN..]);
        assert_eq!(file, valid, "the fuzzer's container matches encode");
        state_file(&framed);
    }
}
