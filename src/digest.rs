//! Content hashes as the policy and the admin API print them: lowercase hex SHA-256.

use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
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
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
