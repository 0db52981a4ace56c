//! Human durations for flags and environment variables, one grammar for every binary: a sequence
//! of numbers with units, `ms`, `s`, `m`, `h` or `d`, such as `500ms`, `30s`, `1h30m` or `1.5h`
//! (decimal fractions allowed, down to the nanosecond). A bare number is seconds. Every error reads
//! `invalid duration "<input>": <why> (e.g. 30s, 1.5h, 1h30m)`.

use std::time::Duration;

/// The longest duration any flag or variable takes: 100 years (36500d). Every use adds one to a
/// clock reading (an `Instant`, a certificate's `notAfter`), which would overflow far beyond it.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// What every duration error ends with.
const EXAMPLES: &str = "(e.g. 30s, 1.5h, 1h30m; units ms, s, m, h, d)";

/// Parses a duration such as `1h30m`, `1.5h`, `45s`, `250ms` or `90` (seconds).
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {input:?}: {why} {EXAMPLES}");
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if let Some(secs) = number(s) {
        return scaled(secs, 1_000_000_000)
            .and_then(at_most_max)
            .ok_or_else(|| bad("too large: at most 36500d"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let Some(n) = number(&rest[..num_len]) else {
            return Err(bad(&format!(
                "expected a number at {:?}",
                rest.chars().take(8).collect::<String>()
            )));
        };
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos_per_unit: u64 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(bad("a number needs a unit")),
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        let part = scaled(n, nanos_per_unit).ok_or_else(|| bad("too large"))?;
        total = total.checked_add(part).ok_or_else(|| bad("too large"))?;
    }
    at_most_max(total).ok_or_else(|| bad("too large: at most 36500d"))
}

fn at_most_max(d: Duration) -> Option<Duration> {
    (d <= MAX_DURATION).then_some(d)
}

/// [`parse_duration`], and at least `min`: `must be at least <min>` otherwise.
pub fn parse_duration_at_least(input: &str, min: Duration) -> Result<Duration, String> {
    let d = parse_duration(input)?;
    if d < min {
        return Err(format!("must be at least {}", format_duration(min)));
    }
    Ok(d)
}

/// A duration in the grammar [`parse_duration`] reads, in its largest whole unit: `100ms`, `1s`,
/// `5m`, `1h`, `2d`, or `1500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let whole_ms = d.subsec_nanos().is_multiple_of(1_000_000);
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= per && ms.is_multiple_of(per) && whole_ms {
            return format!("{}{unit}", ms / per);
        }
    }
    if whole_ms {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// A decimal number: whole part and fraction digits (`1.5` is `(1, "5")`); `None` unless it is
/// digits with at most one `.` between digits.
fn number(s: &str) -> Option<(u64, &str)> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || (s.contains('.') && frac.is_empty()) {
        return None;
    }
    // Too many whole digits for u64: let `scaled` say "too large" by saturating here.
    Some((whole.parse().unwrap_or(u64::MAX), frac))
}

/// `whole.frac` units of `nanos_per_unit` nanoseconds; digits past the nanosecond are dropped.
fn scaled((whole, frac): (u64, &str), nanos_per_unit: u64) -> Option<Duration> {
    let mut nanos = u128::from(whole).checked_mul(u128::from(nanos_per_unit))?;
    let mut scale = u128::from(nanos_per_unit);
    for digit in frac.bytes().take(18) {
        scale /= 10;
        nanos += u128::from(digit - b'0') * scale;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    // Below 10^9: fits.
    let sub = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        for (input, want) in [
            ("90", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1h30m", Duration::from_secs(5400)),
            (" 2d ", Duration::from_secs(172_800)),
            ("1.5h", Duration::from_secs(5400)),
            ("0.5s", Duration::from_millis(500)),
            ("1.25m", Duration::from_secs(75)),
            ("1.5", Duration::from_millis(1500)),
            ("1h0.5m", Duration::from_secs(3630)),
            ("0.0000000015s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn every_error_names_the_input_and_the_grammar() {
        for (bad, why) in [
            ("", "empty"),
            ("h", "expected a number"),
            ("1x", "unknown unit \"x\""),
            ("-1s", "expected a number"),
            ("1h 2m", "expected a number"),
            ("s1", "expected a number"),
            ("1.s", "expected a number"),
            (".5s", "expected a number"),
            ("1.2.3s", "expected a number"),
            ("10", ""),
            ("5h3", "a number needs a unit"),
            ("99999999999999999999d", "too large"),
            ("999999999999999999d", "too large"),
            // Beyond 100 years: added to a clock, it would overflow.
            ("36501d", "too large: at most 36500d"),
            ("10000000000000000000", "too large: at most 36500d"),
            ("36500d1ms", "too large: at most 36500d"),
            ("36500d", ""),
        ] {
            if why.is_empty() {
                assert!(parse_duration(bad).is_ok(), "{bad}");
                continue;
            }
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid duration {bad:?}: ")) && e.contains(why),
                "{bad:?}: {e}"
            );
            assert!(e.ends_with(EXAMPLES), "{e}");
        }
    }

    #[test]
    fn minimums_are_worded_in_the_same_grammar() {
        let min = Duration::from_millis(100);
        assert_eq!(
            parse_duration_at_least("0.1s", min),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            parse_duration_at_least("50ms", min),
            Err("must be at least 100ms".into())
        );
        assert!(
            parse_duration_at_least("x", min)
                .unwrap_err()
                .starts_with("invalid duration")
        );
        for (d, shown) in [
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::ZERO, "0ms"),
        ] {
            assert_eq!(format_duration(d), shown);
            assert_eq!(parse_duration(shown), Ok(d));
        }
    }
}
