// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! How a head keeps the letter case its field names were spelled in.
//!
//! Most heads spell every name one way: all lowercase (HTTP/2 habits, hyper, many
//! clients) or Title-Case (curl, browsers, nginx and most servers). Such a head needs no
//! per-field record: the spelling follows from the name. A map of spellings, one per
//! value, is made only when a name arrives spelled some other way, from the names
//! already there (their spelling is known) and in the value map's order, which it then
//! shares as the eager map always did. The bytes written are the same either way.

use crate::case_header_name::{self, CaseHeaderName, IntoCaseHeaderName};
use crate::{CaseMap, HMap, HeaderNameVariant};
use bytes::{BufMut, Bytes};
use http::header::{AsHeaderName, HeaderName, HeaderValue};
use pingora_error::{ErrorType::*, OrErr, Result};

/// `content-type`: the name as `http` holds it.
const LOWER: u8 = 1;
/// `Content-Type`: a capital letter first and after each `-`, the rest lowercase.
const TITLE: u8 = 2;

#[derive(Debug, Clone)]
pub(crate) enum NameCase {
    /// Not kept (a head built without case, or made from `http` parts): names are
    /// written in Pingora's canonical spelling.
    Canonical,
    /// Kept, and every name added so far is spelled by each rule in this set (never
    /// empty): the spelling is derived when written.
    Derived(u8),
    /// Kept, one spelling per value, iterated in step with the value map.
    Mapped(CaseMap),
}

/// A field name as spelled where it came from.
pub(crate) trait Spelling {
    fn spelled(&self) -> &[u8];

    /// The spelling as a map of spellings holds it.
    fn into_case(self) -> CaseHeaderName;
}

impl Spelling for CaseHeaderName {
    fn spelled(&self) -> &[u8] {
        self.as_slice()
    }

    fn into_case(self) -> CaseHeaderName {
        self
    }
}

/// A name as read off the wire, and how to take a share of the read buffer holding it:
/// taken only when its spelling is mapped, so a head whose names are all spelled one
/// way holds no share of the buffer for them, and takes and drops none (two atomic
/// operations a field).
pub(crate) struct ReadName<'a, F>(pub(crate) &'a [u8], pub(crate) F);

impl<F: FnOnce() -> Bytes> Spelling for ReadName<'_, F> {
    fn spelled(&self) -> &[u8] {
        self.0
    }

    fn into_case(self) -> CaseHeaderName {
        (self.1)().into_case_header_name()
    }
}

/// Whether a value is added beside the name's others or replaces them.
#[derive(Clone, Copy)]
pub(crate) enum Add {
    Append,
    Insert,
}

impl NameCase {
    pub(crate) fn kept() -> Self {
        NameCase::Derived(LOWER | TITLE)
    }

    pub(crate) fn is_kept(&self) -> bool {
        !matches!(self, NameCase::Canonical)
    }

    /// Records the spelling of a value about to be added to `values` under `name`; call
    /// it before the value map changes.
    pub(crate) fn add<T>(
        &mut self,
        values: &HMap<T>,
        name: &HeaderName,
        spelling: impl Spelling,
        how: Add,
    ) -> Result<()> {
        let case = match self {
            NameCase::Canonical => return Ok(()),
            NameCase::Derived(rules) => {
                let fits = spellings(*rules, spelling.spelled());
                if fits != 0 {
                    *rules = fits;
                    return Ok(());
                }
                *self = NameCase::Mapped(mapped(*rules, values)?);
                spelling.into_case()
            }
            NameCase::Mapped(_) => spelling.into_case(),
        };
        let NameCase::Mapped(map) = self else {
            unreachable!("the spellings are mapped by now")
        };
        match how {
            // The non-panicking `try_append`: `append` aborts the process if the map
            // ever exceeded `http`'s `MAX_SIZE` (1 << 15).
            Add::Append => {
                map.try_append(name.clone(), case)
                    .or_err(InvalidHTTPHeader, "header name map size overflows MAX_SIZE")?;
            }
            Add::Insert => {
                map.insert(name.clone(), case);
            }
        }
        Ok(())
    }

    /// Records a value about to be inserted under `name`, spelled like the names there:
    /// all lowercase when they all are, Title-Case otherwise.
    pub(crate) fn add_alike(&mut self, name: &HeaderName) {
        match self {
            NameCase::Canonical => {}
            NameCase::Derived(rules) => *rules = if *rules == LOWER { LOWER } else { TITLE },
            NameCase::Mapped(map) => {
                map.insert(name.clone(), spelled_name(TITLE, name));
            }
        }
    }

    /// Forgets the spellings of `name`, whose values were just removed.
    pub(crate) fn remove<'a, N: ?Sized>(&mut self, name: &'a N)
    where
        &'a N: 'a + AsHeaderName,
    {
        if let NameCase::Mapped(map) = self {
            map.remove(name);
        }
    }

    pub(crate) fn to_h1_wire(&self, values: &HMap, buf: &mut impl BufMut) {
        match self {
            NameCase::Mapped(map) => {
                for (name, value) in in_step(map, values) {
                    put_field(buf, name.as_slice(), false, value.as_bytes());
                }
            }
            NameCase::Derived(rules) => {
                let title = *rules & LOWER == 0;
                for (name, value) in values {
                    put_field(buf, name.as_str().as_bytes(), title, value.as_bytes());
                }
            }
            NameCase::Canonical => {
                for (name, value) in values {
                    put_field(buf, canonical(name).as_bytes(), false, value.as_bytes());
                }
            }
        }
    }

    /// Each value with the spelling of its name; nothing when case is not kept.
    pub(crate) fn iter<'a>(
        &'a self,
        values: &'a HMap,
    ) -> impl Iterator<Item = (CaseHeaderName, &'a HeaderValue)> + 'a {
        let map = match self {
            NameCase::Mapped(map) => Some(map),
            _ => None,
        };
        let rules = match self {
            NameCase::Derived(rules) => Some(*rules),
            _ => None,
        };
        let mapped = map
            .into_iter()
            .flat_map(move |map| in_step(map, values).map(|(name, value)| (name.clone(), value)));
        let derived = rules.into_iter().flat_map(move |rules| {
            values
                .iter()
                .map(move |(name, value)| (spelled_name(rules, name), value))
        });
        mapped.chain(derived)
    }

    pub(crate) fn for_each<F>(&self, values: &HMap, mut f: F) -> Result<()>
    where
        F: FnMut(HeaderNameVariant, &HeaderValue) -> Result<()>,
    {
        match self {
            NameCase::Mapped(map) => {
                for (name, value) in in_step(map, values) {
                    f(HeaderNameVariant::Case(name), value)?;
                }
            }
            NameCase::Derived(rules) => {
                let mut spelled = Vec::new();
                for (name, value) in values {
                    spelled.clear();
                    put_spelled(*rules, name, &mut spelled);
                    // Derived from a valid name: ASCII.
                    let spelled = std::str::from_utf8(&spelled).unwrap_or(name.as_str());
                    f(HeaderNameVariant::Titled(spelled), value)?;
                }
            }
            NameCase::Canonical => {
                for (name, value) in values {
                    f(HeaderNameVariant::Titled(canonical(name)), value)?;
                }
            }
        }
        Ok(())
    }
}

/// Which of `rules` derive `spelled`, a spelling of a valid name (ASCII, so a sum on a
/// word below never carries from one byte into the next), from that name.
fn spellings(rules: u8, spelled: &[u8]) -> u8 {
    let mut fits = rules;
    each_word(spelled, |_, word, starts| {
        if word & HIGH != 0 {
            fits = 0;
            return false;
        }
        let upper = bytes_in(word, b'A', b'Z');
        if upper != 0 {
            fits &= !LOWER;
        }
        if upper != starts & (upper | bytes_in(word, b'a', b'z')) {
            fits &= !TITLE;
        }
        fits != 0
    });
    fits
}

/// The map of spellings of every value in `values`, each spelled by `rules`.
fn mapped<T>(rules: u8, values: &HMap<T>) -> Result<CaseMap> {
    let mut map = CaseMap::with_capacity(values.capacity());
    for (name, _) in values {
        map.try_append(name.clone(), spelled_name(rules, name))
            .or_err(InvalidHTTPHeader, "header name map size overflows MAX_SIZE")?;
    }
    Ok(map)
}

/// `name` spelled by `rules`, as a spelling a map of spellings holds.
fn spelled_name(rules: u8, name: &HeaderName) -> CaseHeaderName {
    let mut spelled = Vec::with_capacity(name.as_str().len());
    put_spelled(rules, name, &mut spelled);
    Bytes::from(spelled).into_case_header_name()
}

fn put_spelled(rules: u8, name: &HeaderName, buf: &mut impl BufMut) {
    if rules & LOWER != 0 {
        buf.put_slice(name.as_str().as_bytes());
    } else {
        put_title(name.as_str().as_bytes(), buf);
    }
}

/// Appends the field `name: value` and its CRLF to `buf`; `name` as `http` holds it
/// (lowercase) is Title-Cased when `title`, else written as it is.
///
/// A head is serialized into a buffer with room for all of it (Pingora's HTTP/1 sessions
/// write each head into a thread's 4 KiB buffer), a field at a time, every field of every
/// request and response. So a field is stored straight into the buffer's spare room,
/// after one check that the room is there: a Title-Cased name a word at a time, the
/// other pieces by a few overlapping loads and stores. Put piece by piece, a field took
/// four room checks and length updates, two calls to `memcpy` for a few bytes each, and
/// a Title-Cased name was spelled on the stack first and copied. A buffer without the
/// room takes the field piece by piece.
fn put_field(buf: &mut impl BufMut, name: &[u8], title: bool, value: &[u8]) {
    let len = name.len() + value.len() + 4;
    // A Title-Cased name's last word is stored whole, up to 7 bytes past the name's end:
    // the rest of the field covers them, or the room past it, which is left uncounted.
    let room = len + 7;
    let chunk = buf.chunk_mut();
    if chunk.len() < room {
        if title {
            put_title(name, buf);
        } else {
            buf.put_slice(name);
        }
        buf.put_slice(b": ");
        buf.put_slice(value);
        buf.put_slice(b"\r\n");
        return;
    }
    let dst = chunk.as_mut_ptr();
    // SAFETY: every store is within the chunk's first `room` bytes, which it has (a
    // title word ends at most 7 bytes past the name's end, `copy_short` writes exactly
    // its source's length); the field's `len` bytes are all written before `advance_mut`
    // counts them.
    unsafe {
        if title {
            store_title(name, dst);
        } else {
            copy_short(name, dst);
        }
        let at = name.len();
        dst.add(at).cast::<[u8; 2]>().write_unaligned(*b": ");
        copy_short(value, dst.add(at + 2));
        dst.add(len - 2).cast::<[u8; 2]>().write_unaligned(*b"\r\n");
        buf.advance_mut(len);
    }
}

/// Copies `src` to `dst`, exactly its length: up to 64 bytes (nearly every field name
/// and value) by two overlapping loads and stores of the widest size that fits, inline,
/// longer ones by `memcpy`.
///
/// # Safety
///
/// `dst` is valid for `src.len()` bytes of writes and does not overlap `src`.
unsafe fn copy_short(src: &[u8], dst: *mut u8) {
    /// The first and the last `W` bytes of the `n` (`W..=2 * W`) at `s`, to `d`.
    unsafe fn ends<const W: usize>(s: *const u8, d: *mut u8, n: usize) {
        // SAFETY: the caller's `n` is at least `W`, so both ends lie within the `n`
        // bytes at `s` and at `d`.
        unsafe {
            let head = s.cast::<[u8; W]>().read_unaligned();
            let tail = s.add(n - W).cast::<[u8; W]>().read_unaligned();
            d.cast::<[u8; W]>().write_unaligned(head);
            d.add(n - W).cast::<[u8; W]>().write_unaligned(tail);
        }
    }
    let n = src.len();
    let s = src.as_ptr();
    // SAFETY: each arm reads and writes within the first `n` bytes of `src` and `dst`.
    unsafe {
        match n {
            0 => {}
            1..=3 => {
                *dst = *s;
                *dst.add(n / 2) = *s.add(n / 2);
                *dst.add(n - 1) = *s.add(n - 1);
            }
            4..=7 => ends::<4>(s, dst, n),
            8..=15 => ends::<8>(s, dst, n),
            16..=31 => ends::<16>(s, dst, n),
            32..=64 => ends::<32>(s, dst, n),
            _ => std::ptr::copy_nonoverlapping(s, dst, n),
        }
    }
}

fn put_title(name: &[u8], buf: &mut impl BufMut) {
    // Spelled on the stack (a name longer than 64 bytes in a vector) and put in one
    // piece: `put_u8` on a `BytesMut` checks its room byte by byte.
    let mut piece = [0u8; 64 + 7];
    let mut long = Vec::new();
    let room = if name.len() + 7 <= piece.len() {
        &mut piece[..]
    } else {
        long.resize(name.len() + 7, 0);
        &mut long[..]
    };
    // SAFETY: `room` has the `name.len() + 7` bytes `store_title` needs.
    unsafe { store_title(name, room.as_mut_ptr()) };
    buf.put_slice(&room[..name.len()]);
}

/// Stores `lower` (a name as `http` holds it: ASCII, no capitals) Title-Cased at `dst`,
/// a word at a time as in [each_word].
///
/// # Safety
///
/// `dst` is valid for `lower.len() + 7` bytes of writes (a name shorter than a word is
/// stored as a whole word) and does not overlap `lower`.
unsafe fn store_title(lower: &[u8], dst: *mut u8) {
    each_word(lower, |at, word, starts| {
        // 0x80 >> 2 is 0x20, the bit that makes a lowercase letter a capital.
        let title = word ^ ((starts & bytes_in(word, b'a', b'z')) >> 2);
        // SAFETY: `at` is at most `lower.len() - 8` for a name of a word or more, and 0
        // for a shorter one: the word ends within the caller's room.
        unsafe {
            dst.add(at)
                .cast::<[u8; 8]>()
                .write_unaligned(title.to_le_bytes())
        };
        true
    });
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Calls `each(at, word, starts)` for words covering `name` (ASCII), until it returns
/// false: `word` the name's eight bytes from `at`, little-endian, and `starts` the high
/// bit of each of its bytes that starts a word of the name (the name's first byte, and
/// each after a `-`). A name of eight bytes or more is covered by whole words, the last
/// one ending where the name does and overlapping the one before it; a shorter name by
/// one word, zeros after it; an empty one by none. A loop of plain loads: through
/// `chunks`, two iterator adaptors and a match on each chunk's length, a name took about
/// 20 instructions more.
#[inline(always)]
fn each_word(name: &[u8], mut each: impl FnMut(usize, u64, u64) -> bool) {
    let n = name.len();
    let load = |at: usize| u64::from_le_bytes(name[at..at + 8].try_into().unwrap());
    let dashes = |word: u64| bytes_in(word, b'-', b'-');
    if n < 8 {
        if n > 0 {
            let word = short_word(name);
            each(0, word, (dashes(word) << 8) | 0x80);
        }
        return;
    }
    let mut at = 0;
    let mut starts_next = 0x80;
    while at + 8 < n {
        let word = load(at);
        let dash = dashes(word);
        if !each(at, word, (dash << 8) | starts_next) {
            return;
        }
        starts_next = dash >> 56;
        at += 8;
    }
    let last = n - 8;
    let starts_last = if last == 0 || name[last - 1] == b'-' {
        0x80
    } else {
        0
    };
    let word = load(last);
    each(last, word, (dashes(word) << 8) | starts_last);
}

/// The high bit of each byte of `word` (all below 0x80) that is in `low..=high`.
fn bytes_in(word: u64, low: u8, high: u8) -> u64 {
    let at_least_low = word + ONES * (0x80 - u64::from(low));
    let above_high = word + ONES * (0x80 - u64::from(high) - 1);
    at_least_low & !above_high & HIGH
}

/// A name of one to seven bytes as a little-endian word, zeros after it: read as two
/// overlapping loads rather than copied (a call to `memcpy`) or read one by one.
fn short_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let load4 = |at: usize| u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
    let load2 = |at: usize| u64::from(u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap()));
    match n {
        4..=7 => load4(0) | (load4(n - 4) << ((n - 4) * 8)),
        2..=3 => load2(0) | (load2(n - 2) << ((n - 2) * 8)),
        1 => u64::from(bytes[0]),
        _ => unreachable!("an empty name has no word, a longer one is read by whole words"),
    }
}

fn canonical(name: &HeaderName) -> &str {
    case_header_name::titled_header_name_str(name).unwrap_or(name.as_str())
}

fn in_step<'a>(
    map: &'a CaseMap,
    values: &'a HMap,
) -> impl Iterator<Item = (&'a CaseHeaderName, &'a HeaderValue)> + 'a {
    map.iter()
        .zip(values.iter())
        .map(|((h1, name), (h2, value))| {
            // in case the header iteration order changes in future versions of HMap
            assert_eq!(h1, h2, "header iter mismatch {}, {}", h1, h2);
            (name, value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RequestHeader, ResponseHeader};
    use bytes::BytesMut;

    fn wire(resp: &ResponseHeader) -> String {
        let mut buf = Vec::new();
        resp.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    fn response(names: &[&'static str]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (i, name) in names.iter().enumerate() {
            resp.append_header(*name, i.to_string()).unwrap();
        }
        resp
    }

    #[test]
    fn spellings_of_a_name() {
        let both = LOWER | TITLE;
        assert_eq!(spellings(both, b"x-forwarded-for"), LOWER);
        assert_eq!(spellings(both, b"X-Forwarded-For"), TITLE);
        assert_eq!(spellings(TITLE, b"x-forwarded-for"), 0);
        assert_eq!(spellings(LOWER, b"X-Forwarded-For"), 0);
        assert_eq!(spellings(both, b"X-forwarded-for"), 0);
        assert_eq!(spellings(both, b"x-Forwarded-For"), 0);
        assert_eq!(spellings(both, b"X-FORWARDED-FOR"), 0);
        assert_eq!(spellings(both, b"1-2"), both);
        assert_eq!(spellings(both, b"ETag"), 0);
        assert_eq!(spellings(both, b"Etag"), TITLE);
        let long = "x-".repeat(40) + "long";
        let long = HeaderName::from_bytes(long.as_bytes()).unwrap();
        let mut spelled = Vec::new();
        put_title(long.as_str().as_bytes(), &mut spelled);
        assert_eq!(spelled, ("X-".repeat(40) + "Long").as_bytes());
        assert_eq!(spellings(both, &spelled), TITLE);
    }

    #[test]
    fn an_empty_name_is_no_word() {
        // The room `store_title` asks for is the name's length and 7: none of it is
        // written for an empty name, and both rules fit it.
        let mut room = [0xaa_u8; 8];
        unsafe { store_title(b"", room.as_mut_ptr()) };
        assert_eq!(room, [0xaa; 8]);
        assert_eq!(spellings(LOWER | TITLE, b""), LOWER | TITLE);
    }

    #[test]
    fn title_case_by_words_matches_byte_by_byte() {
        let tokens: Vec<u8> = (0u8..0x80)
            .filter(|b| HeaderName::from_bytes(&[*b]).is_ok())
            .collect();
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        for len in 1..40 {
            for _ in 0..200 {
                let raw: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        // Dashes often, so that words start anywhere in a chunk.
                        if seed.is_multiple_of(4) {
                            b'-'
                        } else {
                            tokens[(seed >> 8) as usize % tokens.len()]
                        }
                    })
                    .collect();
                let name = HeaderName::from_bytes(&raw).unwrap();
                let lower = name.as_str().as_bytes();
                let mut word_start = true;
                let expected: Vec<u8> = lower
                    .iter()
                    .map(|&l| {
                        let t = if word_start {
                            l.to_ascii_uppercase()
                        } else {
                            l
                        };
                        word_start = l == b'-';
                        t
                    })
                    .collect();
                let mut spelled = Vec::new();
                put_title(name.as_str().as_bytes(), &mut spelled);
                assert_eq!(spelled, expected, "{:?}", name);
                // A spelling with letters in random case fits a rule exactly when it is
                // that rule's spelling.
                let variant: Vec<u8> = lower
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        match seed % 3 {
                            0 => l.to_ascii_uppercase(),
                            1 => l,
                            _ => expected[i],
                        }
                    })
                    .collect();
                for spelled in [&variant[..], lower, &expected[..]] {
                    let mut fits = 0;
                    if spelled == lower {
                        fits |= LOWER;
                    }
                    if spelled == &expected[..] {
                        fits |= TITLE;
                    }
                    assert_eq!(spellings(LOWER | TITLE, spelled), fits, "{:?}", spelled);
                }
            }
        }
    }

    #[test]
    fn uniform_heads_are_written_as_spelled_without_a_map() {
        for names in [
            &["content-type", "x-request-id", "set-cookie", "set-cookie"][..],
            &["Content-Type", "X-Request-Id", "Set-Cookie", "Set-Cookie"][..],
            &["1-2", "Server"][..],
        ] {
            let resp = response(names);
            assert!(
                matches!(resp.name_case(), NameCase::Derived(_)),
                "{names:?}"
            );
            let expected: String = names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{n}: {i}\r\n"))
                .collect();
            assert_eq!(wire(&resp), expected);
        }
    }

    #[test]
    fn the_first_name_spelled_otherwise_maps_every_spelling() {
        let mut resp = response(&["Content-Type", "Set-Cookie", "Server"]);
        resp.append_header("set-cookie", "3").unwrap();
        resp.append_header("ETag", "4").unwrap();
        resp.insert_header("x-custom", "5").unwrap();
        assert!(matches!(resp.name_case(), NameCase::Mapped(_)));
        assert_eq!(
            wire(&resp),
            "Content-Type: 0\r\nSet-Cookie: 1\r\nset-cookie: 3\r\nServer: 2\r\n\
             ETag: 4\r\nx-custom: 5\r\n"
        );
        resp.remove_header("set-cookie");
        resp.insert_header("Server", "6").unwrap();
        assert_eq!(
            wire(&resp),
            "Content-Type: 0\r\nx-custom: 5\r\nServer: 6\r\nETag: 4\r\n"
        );
    }

    #[test]
    fn a_map_made_after_removals_follows_the_value_maps_order() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for name in ["a-one", "b-two", "c-three", "d-four"] {
            req.append_header(name, "v").unwrap();
        }
        req.remove_header("a-one");
        req.append_header("B-Two", "w").unwrap();
        let mut buf = Vec::new();
        req.header_to_h1_wire(&mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "d-four: v\r\nb-two: v\r\nB-Two: w\r\nc-three: v\r\n"
        );
    }

    #[test]
    fn a_read_name_is_shared_only_once_spellings_are_mapped() {
        let read = Bytes::from_static(b"Content-Type\nX-Request-Id\nETag\nServer");
        let mut resp = ResponseHeader::build(200, None).unwrap();
        let mut shares = Vec::new();
        let mut at = 0;
        for line in read.split(|&b| b == b'\n') {
            let range = at..at + line.len();
            at = range.end + 1;
            let value = HeaderValue::from_static("v");
            resp.append_read_header(
                line,
                || {
                    shares.push(line.to_vec());
                    read.slice(range)
                },
                value,
            )
            .unwrap();
            if line == b"X-Request-Id" {
                assert!(matches!(resp.name_case(), NameCase::Derived(TITLE)));
            }
        }
        // The first two follow from their names; from `ETag` on, each is kept as read.
        assert_eq!(shares, [&b"ETag"[..], b"Server"]);
        assert!(matches!(resp.name_case(), NameCase::Mapped(_)));
        assert_eq!(
            wire(&resp),
            "Content-Type: v\r\nX-Request-Id: v\r\nETag: v\r\nServer: v\r\n"
        );
        let mut resp = ResponseHeader::build(200, None).unwrap();
        let invalid = resp.append_read_header(
            b"bad name",
            || unreachable!(),
            HeaderValue::from_static("v"),
        );
        assert!(invalid.is_err());
        assert!(resp.headers.is_empty());
    }

    #[test]
    fn spellings_come_out_of_each_view_alike() {
        for names in [
            &["content-type", "x-a"][..],
            &["Content-Type", "X-A"][..],
            &["Content-Type", "x-a"][..],
        ] {
            let resp = response(names);
            let iterated: Vec<_> = resp
                .case_header_iter()
                .map(|(n, _)| String::from_utf8(n.as_slice().to_vec()).unwrap())
                .collect();
            let mut mapped = Vec::new();
            resp.map(|n, _| {
                mapped.push(match n {
                    HeaderNameVariant::Case(c) => String::from_utf8(c.as_slice().to_vec()).unwrap(),
                    HeaderNameVariant::Titled(t) => t.to_string(),
                });
                Ok(())
            })
            .unwrap();
            assert_eq!(iterated, names);
            assert_eq!(mapped, names);
        }
        let canonical = ResponseHeader::build_no_case(200, None).unwrap();
        assert_eq!(canonical.case_header_iter().count(), 0);
    }

    /// Random edits to a head that maps every spelling from the start (what Pingora did
    /// before) and to one that derives them while it can write the same bytes.
    #[test]
    fn derived_spellings_write_what_a_map_from_the_start_writes() {
        const NAMES: [&str; 12] = [
            "content-type",
            "Content-Type",
            "CONTENT-TYPE",
            "x-a",
            "X-A",
            "x-A",
            "etag",
            "ETag",
            "Etag",
            "set-cookie",
            "Set-Cookie",
            "1-2",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..500 {
            let mut derived = ResponseHeader::build(200, None).unwrap();
            let mut eager = ResponseHeader::build(200, None).unwrap();
            eager.name_case = NameCase::Mapped(CaseMap::default());
            for step in 0..12 {
                let spelled = NAMES[next(NAMES.len())];
                let name = HeaderName::from_bytes(spelled.as_bytes()).unwrap();
                let value = step.to_string();
                for head in [&mut derived, &mut eager] {
                    match step % 4 {
                        0 | 1 => drop(head.append_header(spelled, &value).unwrap()),
                        2 => head.insert_header(spelled, &value).unwrap(),
                        _ => drop(head.remove_header(&name)),
                    }
                }
                assert_eq!(wire(&derived), wire(&eager));
            }
        }
    }

    #[test]
    fn a_field_added_alike_is_spelled_like_the_heads_names() {
        let age = HeaderName::from_static("age");
        let cases = [
            (&["content-type"][..], "content-type: 0\r\nage: 1\r\n"),
            (&["Content-Type"][..], "Content-Type: 0\r\nAge: 1\r\n"),
            (&[][..], "Age: 1\r\n"),
            (&["1-2"][..], "1-2: 0\r\nAge: 1\r\n"),
            (&["ETag"][..], "ETag: 0\r\nAge: 1\r\n"),
            (
                &["content-type", "X-A"][..],
                "content-type: 0\r\nX-A: 1\r\nAge: 1\r\n",
            ),
        ];
        for (names, expected) in cases {
            let mut resp = response(names);
            resp.insert_header_alike(&age, "1").unwrap();
            assert_eq!(wire(&resp), expected, "{names:?}");
            let derived = matches!(resp.name_case(), NameCase::Derived(_));
            assert_eq!(derived, names.len() < 2 && names != ["ETag"], "{names:?}");
        }
        let mut canonical = ResponseHeader::build_no_case(200, None).unwrap();
        canonical.insert_header_alike(&age, "1").unwrap();
        assert_eq!(wire(&canonical), "Age: 1\r\n");
    }

    /// Every field stored straight into the spare room and put piece by piece, against
    /// the head's spellings written with `format!`: names and values of every length
    /// around the copies' widths, Title-Case, lowercase, mapped and canonical heads, into
    /// buffers with room for the whole head, for some fields, and already holding bytes.
    #[test]
    fn fields_are_written_alike_with_and_without_room() {
        let mut seed = 0x517C_C1B7_2722_0A95_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..600 {
            let mut resp = if round % 4 == 3 {
                ResponseHeader::build_no_case(200, None).unwrap()
            } else {
                ResponseHeader::build(200, None).unwrap()
            };
            for _ in 0..1 + next(6) {
                let mut word_start = true;
                let spelled: String = (0..1 + next(90))
                    .map(|_| {
                        let c = if next(5) == 0 {
                            b'-'
                        } else {
                            b'a' + next(26) as u8
                        };
                        let upper = match round % 4 {
                            1 => word_start,
                            2 => next(2) == 0,
                            _ => false,
                        };
                        word_start = c == b'-';
                        char::from(if upper { c.to_ascii_uppercase() } else { c })
                    })
                    .collect();
                let value: String = (0..next(100))
                    .map(|_| char::from(b'!' + next(94) as u8))
                    .collect();
                resp.append_header(spelled, value).unwrap();
            }
            let expected: Vec<u8> = if round % 4 == 3 {
                resp.headers
                    .iter()
                    .flat_map(|(n, v)| {
                        [canonical(n).as_bytes(), b": ", v.as_bytes(), b"\r\n"].concat()
                    })
                    .collect()
            } else {
                resp.case_header_iter()
                    .flat_map(|(n, v)| [n.as_slice(), b": ", v.as_bytes(), b"\r\n"].concat())
                    .collect()
            };
            for capacity in [0, 1, 30, 64, 200, 4096] {
                let mut buf = BytesMut::with_capacity(capacity);
                resp.header_to_h1_wire(&mut buf);
                assert_eq!(
                    &buf[..],
                    &expected[..],
                    "round {round}, capacity {capacity}"
                );
            }
            let mut buf = b"HTTP/1.1 200 OK\r\n".to_vec();
            resp.header_to_h1_wire(&mut buf);
            assert_eq!(&buf[17..], &expected[..], "round {round}");
        }
    }

    #[test]
    fn a_clone_keeps_the_spellings() {
        let resp = response(&["Content-Type", "X-A"]);
        let mut clone = resp.clone();
        assert_eq!(wire(&clone), wire(&resp));
        clone.append_header("x-b", "2").unwrap();
        assert_eq!(wire(&clone), "Content-Type: 0\r\nX-A: 1\r\nx-b: 2\r\n");
        assert_eq!(wire(&resp), "Content-Type: 0\r\nX-A: 1\r\n");
    }
}
