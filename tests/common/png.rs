//! Hand-made PNG files for tests of hostile input: any header and any chunks, with correct
//! checksums, so that a decoder gets past them to the part under test.

/// CRC-32 as PNG computes it (reflected polynomial 0xEDB88320, all ones in and out).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// One chunk: length, kind, data, CRC of kind and data.
pub fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[&kind[..], data].concat()).to_be_bytes());
    out
}

/// A PNG of `width` x `height` 8-bit RGB by its header, with `chunks` between the header and the
/// end: no IDAT among them makes a file that claims its size but holds no pixels.
pub fn png(width: u32, height: u32, chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, adaptive filters, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &header));
    chunks.iter().for_each(|c| out.extend_from_slice(c));
    out.extend(chunk(b"IEND", &[]));
    out
}

#[test]
fn crc32_is_pngs() {
    // The CRC of an IEND chunk's kind, as every PNG file ends with it.
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}
