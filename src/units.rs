//! The value types of `gateway.yaml` (SPEC §2): durations, rates, sizes and percentages.
//!
//! Each parses from its YAML scalar with a message that says what was expected, so that
//! `tollgate check` can point at the exact value an operator mistyped.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration as StdDuration;

/// A duration written as an integer and a unit: `250ms`, `5s`, `1m`, `2h`, `1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Duration(pub StdDuration);

impl Duration {
    pub(crate) const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }

    pub(crate) const fn from_millis(ms: u64) -> Self {
        Duration(StdDuration::from_millis(ms))
    }

    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let expected = || {
            format!("invalid duration `{text}`: expected an integer and a unit (ms, s, m, h, d), e.g. `250ms` or `5s`")
        };
        let count: u64 = digits.parse().map_err(|_| expected())?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(expected()),
        };
        count
            .checked_mul(millis_per_unit)
            .map(|ms| Duration(StdDuration::from_millis(ms)))
            .ok_or_else(|| format!("duration `{text}` is too large"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (per, unit) in units {
            if ms >= per && ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// A request rate `COUNT/PERIOD`: `100/min`, `20/s`, `50/10s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub period: StdDuration,
}

impl Rate {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let expected = || {
            format!("invalid rate `{text}`: expected COUNT/PERIOD with PERIOD one of s, sec, m, min, h, hour, d, day or a duration, e.g. `100/min` or `50/10s`")
        };
        let (count, period) = text.split_once('/').ok_or_else(expected)?;
        let count: u32 = count.trim().parse().map_err(|_| expected())?;
        if count == 0 {
            return Err(format!(
                "invalid rate `{text}`: the count must be at least 1"
            ));
        }
        let period = match period.trim() {
            "s" | "sec" | "second" => StdDuration::from_secs(1),
            "m" | "min" | "minute" => StdDuration::from_secs(60),
            "h" | "hour" => StdDuration::from_secs(3_600),
            "d" | "day" => StdDuration::from_secs(86_400),
            other => Duration::parse(other).map_err(|_| expected())?.0,
        };
        if period.is_zero() {
            return Err(format!(
                "invalid rate `{text}`: the period must be longer than 0"
            ));
        }
        Ok(Rate { count, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, Duration(self.period))
    }
}

/// A size in bytes: `512`, `64KiB`, `10MiB`, `1GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Size(pub u64);

impl Size {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let expected = || {
            format!("invalid size `{text}`: expected bytes or an integer with KiB, MiB or GiB, e.g. `64KiB`")
        };
        let count: u64 = digits.parse().map_err(|_| expected())?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(expected()),
        };
        count
            .checked_mul(multiplier)
            .map(Size)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A share written as `50%` or `99.9%`, kept as a fraction in 0..=1.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub(crate) struct Percent(pub f64);

impl Percent {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let expected = || {
            format!("invalid percentage `{text}`: expected a number from 0 to 100 followed by %, e.g. `50%`")
        };
        let number = text.strip_suffix('%').ok_or_else(expected)?;
        let value: f64 = number.trim().parse().map_err(|_| expected())?;
        if !(0.0..=100.0).contains(&value) {
            return Err(expected());
        }
        Ok(Percent(value / 100.0))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

/// Deserializes a unit from a YAML scalar, accepting plain integers too (a size of
/// `512` is written without quotes and arrives as a number).
struct ScalarVisitor<T> {
    what: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }
}

macro_rules! deserialize_from_scalar {
    ($ty:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(ScalarVisitor {
                    what: $what,
                    parse: <$ty>::parse,
                })
            }
        }
    };
}

/// Written back as the operator would write it (`5s`, `100/min`, `10MiB`, `50%`):
/// what `check --against` and the reload event compare and show.
macro_rules! serialize_as_text {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

serialize_as_text!(Duration);
serialize_as_text!(Rate);
serialize_as_text!(Size);
serialize_as_text!(Percent);

deserialize_from_scalar!(Duration, "a duration such as `5s`");
deserialize_from_scalar!(Rate, "a rate such as `100/min`");
deserialize_from_scalar!(Size, "a size such as `10MiB`");
deserialize_from_scalar!(Percent, "a percentage such as `50%`");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            Duration::parse("250ms").unwrap().0,
            StdDuration::from_millis(250)
        );
        assert_eq!(Duration::parse("5s").unwrap().0, StdDuration::from_secs(5));
        assert_eq!(Duration::parse("1m").unwrap().0, StdDuration::from_secs(60));
        assert_eq!(
            Duration::parse("2h").unwrap().0,
            StdDuration::from_secs(7200)
        );
        assert_eq!(Duration::parse("0s").unwrap().0, StdDuration::ZERO);
        for bad in ["5", "s", "1.5s", "5 sec", "-1s", "5x", ""] {
            assert!(Duration::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(Duration::parse("90s").unwrap().to_string(), "90s");
        assert_eq!(Duration::parse("120s").unwrap().to_string(), "2m");
    }

    #[test]
    fn rates() {
        let r = Rate::parse("100/min").unwrap();
        assert_eq!((r.count, r.period), (100, StdDuration::from_secs(60)));
        let r = Rate::parse("50/10s").unwrap();
        assert_eq!((r.count, r.period), (50, StdDuration::from_secs(10)));
        for (text, secs) in [
            ("1/sec", 1),
            ("1/hour", 3600),
            ("1/day", 86400),
            ("1/h", 3600),
        ] {
            assert_eq!(Rate::parse(text).unwrap().period.as_secs(), secs);
        }
        for bad in ["100", "0/min", "x/min", "10/fortnight", "10/0s"] {
            assert!(Rate::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("512").unwrap().0, 512);
        assert_eq!(Size::parse("64KiB").unwrap().0, 65536);
        assert_eq!(Size::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(Size::parse("1GiB").unwrap().0, 1 << 30);
        assert!(Size::parse("10MB").is_err());
        assert_eq!(Size(10 << 20).to_string(), "10MiB");
    }

    #[test]
    fn percents() {
        assert_eq!(Percent::parse("50%").unwrap().0, 0.5);
        assert!((Percent::parse("99.9%").unwrap().0 - 0.999).abs() < 1e-12);
        assert!(Percent::parse("50").is_err());
        assert!(Percent::parse("150%").is_err());
    }
}
