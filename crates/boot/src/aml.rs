//! Just enough of an AML encoder for the DSDT vmon builds by hand.
//!
//! Every function returns the bytes of one complete AML object (ACPI 6.5 §20.2 for the
//! opcodes, §6.4 for resource descriptors). Names and ranges are constants of the VMM, so a
//! malformed one is a programming error: the functions panic on it rather than return errors.

pub const ZERO_OP: u8 = 0x00;
pub const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const STRING_PREFIX: u8 = 0x0D;
const QWORD_PREFIX: u8 = 0x0E;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const DUAL_NAME_PREFIX: u8 = 0x2E;
const MULTI_NAME_PREFIX: u8 = 0x2F;
const PARENT_PREFIX_CHAR: u8 = b'^';
const EXT_OP_PREFIX: u8 = 0x5B;
const DEVICE_OP: u8 = 0x82;

/// The PkgLength that precedes `content_len` bytes of a package. The encoded value counts
/// its own bytes too, so the form (1 to 4 bytes) depends on the total: one byte holds 0..=63,
/// otherwise the lead byte carries the count of following bytes in bits 7–6 and the low
/// nibble in bits 3–0, each following byte 8 more bits (at most 2^28 − 1).
pub fn pkg_length(content_len: usize) -> Vec<u8> {
    for extra in 0..4usize {
        let total = content_len + 1 + extra;
        let limit = if extra == 0 {
            0x3F
        } else {
            (1 << (4 + 8 * extra)) - 1
        };
        if total > limit {
            continue;
        }
        if extra == 0 {
            return vec![total as u8];
        }
        let mut out = vec![((extra as u8) << 6) | (total & 0xF) as u8];
        out.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
        return out;
    }
    panic!("AML package of {content_len} bytes is longer than PkgLength can express");
}

/// One NameSeg: 1–4 characters `A–Z`, `0–9`, `_` (not starting with a digit), padded with
/// `_` as ASL does (`_S5` is `_S5_`).
pub fn name_seg(seg: &str) -> [u8; 4] {
    let b = seg.as_bytes();
    let valid_char = |c: &u8| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_';
    assert!(
        (1..=4).contains(&b.len()) && b.iter().all(valid_char) && !b[0].is_ascii_digit(),
        "invalid AML name segment {seg:?}"
    );
    let mut out = [b'_'; 4];
    out[..b.len()].copy_from_slice(b);
    out
}

/// A NameString: optional `\` (root) or `^` (parent) prefixes, then dot-separated segments
/// (`\_SB.PCI0`). A bare `\` is the root itself.
pub fn name_string(path: &str) -> Vec<u8> {
    let rest = path.trim_start_matches(['\\', '^']);
    let prefix = &path.as_bytes()[..path.len() - rest.len()];
    assert!(
        prefix.len() <= 1 || prefix.iter().all(|&c| c == PARENT_PREFIX_CHAR),
        "invalid AML name prefix in {path:?}"
    );
    let mut out = prefix.to_vec();
    let segs: Vec<[u8; 4]> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').map(name_seg).collect()
    };
    match segs.len() {
        0 => out.push(0x00), // NullName
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            let n = u8::try_from(n).expect("at most 255 name segments");
            out.extend([MULTI_NAME_PREFIX, n]);
        }
    }
    segs.iter().for_each(|s| out.extend_from_slice(s));
    out
}

/// An integer in its shortest form: ZeroOp, OneOp, or a Byte/Word/DWord/QWord constant.
/// (Not OnesOp: its value depends on the table revision.)
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xFF => vec![BYTE_PREFIX, v as u8],
        0x100..=0xFFFF => prefixed(WORD_PREFIX, &(v as u16).to_le_bytes()),
        0x1_0000..=0xFFFF_FFFF => dword(v as u32),
        _ => prefixed(QWORD_PREFIX, &v.to_le_bytes()),
    }
}

/// A DWordConst whatever the value (how ASL encodes `EisaId`).
pub fn dword(v: u32) -> Vec<u8> {
    prefixed(DWORD_PREFIX, &v.to_le_bytes())
}

/// The compressed EISA ID of a PNP ID such as `PNP0A03`: three letters of 5 bits each and
/// four hex digits, stored big-endian; as a little-endian integer `PNP0A03` is 0x030AD041.
pub fn eisa_id(id: &str) -> u32 {
    let b = id.as_bytes();
    assert!(
        b.len() == 7
            && b[..3].iter().all(u8::is_ascii_uppercase)
            && b[3..]
                .iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
        "invalid EISA ID {id:?}"
    );
    let letters = b[..3]
        .iter()
        .fold(0u32, |acc, &c| (acc << 5) | u32::from(c - b'@'));
    let product = u32::from_str_radix(&id[3..], 16).expect("checked hex digits");
    ((letters << 16) | product).swap_bytes()
}

/// `EisaId("...")` as an object.
pub fn eisa_id_object(id: &str) -> Vec<u8> {
    dword(eisa_id(id))
}

/// A String object: ASCII without NUL, NUL-terminated.
pub fn string(s: &str) -> Vec<u8> {
    assert!(
        s.bytes().all(|c| (0x01..=0x7F).contains(&c)),
        "AML strings are ASCII without NUL: {s:?}"
    );
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out
}

/// A Buffer object holding `data` (its size given as an integer, as ASL does).
pub fn buffer(data: &[u8]) -> Vec<u8> {
    let mut content = integer(data.len() as u64);
    content.extend_from_slice(data);
    op_with_pkg(&[BUFFER_OP], &content)
}

/// A Package of at most 255 already-encoded elements.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let count = u8::try_from(elements.len()).expect("a Package has at most 255 elements");
    let mut content = vec![count];
    elements.iter().for_each(|e| content.extend_from_slice(e));
    op_with_pkg(&[PACKAGE_OP], &content)
}

/// `Name(path, object)`.
pub fn name(path: &str, object: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend(name_string(path));
    out.extend_from_slice(object);
    out
}

/// `Scope(path) { body }`; `body` is a list of encoded objects.
pub fn scope(path: &str, body: &[u8]) -> Vec<u8> {
    named_block(&[SCOPE_OP], path, body)
}

/// `Device(path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Vec<u8> {
    named_block(&[EXT_OP_PREFIX, DEVICE_OP], path, body)
}

fn prefixed(prefix: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![prefix];
    out.extend_from_slice(bytes);
    out
}

fn op_with_pkg(op: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(content.len()));
    out.extend_from_slice(content);
    out
}

fn named_block(op: &[u8], path: &str, body: &[u8]) -> Vec<u8> {
    let mut content = name_string(path);
    content.extend_from_slice(body);
    op_with_pkg(op, &content)
}

// ---- Resource descriptors (ACPI 6.5 §6.4) ----

const IO_TAG: u8 = 0x47; // small item 0x08, 7 bytes
const IO_DECODE_16: u8 = 0x01;
const END_TAG: u8 = 0x79; // small item 0x0F, 1 byte
const DWORD_ADDRESS_TAG: u8 = 0x87;
const WORD_ADDRESS_TAG: u8 = 0x88;
const QWORD_ADDRESS_TAG: u8 = 0x8A;
const RESOURCE_TYPE_MEMORY: u8 = 0;
const RESOURCE_TYPE_IO: u8 = 1;
const RESOURCE_TYPE_BUS: u8 = 2;
/// General flags of every address space descriptor here: _MAF and _MIF set (fixed location),
/// positive decode (bit 1 clear), ResourceProducer (bit 0 clear: a bridge window).
const ADDRESS_FIXED_PRODUCER: u8 = 0b1100;
/// I/O type-specific flags: _RNG = EntireRange (ISA and non-ISA ports).
const IO_RANGE_ENTIRE: u8 = 0b11;
const MEMORY_READ_WRITE: u8 = 1;

/// Memory attribute of a memory window (the _MEM field, bits 2–1 of the type flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    NonCacheable = 0,
    Cacheable = 1,
    WriteCombining = 2,
    Prefetchable = 3,
}

/// `WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)`.
pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
    address_space(
        WORD_ADDRESS_TAG,
        RESOURCE_TYPE_BUS,
        0,
        2,
        min.into(),
        max.into(),
    )
}

/// `IO(Decode16, min, max, alignment, length)`.
pub fn io(min: u16, max: u16, alignment: u8, length: u8) -> Vec<u8> {
    let mut out = vec![IO_TAG, IO_DECODE_16];
    out.extend(min.to_le_bytes());
    out.extend(max.to_le_bytes());
    out.extend([alignment, length]);
    out
}

/// `WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)`.
pub fn word_io(min: u16, max: u16) -> Vec<u8> {
    address_space(
        WORD_ADDRESS_TAG,
        RESOURCE_TYPE_IO,
        IO_RANGE_ENTIRE,
        2,
        min.into(),
        max.into(),
    )
}

/// `DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, caching, ReadWrite|ReadOnly,
/// 0, min, max, 0, len)`.
pub fn dword_memory(min: u32, max: u32, caching: Caching, read_write: bool) -> Vec<u8> {
    address_space(
        DWORD_ADDRESS_TAG,
        RESOURCE_TYPE_MEMORY,
        memory_flags(caching, read_write),
        4,
        min.into(),
        max.into(),
    )
}

/// `QWordMemory(...)`, as [`dword_memory`] with 64-bit fields.
pub fn qword_memory(min: u64, max: u64, caching: Caching, read_write: bool) -> Vec<u8> {
    address_space(
        QWORD_ADDRESS_TAG,
        RESOURCE_TYPE_MEMORY,
        memory_flags(caching, read_write),
        8,
        min,
        max,
    )
}

/// The end tag closing `descriptors`, with the checksum that makes the whole template,
/// end tag included, sum to zero.
pub fn end_tag(descriptors: &[u8]) -> [u8; 2] {
    let sum = descriptors
        .iter()
        .chain(&[END_TAG])
        .fold(0u8, |s, b| s.wrapping_add(*b));
    [END_TAG, sum.wrapping_neg()]
}

/// `ResourceTemplate() { descriptors }`: a Buffer of the descriptors and the end tag.
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut data = descriptors.concat();
    let end = end_tag(&data);
    data.extend(end);
    buffer(&data)
}

fn memory_flags(caching: Caching, read_write: bool) -> u8 {
    ((caching as u8) << 1) | if read_write { MEMORY_READ_WRITE } else { 0 }
}

/// A Word/DWord/QWord Address Space Descriptor for a fixed window `min..=max`: granularity
/// and translation 0, length `max - min + 1` (what the spec requires of _MIF = _MAF = 1).
fn address_space(
    tag: u8,
    resource_type: u8,
    type_flags: u8,
    width: usize,
    min: u64,
    max: u64,
) -> Vec<u8> {
    assert!(min <= max, "empty window {min:#x}..={max:#x}");
    let len = u128::from(max - min) + 1;
    assert!(
        len < 1u128 << (8 * width),
        "window {min:#x}..={max:#x} too long for its descriptor"
    );
    let body_len = 3 + 5 * width as u16;
    let mut out = vec![tag];
    out.extend(body_len.to_le_bytes());
    out.extend([resource_type, ADDRESS_FIXED_PRODUCER, type_flags]);
    for field in [0, min, max, 0, len as u64] {
        out.extend_from_slice(&field.to_le_bytes()[..width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PkgLength: (value, bytes it occupies).
    fn decode_pkg_length(b: &[u8]) -> (usize, usize) {
        let extra = usize::from(b[0] >> 6);
        if extra == 0 {
            return (usize::from(b[0] & 0x3F), 1);
        }
        assert_eq!(
            b[0] & 0x30,
            0,
            "bits 5-4 of a multi-byte lead byte are zero"
        );
        let v = (0..extra).fold(usize::from(b[0] & 0xF), |v, i| {
            v | usize::from(b[1 + i]) << (4 + 8 * i)
        });
        (v, 1 + extra)
    }

    #[test]
    fn pkg_length_forms_at_their_boundaries() {
        // Totals (PkgLength included) 63 and 64, 4095 and 4096, 2^20 - 1 and 2^20.
        assert_eq!(pkg_length(62), [0x3F], "63: the largest one-byte form");
        assert_eq!(
            pkg_length(63),
            [0x41, 0x04],
            "64 does not fit one byte: 65 in two"
        );
        assert_eq!(
            pkg_length(4093),
            [0x4F, 0xFF],
            "4095: the largest two-byte form"
        );
        assert_eq!(
            pkg_length(4094),
            [0x81, 0x00, 0x01],
            "4096 does not fit two bytes: 4097 in three"
        );
        assert_eq!(pkg_length(0xF_FFFC), [0x8F, 0xFF, 0xFF]);
        assert_eq!(pkg_length(0xF_FFFD), [0xC1, 0x00, 0x00, 0x01]);
        assert_eq!(pkg_length(0xFFF_FFFB), [0xCF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(pkg_length(0), [0x01]);
    }

    #[test]
    #[should_panic(expected = "longer than PkgLength")]
    fn pkg_length_refuses_more_than_28_bits() {
        pkg_length(0xFFF_FFFC);
    }

    #[test]
    fn pkg_length_counts_itself_and_is_minimal() {
        let probes = (0..5000).chain([0xF_FFF0, 0xF_FFFC, 0xF_FFFD, 0x10_0000, 0x123_4567]);
        for content in probes {
            let enc = pkg_length(content);
            let (value, used) = decode_pkg_length(&enc);
            assert_eq!(used, enc.len(), "{content}");
            assert_eq!(value, content + used, "{content}");
            let min_bytes = match content + 1 {
                0..=0x3F => 1,
                _ if content + 2 <= 0xFFF => 2,
                _ if content + 3 <= 0xF_FFFF => 3,
                _ => 4,
            };
            assert_eq!(used, min_bytes, "{content}");
        }
    }

    #[test]
    fn blocks_wrap_bodies_of_every_length_form() {
        for body_len in [0, 58, 59, 60, 4089, 4090, 5000] {
            let body = vec![0xA5; body_len];
            let d = device("PCI0", &body);
            assert_eq!(&d[..2], &[0x5B, 0x82]);
            let (len, used) = decode_pkg_length(&d[2..]);
            assert_eq!(len, d.len() - 2, "PkgLength covers the rest of the object");
            assert_eq!(&d[2 + used..6 + used], b"PCI0");
            assert_eq!(&d[6 + used..], &body[..]);
            let s = scope("\\_SB", &body);
            assert_eq!(s[0], 0x10);
            let (len, used) = decode_pkg_length(&s[1..]);
            assert_eq!(len, s.len() - 1);
            assert_eq!(&s[1 + used..6 + used], b"\\_SB_");
        }
    }

    #[test]
    fn integers_use_the_shortest_form() {
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(2), [0x0A, 2]);
        assert_eq!(integer(0xFF), [0x0A, 0xFF]);
        assert_eq!(integer(0x100), [0x0B, 0x00, 0x01]);
        assert_eq!(integer(0xFFFF), [0x0B, 0xFF, 0xFF]);
        assert_eq!(integer(0x1_0000), [0x0C, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(integer(0xFFFF_FFFF), [0x0C, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(integer(0x1_0000_0000), [0x0E, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            integer(u64::MAX),
            [0x0E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        assert_eq!(dword(5), [0x0C, 5, 0, 0, 0]);
    }

    #[test]
    fn eisa_ids_compress_like_asl() {
        assert_eq!(eisa_id("PNP0A03"), 0x030A_D041);
        assert_eq!(eisa_id("PNP0A08"), 0x080A_D041);
        assert_eq!(eisa_id("PNP0501"), 0x0105_D041);
        assert_eq!(eisa_id_object("PNP0A03"), [0x0C, 0x41, 0xD0, 0x0A, 0x03]);
    }

    #[test]
    #[should_panic(expected = "invalid EISA ID")]
    fn eisa_id_refuses_lowercase() {
        eisa_id("pnp0a03");
    }

    #[test]
    fn names_pad_and_prefix() {
        assert_eq!(name_seg("_S5"), *b"_S5_");
        assert_eq!(name_seg("PCI0"), *b"PCI0");
        assert_eq!(name_string("\\_SB"), b"\\_SB_");
        assert_eq!(name_string("_HID"), b"_HID");
        assert_eq!(name_string("\\"), [b'\\', 0x00]);
        assert_eq!(name_string("\\_SB.PCI0"), b"\\\x2E_SB_PCI0");
        assert_eq!(name_string("^^A.B.C"), b"^^\x2F\x03A___B___C___");
        assert_eq!(name("_UID", &integer(0)), b"\x08_UID\x00");
    }

    #[test]
    #[should_panic(expected = "invalid AML name segment")]
    fn name_seg_refuses_five_characters() {
        name_seg("PCI00");
    }

    #[test]
    fn strings_buffers_packages() {
        assert_eq!(string("vmon"), b"\x0Dvmon\x00");
        assert_eq!(buffer(&[1, 2, 3]), [0x11, 0x06, 0x0A, 0x03, 1, 2, 3]);
        assert_eq!(buffer(&[]), [0x11, 0x02, 0x00]);
        let big = buffer(&[0; 300]);
        assert_eq!(&big[..6], &[0x11, 0x41, 0x13, 0x0B, 0x2C, 0x01]);
        assert_eq!(big.len(), 306);
        assert_eq!(
            package(&[integer(5), integer(5), integer(0), integer(0)]),
            [0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0x00, 0x00]
        );
    }

    #[test]
    fn resource_descriptors_match_iasl() {
        // Byte strings as iasl 20200925 compiles the same ASL.
        assert_eq!(
            word_bus_number(0, 0),
            [0x88, 0x0D, 0x00, 0x02, 0x0C, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]
        );
        assert_eq!(
            io(0xCF8, 0xCF8, 1, 8),
            [0x47, 0x01, 0xF8, 0x0C, 0xF8, 0x0C, 0x01, 0x08]
        );
        assert_eq!(
            word_io(0, 0xCF7),
            [0x88, 0x0D, 0x00, 0x01, 0x0C, 0x03, 0, 0, 0, 0, 0xF7, 0x0C, 0, 0, 0xF8, 0x0C]
        );
        assert_eq!(
            word_io(0xD00, 0xFFFF),
            [0x88, 0x0D, 0x00, 0x01, 0x0C, 0x03, 0, 0, 0x00, 0x0D, 0xFF, 0xFF, 0, 0, 0x00, 0xF3]
        );
        assert_eq!(
            dword_memory(0xC000_0000, 0xFEBF_FFFF, Caching::NonCacheable, true),
            [
                0x87, 0x17, 0x00, 0x00, 0x0C, 0x01, // header, memory, fixed producer, RW
                0, 0, 0, 0, // granularity
                0x00, 0x00, 0x00, 0xC0, // min
                0xFF, 0xFF, 0xBF, 0xFE, // max
                0, 0, 0, 0, // translation
                0x00, 0x00, 0xC0, 0x3E, // length
            ]
        );
        let q = qword_memory(0x1_0000_0000, 0x7F_FFFF_FFFF, Caching::Prefetchable, false);
        assert_eq!(&q[..6], &[0x8A, 0x2B, 0x00, 0x00, 0x0C, 0x06]);
        assert_eq!(q.len(), 46);
        assert_eq!(&q[14..22], &0x1_0000_0000u64.to_le_bytes());
        assert_eq!(&q[22..30], &0x7F_FFFF_FFFFu64.to_le_bytes());
        assert_eq!(&q[38..46], &0x7F_0000_0000u64.to_le_bytes());
    }

    #[test]
    #[should_panic(expected = "too long")]
    fn word_descriptor_refuses_a_full_64k_window() {
        word_io(0, 0xFFFF);
    }

    #[test]
    fn end_tag_checksum_zeroes_the_template() {
        let descriptors = [io(0xCF8, 0xCF8, 1, 8), word_bus_number(0, 0)].concat();
        let end = end_tag(&descriptors);
        assert_eq!(end[0], 0x79);
        let sum = descriptors
            .iter()
            .chain(&end)
            .fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(sum, 0);
        assert_eq!(end_tag(&[]), [0x79, 0x87]);

        let t = resource_template(&[io(0xCF8, 0xCF8, 1, 8)]);
        // Buffer, PkgLength, size 10, the IO descriptor, the end tag.
        assert_eq!(&t[..3], &[0x11, 0x0D, 0x0A]);
        assert_eq!(t[3], 10);
        assert_eq!(t.len(), 14);
        assert_eq!(t[12], 0x79);
        assert_eq!(t[4..].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    }
}
