//! Human durations for flags and config: `72h`, `10m`, `5s`, `250ms`, `1d`, or combinations
//! such as `1h30m`.
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {why} (examples: 72h, 10m, 5s, 250ms, 1h30m)")]
pub struct DurationError {
    input: String,
    why: &'static str,
}

pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |why| DurationError { input: input.to_owned(), why };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(|| err("too large"))?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(|| err("too large"))?),
            "d" => Duration::from_secs(n.checked_mul(86400).ok_or_else(|| err("too large"))?),
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        total = total.checked_add(part).ok_or_else(|| err("too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "5", "h", "5x", "-5s", "99999999999999999999s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
