//! JSON string escaping for text written into JSON by hand (the access log's lines,
//! SPEC §3): RFC 8259 §7, with the usual string, which needs none, checked a word at a
//! time and copied at once.

/// Text escaped once, where the policy is compiled, for the inside of a JSON string: a
/// pool's or server's name goes into every access-log line as it is.
#[derive(Debug)]
pub(crate) struct Escaped(Box<[u8]>);

impl Escaped {
    pub(crate) fn new(text: &str) -> Escaped {
        let mut escaped = Vec::with_capacity(text.len());
        escape_into(&mut escaped, text);
        Escaped(escaped.into_boxed_slice())
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A header value as the inside of a JSON string, invalid UTF-8 replaced; the usual
/// value, ASCII with nothing to escape, is copied as it is, checked in one pass.
pub(crate) fn escape_value_into(buf: &mut Vec<u8>, bytes: &[u8]) {
    if clean_prefix::<true>(bytes) == bytes.len() {
        buf.extend_from_slice(bytes);
    } else {
        escape_into(buf, &lossy(bytes));
    }
}

/// A header value as text, invalid UTF-8 replaced. `str::from_utf8` first: it checks
/// ASCII a word at a time, where `from_utf8_lossy` walks every byte.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Appends `text` as the inside of a JSON string (RFC 8259 §7): quotation mark,
/// reverse solidus and control characters escaped, everything else as it is.
pub(crate) fn escape_into(buf: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    // Most values need no escaping: checked eight bytes at a time, then copied at once.
    let clean = clean_prefix::<false>(bytes);
    if clean == bytes.len() {
        buf.extend_from_slice(bytes);
        return;
    }
    buf.extend_from_slice(&bytes[..clean]);
    let mut start = clean;
    for (i, &byte) in bytes.iter().enumerate().skip(clean) {
        let unicode;
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                unicode = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                &unicode
            }
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// How many leading bytes need no escaping, in whole words of eight (SWAR: a byte is
/// flagged when it is below 0x20, `"` or `\\`, or, with `ASCII`, above 0x7f); all of them
/// when none does. The tail is checked as the string's last eight bytes, or byte by byte
/// in a shorter string.
fn clean_prefix<const ASCII: bool>(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let flagged = |x: u64| {
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let quote = has_zero(x ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(x ^ (ONES * u64::from(b'\\')));
        let high = if ASCII { x & HIGHS } else { 0 };
        control | quote | backslash | high != 0
    };
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let mut clean = 0;
    for word in words {
        if flagged(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
            return clean;
        }
        clean += 8;
    }
    let tail_clean = match bytes.len() {
        0 => true,
        1..8 => !tail
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\' || (ASCII && b > 0x7f)),
        len => !flagged(u64::from_le_bytes(
            bytes[len - 8..].try_into().expect("eight bytes"),
        )),
    };
    if tail_clean {
        bytes.len()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_never_skips_a_byte_that_needs_escaping() {
        for special in [b'"', b'\\', b'\n', 0u8, 0x1f, 0x7f, 0x80, 0xff, b' '] {
            for len in 1..=17 {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    let needs = special < 0x20 || special == b'"' || special == b'\\';
                    for (clean, needs) in [
                        (clean_prefix::<false>(&bytes), needs),
                        (clean_prefix::<true>(&bytes), needs || special > 0x7f),
                    ] {
                        if needs {
                            assert!(clean <= at, "{special:#x} at {at} of {len}: {clean}");
                        } else {
                            assert_eq!(clean, len, "{special:#x} at {at} of {len}");
                        }
                    }
                }
            }
        }
        assert_eq!(clean_prefix::<false>(b""), 0);
        assert_eq!(clean_prefix::<true>(b""), 0);
    }

    #[test]
    fn header_values_are_copied_escaped_or_repaired() {
        let inside = |bytes: &[u8]| {
            let mut buf = b"\"".to_vec();
            escape_value_into(&mut buf, bytes);
            buf.push(b'"');
            serde_json::from_slice::<String>(&buf).unwrap()
        };
        assert_eq!(inside(b"text/html; q=0.9"), "text/html; q=0.9");
        assert_eq!(inside(b"say \"hi\"\t"), "say \"hi\"\t");
        assert_eq!(inside("café".as_bytes()), "café");
        assert_eq!(inside(b"bad \xff byte"), "bad \u{fffd} byte");
    }

    #[test]
    fn escaped_names_are_json_strings_of_the_name() {
        for name in ["api", "say \"hi\"", "back\\slash\ttab", "café"] {
            let mut quoted = b"\"".to_vec();
            quoted.extend_from_slice(Escaped::new(name).as_bytes());
            quoted.push(b'"');
            assert_eq!(serde_json::from_slice::<String>(&quoted).unwrap(), name);
        }
    }
}
