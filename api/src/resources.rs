//! Resource arithmetic over Mesos's three value kinds: scalars (`cpus`, `mem`,
//! `network_bandwidth`...), ranges (`ports`) and sets.
//!
//! Scalars are kept in thousandths, as Mesos rounds them to three decimals, so
//! that adding and subtracting round-trips exactly. A `Resources` is always
//! normalised: no zero scalar, no empty range set or set, ranges coalesced.
//! Reservations and per-role resources are not modelled yet: every resource is
//! unreserved and the role is attached on output (`allocation_info`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::mesos::v1::{Resource, resource::AllocationInfo, value};

/// Thousandths of a scalar unit.
type Milli = i64;

/// Scalars above this (in units) are refused: they could not be exact in thousandths.
const MAX_SCALAR: f64 = 1e15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    /// a resource has no name
    #[error("a resource has an empty name; give each resource a name such as \"cpus\"")]
    EmptyName,
    /// the declared type and the value set do not agree
    #[error("resource {name:?} is declared {declared} but carries no {declared} value")]
    MissingValue {
        name: String,
        declared: &'static str,
    },
    /// one name used with two value kinds
    #[error("resource {name:?} is used both as {first} and as {second}; use one type per name")]
    MixedTypes {
        name: String,
        first: &'static str,
        second: &'static str,
    },
    /// NaN or infinite scalar
    #[error("resource {name:?} has a non-finite scalar value; use a finite number >= 0")]
    NotFinite { name: String },
    /// negative scalar
    #[error("resource {name:?} has a negative value {value}; use a number >= 0")]
    Negative { name: String, value: String },
    /// scalar too large to be exact
    #[error("resource {name:?} has a value {value} above the limit of 1e15")]
    TooLarge { name: String, value: String },
    /// a range whose end is before its begin
    #[error("resource {name:?} has the range [{begin}-{end}] whose end is before its begin")]
    InvertedRange { name: String, begin: u64, end: u64 },
    /// ranges of one resource overlap
    #[error(
        "resource {name:?} has overlapping ranges [{first}] and [{second}]; list each value once"
    )]
    OverlappingRanges {
        name: String,
        first: String,
        second: String,
    },
    /// more ranges or set items than a resource may have
    #[error(
        "resource {name:?} has {count} ranges or set items; a resource may have at most {limit}"
    )]
    TooManyItems {
        name: String,
        count: usize,
        limit: usize,
    },
    /// a set item listed twice
    #[error("resource {name:?} lists the set item {item:?} twice")]
    DuplicateItem { name: String, item: String },
    /// the text form could not be parsed
    #[error(
        "cannot parse resources {text:?}: {why}; expected e.g. 'cpus:4;mem:8192;ports:[31000-32000]'"
    )]
    Parse { text: String, why: String },
}

/// Disjoint, coalesced, sorted inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of values in the set.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(b, e)| e - b + 1).sum()
    }

    /// Adds one inclusive range (`begin <= end`), merging neighbours.
    pub fn insert(&mut self, begin: u64, end: u64) {
        let mut merged = (begin, end);
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(b, e) in &self.0 {
            if e.saturating_add(1) < merged.0 {
                kept.push((b, e));
            } else if merged.1.saturating_add(1) < b {
                if !placed {
                    kept.push(merged);
                    placed = true;
                }
                kept.push((b, e));
            } else {
                merged = (merged.0.min(b), merged.1.max(e));
            }
        }
        if !placed {
            kept.push(merged);
        }
        self.0 = kept;
    }

    pub fn union(&mut self, other: &RangeSet) {
        for &(b, e) in &other.0 {
            self.insert(b, e);
        }
    }

    /// Removes every value of `other`; values not present are ignored.
    pub fn remove(&mut self, other: &RangeSet) {
        for &(rb, re) in &other.0 {
            let mut kept = Vec::with_capacity(self.0.len() + 1);
            for &(b, e) in &self.0 {
                if re < b || rb > e {
                    kept.push((b, e));
                    continue;
                }
                if b < rb {
                    kept.push((b, rb - 1));
                }
                if re < e {
                    kept.push((re + 1, e));
                }
            }
            self.0 = kept;
        }
    }

    pub fn contains(&self, other: &RangeSet) -> bool {
        other
            .0
            .iter()
            .all(|&(rb, re)| self.0.iter().any(|&(b, e)| b <= rb && re <= e))
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(b, e)| format!("{b}-{e}")).collect();
        write!(f, "[{}]", parts.join(","))
    }
}

/// Name prefix of MIG instance resources, `mig-<profile>` (e.g.
/// `mig-1g.10gb`), as NVIDIA's device plugin names them without its domain.
pub const MIG_PREFIX: &str = "mig-";

/// The most ranges or set items one resource may carry (a request's worth:
/// merging them is not free).
pub const MAX_ITEMS: usize = 1000;

/// Whether a resource is GPU capacity: `gpus` (whole devices) or MIG instances.
pub fn is_gpu(name: &str) -> bool {
    name == "gpus" || name.starts_with(MIG_PREFIX)
}

/// A bag of resources by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    scalars: BTreeMap<String, Milli>,
    ranges: BTreeMap<String, RangeSet>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

fn to_milli(name: &str, value: f64) -> Result<Milli, ResourceError> {
    if !value.is_finite() {
        return Err(ResourceError::NotFinite {
            name: name.to_owned(),
        });
    }
    if value < 0.0 {
        return Err(ResourceError::Negative {
            name: name.to_owned(),
            value: value.to_string(),
        });
    }
    if value > MAX_SCALAR {
        return Err(ResourceError::TooLarge {
            name: name.to_owned(),
            value: value.to_string(),
        });
    }
    // In range by the checks above.
    Ok((value * 1000.0).round() as Milli)
}

fn from_milli(milli: Milli) -> f64 {
    milli as f64 / 1000.0
}

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.scalars.is_empty() && self.ranges.is_empty() && self.sets.is_empty()
    }

    /// The scalar named `name`, 0 when absent.
    pub fn scalar(&self, name: &str) -> f64 {
        self.scalars.get(name).copied().map_or(0.0, from_milli)
    }

    /// Every scalar, by name.
    pub fn scalars(&self) -> impl Iterator<Item = (&str, f64)> {
        self.scalars
            .iter()
            .map(|(n, &m)| (n.as_str(), from_milli(m)))
    }

    pub fn ranges(&self, name: &str) -> Option<&RangeSet> {
        self.ranges.get(name)
    }

    pub fn set(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.sets.get(name)
    }

    /// Takes every resource called `name` out, whatever its kind.
    pub fn remove(&mut self, name: &str) {
        self.scalars.remove(name);
        self.ranges.remove(name);
        self.sets.remove(name);
    }

    /// Takes out every GPU resource (whole GPUs and MIG instances); their names.
    pub fn remove_gpus(&mut self) -> Vec<String> {
        let names: Vec<String> = self
            .scalars
            .keys()
            .filter(|name| is_gpu(name))
            .cloned()
            .collect();
        for name in &names {
            self.remove(name);
        }
        names
    }

    /// Whether any GPU resource (whole GPUs or MIG instances) is here.
    pub fn has_gpus(&self) -> bool {
        self.scalars()
            .any(|(name, value)| value > 0.0 && is_gpu(name))
    }

    /// Adds a scalar; `value` must be finite and >= 0.
    pub fn add_scalar(&mut self, name: &str, value: f64) -> Result<(), ResourceError> {
        self.check_kind(name, "SCALAR")?;
        let milli = to_milli(name, value)?;
        if milli > 0 {
            let sum = self.scalars.entry(name.to_owned()).or_default();
            *sum = sum
                .checked_add(milli)
                .ok_or_else(|| ResourceError::TooLarge {
                    name: name.to_owned(),
                    value: "the sum".to_owned(),
                })?;
        }
        Ok(())
    }

    /// Adds an inclusive range of values.
    pub fn add_range(&mut self, name: &str, begin: u64, end: u64) -> Result<(), ResourceError> {
        self.check_kind(name, "RANGES")?;
        if end < begin {
            return Err(ResourceError::InvertedRange {
                name: name.to_owned(),
                begin,
                end,
            });
        }
        self.ranges
            .entry(name.to_owned())
            .or_default()
            .insert(begin, end);
        Ok(())
    }

    pub fn add_set_item(&mut self, name: &str, item: &str) -> Result<(), ResourceError> {
        self.check_kind(name, "SET")?;
        self.sets
            .entry(name.to_owned())
            .or_default()
            .insert(item.to_owned());
        Ok(())
    }

    fn kind_of(&self, name: &str) -> Option<&'static str> {
        if self.scalars.contains_key(name) {
            Some("SCALAR")
        } else if self.ranges.contains_key(name) {
            Some("RANGES")
        } else if self.sets.contains_key(name) {
            Some("SET")
        } else {
            None
        }
    }

    fn check_kind(&self, name: &str, kind: &'static str) -> Result<(), ResourceError> {
        if name.is_empty() {
            return Err(ResourceError::EmptyName);
        }
        match self.kind_of(name) {
            Some(first) if first != kind => Err(ResourceError::MixedTypes {
                name: name.to_owned(),
                first,
                second: kind,
            }),
            _ => Ok(()),
        }
    }

    /// Adds everything in `other`. Kinds never clash between two valid
    /// `Resources` built from one agent; a clash keeps `self`'s kind.
    pub fn add(&mut self, other: &Resources) {
        for (name, milli) in &other.scalars {
            if self.check_kind(name, "SCALAR").is_ok() {
                // Saturates: each value is at most 1e15, a sum cannot wrap.
                let sum = self.scalars.entry(name.clone()).or_default();
                *sum = sum.saturating_add(*milli);
            }
        }
        for (name, ranges) in &other.ranges {
            if self.check_kind(name, "RANGES").is_ok() {
                self.ranges.entry(name.clone()).or_default().union(ranges);
            }
        }
        for (name, items) in &other.sets {
            if self.check_kind(name, "SET").is_ok() {
                self.sets
                    .entry(name.clone())
                    .or_default()
                    .extend(items.iter().cloned());
            }
        }
    }

    /// Whether every resource of `other` is here.
    pub fn contains(&self, other: &Resources) -> bool {
        other
            .scalars
            .iter()
            .all(|(n, m)| self.scalars.get(n).is_some_and(|have| have >= m))
            && other
                .ranges
                .iter()
                .all(|(n, r)| self.ranges.get(n).is_some_and(|have| have.contains(r)))
            && other
                .sets
                .iter()
                .all(|(n, s)| self.sets.get(n).is_some_and(|have| have.is_superset(s)))
    }

    /// `self - other`, or `None` when `other` is not contained: a result is never negative.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        if !self.contains(other) {
            return None;
        }
        let mut left = self.clone();
        left.subtract_contained(other);
        Some(left)
    }

    /// Removes `other`, which the caller knows is contained; anything missing is ignored.
    pub fn subtract_contained(&mut self, other: &Resources) {
        for (name, milli) in &other.scalars {
            if let Some(have) = self.scalars.get_mut(name) {
                *have = (*have - milli).max(0);
                if *have == 0 {
                    self.scalars.remove(name);
                }
            }
        }
        for (name, ranges) in &other.ranges {
            if let Some(have) = self.ranges.get_mut(name) {
                have.remove(ranges);
                if have.is_empty() {
                    self.ranges.remove(name);
                }
            }
        }
        for (name, items) in &other.sets {
            if let Some(have) = self.sets.get_mut(name) {
                have.retain(|i| !items.contains(i));
                if have.is_empty() {
                    self.sets.remove(name);
                }
            }
        }
    }

    /// Validates and sums Mesos `Resource` messages. Rejects what Mesos rejects:
    /// empty names, a type without its value, NaN, infinite or negative
    /// scalars, inverted or overlapping ranges, duplicate set items.
    pub fn from_proto(resources: &[Resource]) -> Result<Self, ResourceError> {
        // Counted first, in one cheap pass: merging ranges costs more per item.
        let mut items: BTreeMap<&str, usize> = BTreeMap::new();
        for resource in resources {
            let count = resource.ranges.as_ref().map_or(0, |r| r.range.len())
                + resource.set.as_ref().map_or(0, |s| s.item.len());
            let total = items.entry(resource.name.as_str()).or_default();
            *total += count;
            if *total > MAX_ITEMS {
                return Err(ResourceError::TooManyItems {
                    name: resource.name.clone(),
                    count: *total,
                    limit: MAX_ITEMS,
                });
            }
        }
        let mut sum = Resources::new();
        for resource in resources {
            let name = resource.name.as_str();
            if name.is_empty() {
                return Err(ResourceError::EmptyName);
            }
            match resource.r#type() {
                value::Type::Scalar => {
                    let scalar = resource
                        .scalar
                        .as_ref()
                        .ok_or_else(|| missing(name, "SCALAR"))?;
                    sum.add_scalar(name, scalar.value)?;
                }
                value::Type::Ranges => {
                    let ranges = resource
                        .ranges
                        .as_ref()
                        .ok_or_else(|| missing(name, "RANGES"))?;
                    let mut own = RangeSet::default();
                    for range in &ranges.range {
                        if range.end < range.begin {
                            return Err(ResourceError::InvertedRange {
                                name: name.to_owned(),
                                begin: range.begin,
                                end: range.end,
                            });
                        }
                        if let Some(&(b, e)) = own
                            .0
                            .iter()
                            .find(|&&(b, e)| range.begin <= e && b <= range.end)
                        {
                            return Err(ResourceError::OverlappingRanges {
                                name: name.to_owned(),
                                first: format!("{b}-{e}"),
                                second: format!("{}-{}", range.begin, range.end),
                            });
                        }
                        own.insert(range.begin, range.end);
                    }
                    for &(b, e) in own.ranges() {
                        sum.add_range(name, b, e)?;
                    }
                }
                value::Type::Set => {
                    let set = resource.set.as_ref().ok_or_else(|| missing(name, "SET"))?;
                    let mut seen = BTreeSet::new();
                    for item in &set.item {
                        if !seen.insert(item.as_str()) {
                            return Err(ResourceError::DuplicateItem {
                                name: name.to_owned(),
                                item: item.clone(),
                            });
                        }
                        sum.add_set_item(name, item)?;
                    }
                }
                value::Type::Text => return Err(missing(name, "SCALAR, RANGES or SET")),
            }
        }
        Ok(sum)
    }

    /// Mesos `Resource` messages, allocated to `role` when given.
    pub fn to_proto(&self, role: Option<&str>) -> Vec<Resource> {
        let allocation_info = role.map(|r| AllocationInfo {
            role: Some(r.to_owned()),
        });
        let base = |name: &str, kind: value::Type| Resource {
            name: name.to_owned(),
            r#type: kind as i32,
            allocation_info: allocation_info.clone(),
            ..Default::default()
        };
        let mut out = Vec::new();
        for (name, &milli) in &self.scalars {
            out.push(Resource {
                scalar: Some(value::Scalar {
                    value: from_milli(milli),
                }),
                ..base(name, value::Type::Scalar)
            });
        }
        for (name, ranges) in &self.ranges {
            let range = ranges
                .0
                .iter()
                .map(|&(begin, end)| value::Range { begin, end })
                .collect();
            out.push(Resource {
                ranges: Some(value::Ranges { range }),
                ..base(name, value::Type::Ranges)
            });
        }
        for (name, items) in &self.sets {
            out.push(Resource {
                set: Some(value::Set {
                    item: items.iter().cloned().collect(),
                }),
                ..base(name, value::Type::Set)
            });
        }
        out
    }

    /// Parses the agent flag form `cpus:4;mem:8192;ports:[31000-32000];zones:{a,b}`.
    pub fn parse(text: &str) -> Result<Self, ResourceError> {
        let fail = |why: String| ResourceError::Parse {
            text: text.to_owned(),
            why,
        };
        let mut sum = Resources::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once(':')
                .ok_or_else(|| fail(format!("{part:?} has no ':' between name and value")))?;
            let (name, value) = (name.trim(), value.trim());
            if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                for range in inner.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    let (b, e) = range.split_once('-').unwrap_or((range, range));
                    let parse = |s: &str| {
                        s.trim()
                            .parse::<u64>()
                            .map_err(|_| fail(format!("{s:?} in {name} is not a number")))
                    };
                    sum.add_range(name, parse(b)?, parse(e)?)?;
                }
            } else if let Some(inner) = value.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                for item in inner.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    sum.add_set_item(name, item)?;
                }
            } else {
                let number: f64 = value
                    .parse()
                    .map_err(|_| fail(format!("{value:?} for {name} is not a number")))?;
                sum.add_scalar(name, number)?;
            }
        }
        Ok(sum)
    }
}

fn missing(name: &str, declared: &'static str) -> ResourceError {
    ResourceError::MissingValue {
        name: name.to_owned(),
        declared,
    }
}

impl std::ops::AddAssign<&Resources> for Resources {
    fn add_assign(&mut self, other: &Resources) {
        self.add(other);
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(
            self.scalars
                .iter()
                .map(|(n, &m)| format!("{n}:{}", from_milli(m))),
        );
        parts.extend(self.ranges.iter().map(|(n, r)| format!("{n}:{r}")));
        parts.extend(self.sets.iter().map(|(n, s)| {
            format!(
                "{n}:{{{}}}",
                s.iter().cloned().collect::<Vec<_>>().join(",")
            )
        }));
        f.write_str(&parts.join(";"))
    }
}

/// Builds a scalar `Resource` message (handy for frameworks and tests).
pub fn scalar(name: &str, value: f64) -> Resource {
    Resource {
        name: name.to_owned(),
        r#type: value::Type::Scalar as i32,
        scalar: Some(value::Scalar { value }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(text: &str) -> Resources {
        Resources::parse(text).unwrap()
    }

    #[test]
    fn parse_and_display_round_trip() {
        let r = res("cpus:4;mem:8192.5;ports:[31000-32000,40000-40010];zones:{a,b}");
        assert_eq!(
            r.to_string(),
            "cpus:4;mem:8192.5;ports:[31000-32000,40000-40010];zones:{a,b}"
        );
        assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn remove_takes_a_resource_out_whatever_its_kind() {
        let mut r = res("cpus:2;ports:[31000-31005];network_bandwidth:100");
        r.remove("ports");
        r.remove("network_bandwidth");
        r.remove("absent");
        assert_eq!(r, res("cpus:2"));
    }

    #[test]
    fn subtract_more_than_held_is_refused() {
        assert_eq!(res("cpus:1").checked_sub(&res("cpus:1.001")), None);
        assert_eq!(res("ports:[1-10]").checked_sub(&res("ports:[10-11]")), None);
        assert_eq!(
            res("cpus:1").checked_sub(&res("cpus:1")),
            Some(Resources::new())
        );
    }

    #[test]
    fn ranges_subtract_splits_and_coalesces() {
        let left = res("ports:[1-10]")
            .checked_sub(&res("ports:[4-6]"))
            .unwrap();
        assert_eq!(left.to_string(), "ports:[1-3,7-10]");
        let mut back = left;
        back.add(&res("ports:[4-6]"));
        assert_eq!(back.to_string(), "ports:[1-10]");
    }

    #[test]
    fn too_many_ranges_are_refused_before_any_is_merged_and_sums_do_not_wrap() {
        let ranges = |n: u64| Resource {
            name: "ports".into(),
            r#type: value::Type::Ranges as i32,
            ranges: Some(value::Ranges {
                range: (0..n)
                    .map(|i| value::Range {
                        begin: i * 2,
                        end: i * 2,
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        assert!(Resources::from_proto(&[ranges(1000)]).is_ok());
        let started = std::time::Instant::now();
        let refused = Resources::from_proto(&[ranges(250_000)]).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_millis(50),
            "refused at once"
        );
        assert!(refused.to_string().contains("at most 1000"), "{refused}");
        // Split over entries of one name: still counted together.
        let split = vec![ranges(600), ranges(600)];
        assert!(matches!(
            Resources::from_proto(&split).unwrap_err(),
            ResourceError::TooManyItems { count: 1200, .. }
        ));
        // Sums saturate or refuse, never wrap.
        let big: Vec<Resource> = (0..20_000).map(|_| scalar("cpus", 1e15)).collect();
        assert!(matches!(
            Resources::from_proto(&big).unwrap_err(),
            ResourceError::TooLarge { .. }
        ));
        assert!(matches!(
            Resources::from_proto(&[scalar("cpus", 1e300)]).unwrap_err(),
            ResourceError::TooLarge { .. }
        ));
    }

    #[test]
    fn proto_validation_refuses_bad_input() {
        let bad = |r: Resource| Resources::from_proto(&[r]).unwrap_err();
        assert!(matches!(
            bad(scalar("cpus", f64::NAN)),
            ResourceError::NotFinite { .. }
        ));
        assert!(matches!(
            bad(scalar("cpus", -1.0)),
            ResourceError::Negative { .. }
        ));
        assert!(matches!(bad(scalar("", 1.0)), ResourceError::EmptyName));
        let overlapping = Resource {
            name: "ports".into(),
            r#type: value::Type::Ranges as i32,
            ranges: Some(value::Ranges {
                range: vec![
                    value::Range { begin: 1, end: 10 },
                    value::Range { begin: 5, end: 12 },
                ],
            }),
            ..Default::default()
        };
        assert!(matches!(
            bad(overlapping),
            ResourceError::OverlappingRanges { .. }
        ));
        let no_value = Resource {
            name: "mem".into(),
            r#type: value::Type::Scalar as i32,
            ..Default::default()
        };
        assert!(matches!(bad(no_value), ResourceError::MissingValue { .. }));
    }

    #[test]
    fn proto_round_trip_keeps_role() {
        let r = res("cpus:2;ports:[5-9]");
        let proto = r.to_proto(Some("web"));
        assert!(
            proto
                .iter()
                .all(|p| p.allocation_info.as_ref().unwrap().role.as_deref() == Some("web"))
        );
        assert_eq!(Resources::from_proto(&proto).unwrap(), r);
    }

    fn arb_resources() -> impl Strategy<Value = Resources> {
        (
            prop::option::of(0u32..10_000),
            prop::option::of(0u32..100_000),
            prop::collection::vec((0u64..200, 0u64..20), 0..5),
            prop::collection::btree_set("[a-d]", 0..4),
        )
            .prop_map(|(cpus, mem, ranges, items)| {
                let mut r = Resources::new();
                if let Some(c) = cpus {
                    r.add_scalar("cpus", f64::from(c) / 1000.0).unwrap();
                }
                if let Some(m) = mem {
                    r.add_scalar("mem", f64::from(m)).unwrap();
                }
                for (b, len) in ranges {
                    r.add_range("ports", b, b + len).unwrap();
                }
                for i in items {
                    r.add_set_item("zones", &i).unwrap();
                }
                r
            })
    }

    proptest! {
        #[test]
        fn add_then_subtract_round_trips(a in arb_resources(), b in arb_resources()) {
            let mut sum = a.clone();
            sum.add(&b);
            prop_assert!(sum.contains(&a));
            prop_assert!(sum.contains(&b));
            // Ranges and sets may overlap, so only disjoint parts round-trip exactly;
            // scalars always do.
            let left = sum.checked_sub(&b).unwrap();
            for (name, value) in a.scalars() {
                prop_assert_eq!(left.scalar(name), value);
            }
            prop_assert!(left.checked_sub(&Resources::new()).is_some());
        }

        #[test]
        fn subtraction_is_never_negative(a in arb_resources(), b in arb_resources()) {
            match a.checked_sub(&b) {
                Some(left) => {
                    prop_assert!(a.contains(&b));
                    prop_assert!(a.contains(&left));
                    for (_, value) in left.scalars() {
                        prop_assert!(value > 0.0);
                    }
                    let mut back = left;
                    back.add(&b);
                    prop_assert!(back.contains(&a));
                }
                None => prop_assert!(!a.contains(&b)),
            }
        }

        #[test]
        fn proto_and_text_forms_round_trip(a in arb_resources()) {
            prop_assert_eq!(Resources::from_proto(&a.to_proto(None)).unwrap(), a.clone());
            prop_assert_eq!(Resources::parse(&a.to_string()).unwrap(), a);
        }

        #[test]
        fn range_union_and_removal_agree_with_sets(
            xs in prop::collection::vec((0u64..64, 0u64..8), 0..6),
            ys in prop::collection::vec((0u64..64, 0u64..8), 0..6),
        ) {
            let build = |v: &[(u64, u64)]| {
                let mut set = RangeSet::default();
                let mut plain = BTreeSet::new();
                for &(b, l) in v {
                    set.insert(b, b + l);
                    plain.extend(b..=b + l);
                }
                (set, plain)
            };
            let (mut x, xp) = build(&xs);
            let (y, yp) = build(&ys);
            let mut union = x.clone();
            union.union(&y);
            let expand = |s: &RangeSet| s.ranges().iter().flat_map(|&(b, e)| b..=e).collect::<BTreeSet<u64>>();
            prop_assert_eq!(expand(&union), xp.union(&yp).copied().collect());
            x.remove(&y);
            prop_assert_eq!(expand(&x), xp.difference(&yp).copied().collect());
            // Normal form: sorted, disjoint, not adjacent.
            for w in union.ranges().windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
        }
    }
}
