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

//! What a head's framing fields resolved to, kept once asked.

use crate::HMap;
use http::header::{HeaderName, CONTENT_LENGTH, TRANSFER_ENCODING};
use pingora_error::Result;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// What a head's `Content-Length` and `Transfer-Encoding` fields resolved to, kept from
/// the first time each is asked.
///
/// An HTTP/1 session asks the same head several times (when it reads and validates it,
/// when it makes the body reader, when it writes the head and makes the body writer), and
/// each answer is a lookup and, for `Content-Length`, a parse. The rules that resolve the
/// fields belong to the caller, which passes them in; the head forgets an answer when one
/// of its own methods changes the field the answer came from, and nothing else can change
/// a head's fields. A resolver must therefore read only the fields of the head the memo
/// belongs to.
#[derive(Debug, Default)]
pub struct FramingMemo {
    /// 0: not resolved; 1: absent; `n + 2`: `n`. An error is not kept.
    content_length: AtomicU64,
    /// 0: not resolved; 1: not chunked; 2: chunked is the final transfer coding.
    chunked: AtomicU8,
}

const UNKNOWN: u64 = 0;
const ABSENT: u64 = 1;
const NOT_CHUNKED: u8 = 1;
const CHUNKED: u8 = 2;

impl FramingMemo {
    /// The head's `Content-Length` as `resolve` reads it from the head's fields, resolved
    /// on the first call (and again after an error, which is not kept).
    pub fn content_length(
        &self,
        resolve: impl FnOnce() -> Result<Option<usize>>,
    ) -> Result<Option<usize>> {
        match self.content_length.load(Ordering::Relaxed) {
            UNKNOWN => {}
            ABSENT => return Ok(None),
            kept => return Ok(Some((kept - 2) as usize)),
        }
        let resolved = resolve()?;
        let kept = match resolved {
            None => Some(ABSENT),
            Some(length) => (length as u64).checked_add(2),
        };
        if let Some(kept) = kept {
            self.content_length.store(kept, Ordering::Relaxed);
        }
        Ok(resolved)
    }

    /// Whether chunked is the head's final transfer coding, as `resolve` reads it from
    /// the head's fields, resolved on the first call.
    pub fn chunked(&self, resolve: impl FnOnce() -> bool) -> bool {
        match self.chunked.load(Ordering::Relaxed) {
            NOT_CHUNKED => return false,
            CHUNKED => return true,
            _ => {}
        }
        let chunked = resolve();
        let kept = if chunked { CHUNKED } else { NOT_CHUNKED };
        self.chunked.store(kept, Ordering::Relaxed);
        chunked
    }

    /// A field named `name` was added or replaced.
    pub(crate) fn changed(&mut self, name: &HeaderName) {
        if name == CONTENT_LENGTH {
            *self.content_length.get_mut() = UNKNOWN;
        } else if name == TRANSFER_ENCODING {
            *self.chunked.get_mut() = 0;
        }
    }

    /// Every value of some field was removed from `headers`. Removing cannot make an
    /// absent field present, so only an answer that found the field is looked at again:
    /// it stands if the field is still there.
    pub(crate) fn removed(&mut self, headers: &HMap) {
        let length = self.content_length.get_mut();
        if *length > ABSENT && !headers.contains_key(CONTENT_LENGTH) {
            *length = UNKNOWN;
        }
        let chunked = self.chunked.get_mut();
        if *chunked == CHUNKED && !headers.contains_key(TRANSFER_ENCODING) {
            *chunked = 0;
        }
    }
}

impl Clone for FramingMemo {
    fn clone(&self) -> Self {
        FramingMemo {
            content_length: AtomicU64::new(self.content_length.load(Ordering::Relaxed)),
            chunked: AtomicU8::new(self.chunked.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_error::{Error, ErrorType::InvalidHTTPHeader};
    use std::cell::Cell;

    #[test]
    fn resolves_once_and_keeps_the_answer() {
        let memo = FramingMemo::default();
        let calls = Cell::new(0);
        let resolve = || {
            calls.set(calls.get() + 1);
            Ok(Some(42))
        };
        assert_eq!(memo.content_length(resolve).unwrap(), Some(42));
        assert_eq!(memo.content_length(resolve).unwrap(), Some(42));
        assert_eq!(calls.get(), 1);

        let absent = FramingMemo::default();
        assert_eq!(absent.content_length(|| Ok(None)).unwrap(), None);
        assert_eq!(absent.content_length(|| unreachable!()).unwrap(), None);

        let zero = FramingMemo::default();
        assert_eq!(zero.content_length(|| Ok(Some(0))).unwrap(), Some(0));
        assert_eq!(zero.content_length(|| unreachable!()).unwrap(), Some(0));

        let chunked = FramingMemo::default();
        assert!(chunked.chunked(|| true));
        assert!(chunked.chunked(|| unreachable!()));
        let plain = FramingMemo::default();
        assert!(!plain.chunked(|| false));
        assert!(!plain.chunked(|| unreachable!()));
    }

    #[test]
    fn an_error_is_resolved_again() {
        let memo = FramingMemo::default();
        assert!(memo
            .content_length(|| Error::e_explain(InvalidHTTPHeader, "invalid"))
            .is_err());
        assert_eq!(memo.content_length(|| Ok(Some(7))).unwrap(), Some(7));
    }

    #[test]
    fn a_length_it_cannot_encode_is_not_kept() {
        let memo = FramingMemo::default();
        assert_eq!(
            memo.content_length(|| Ok(Some(usize::MAX))).unwrap(),
            Some(usize::MAX)
        );
        assert_eq!(memo.content_length(|| Ok(Some(3))).unwrap(), Some(3));
    }

    #[test]
    fn a_change_to_a_framing_field_forgets_its_answer_only() {
        let mut memo = FramingMemo::default();
        memo.content_length(|| Ok(Some(5))).unwrap();
        memo.chunked(|| true);
        memo.changed(&http::header::CONNECTION);
        assert_eq!(memo.content_length(|| unreachable!()).unwrap(), Some(5));
        assert!(memo.chunked(|| unreachable!()));
        memo.changed(&CONTENT_LENGTH);
        assert_eq!(memo.content_length(|| Ok(Some(9))).unwrap(), Some(9));
        assert!(memo.chunked(|| unreachable!()));
        memo.changed(&TRANSFER_ENCODING);
        assert!(!memo.chunked(|| false));
    }

    #[test]
    fn a_removal_forgets_an_answer_whose_field_is_gone() {
        let mut headers = HMap::new();
        headers.insert(CONTENT_LENGTH, "5".parse().unwrap());
        headers.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        let mut memo = FramingMemo::default();
        memo.content_length(|| Ok(Some(5))).unwrap();
        memo.chunked(|| true);

        headers.remove(http::header::CONNECTION);
        memo.removed(&headers);
        assert_eq!(memo.content_length(|| unreachable!()).unwrap(), Some(5));
        assert!(memo.chunked(|| unreachable!()));

        headers.remove(CONTENT_LENGTH);
        memo.removed(&headers);
        assert_eq!(memo.content_length(|| Ok(None)).unwrap(), None);
        assert!(memo.chunked(|| unreachable!()));

        headers.remove(TRANSFER_ENCODING);
        memo.removed(&headers);
        assert!(!memo.chunked(|| false));
    }
}
