//! Durations in flags, as Mesos writes them (`--gc_delay=1weeks`).

use std::time::Duration;

/// A duration flag as Mesos writes it: seconds, or a number with a unit
/// (`1weeks`, `2days`, `3hrs`, `10mins`, `30secs`, `500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 1weeks, 2days, 3600)"))?;
    let seconds = match unit {
        "" | "s" | "secs" => 1.0,
        "ms" => 1e-3,
        "mins" => 60.0,
        "hrs" => 3600.0,
        "days" => 86_400.0,
        "weeks" => 604_800.0,
        other => {
            return Err(format!(
                "{other:?} in {text:?} is not a unit: use secs, mins, hrs, days or weeks"
            ));
        }
    };
    Duration::try_from_secs_f64(value * seconds).map_err(|_| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_mesos_writes_them() {
        assert_eq!(parse_duration("1weeks"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5hrs"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("-1days").is_err());
        assert!(parse_duration("1e400weeks").is_err());
    }
}
