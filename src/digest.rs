//! Content hashes as the policy and the admin API print them: lowercase hex SHA-256.

use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    write_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Writes the lowercase hex of `bytes` into the first `2 * bytes.len()` bytes of `out`,
/// a byte at a time: ids on the request path (request id, trace and span ids) are
/// written so, without a `String`.
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

/// SHA-256 of `text`, in hex: how API keys are written in the policy.
pub(crate) fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// The content hash of a policy: its text and every file it reads.
pub(crate) fn fingerprint(text: &str, read_files: &[PathBuf]) -> String {
    let mut hash = Sha256::new();
    hash.update(text.as_bytes());
    for file in read_files {
        hash.update(file.as_os_str().as_encoded_bytes());
        hash.update(std::fs::read(file).unwrap_or_default());
    }
    hex(&hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let mut out = *b"......";
        write_hex(&mut out, &[0xab, 0x01]);
        assert_eq!(&out, b"ab01..");
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
