//! Content hashes as the policy and the admin API print them: lowercase hex SHA-256.

use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    write_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Writes the lowercase hex of `bytes` into the first `2 * bytes.len()` bytes of `out`:
/// ids on the request path (request id, trace and span ids, about 40 bytes a request)
/// are written so, without a `String`. Eight bytes at a time: a byte's two digits cost
/// two table loads, two checked stores and the loop's step, about nine instructions;
/// a word's sixteen about forty-five.
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let whole = bytes.len() - tail.len();
    for (digits, word) in out.chunks_exact_mut(16).zip(words) {
        let word = u64::from_be_bytes(word.try_into().expect("eight bytes"));
        digits.copy_from_slice(&hex_word(word).to_be_bytes());
    }
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out[2 * whole..].chunks_exact_mut(2).zip(tail) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

/// The sixteen hex digits of `word`, most significant first, as the bytes of a
/// big-endian integer: each nibble spread to a byte of its own, then `'0'` added to
/// each, and `'a' - '0' - 10` more to each above 9. No byte exceeds 0x7f on the way,
/// so nothing carries from one into the next.
fn hex_word(word: u64) -> u128 {
    const ONES: u128 = u128::MAX / 0xff;
    let mut v = u128::from(word);
    v = (v | (v << 32)) & 0x0000_0000_ffff_ffff_0000_0000_ffff_ffff;
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff_0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & (ONES * 0x0f);
    let above_nine = ((v + ONES * 6) >> 4) & ONES;
    v + ONES * u128::from(b'0') + above_nine * u128::from(b'a' - b'0' - 10)
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
        let mut ids = [0u8; 34];
        write_hex(
            &mut ids,
            &0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128.to_be_bytes(),
        );
        assert_eq!(&ids, b"0123456789abcdeffedcba9876543210\0\0");
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_by_words_is_hex_by_bytes() {
        // Every length to three words and a half, bytes at the edges of each nibble's
        // range and random ones, against the digits `format!` writes.
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..=28 {
            for round in 0..64 {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| match round {
                        0 => 0x00,
                        1 => 0xff,
                        2 => 0x9a,
                        3 => 0xa9,
                        _ => rng.u8(..).wrapping_add(i as u8),
                    })
                    .collect();
                let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                // Room for more than the digits, by less and by more than a word's.
                let spare = if round % 2 == 0 { 3 } else { 40 };
                let mut out = vec![b'.'; 2 * len + spare];
                write_hex(&mut out, &bytes);
                assert_eq!(&out[..2 * len], expected.as_bytes(), "{bytes:02x?}");
                assert!(out[2 * len..].iter().all(|&b| b == b'.'), "{bytes:02x?}");
            }
        }
    }
}
