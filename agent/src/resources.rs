//! What the agent offers: `--resources` where given, otherwise discovered
//! from the host (the CPUs it may use, memory less a host reserve, the work
//! dir's disk less a reserve, ports 31000-32000, egress bandwidth from the
//! fastest link that is up).

use std::path::Path;

use butte_api::resources::{ResourceError, Resources};

/// Memory kept for the host: half of it up to 1 GiB (Mesos's rule).
fn memory_reserve_mb(total_mb: f64) -> f64 {
    (total_mb / 2.0).min(1024.0)
}

pub fn discover(flag: Option<&str>, work_dir: &Path) -> Result<Resources, ResourceError> {
    let mut resources = match flag {
        Some(text) => Resources::parse(text)?,
        None => Resources::new(),
    };
    if resources.scalar("cpus") == 0.0 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        resources.add_scalar("cpus", cpus as f64)?;
    }
    if resources.scalar("mem") == 0.0 {
        let total_mb = meminfo_total_kb().map_or(1024.0, |kb| kb as f64 / 1024.0);
        resources.add_scalar(
            "mem",
            (total_mb - memory_reserve_mb(total_mb)).floor().max(0.0),
        )?;
    }
    if resources.scalar("disk") == 0.0
        && let Some(free_mb) = disk_mb(work_dir)
    {
        resources.add_scalar(
            "disk",
            (free_mb - (free_mb / 2.0).min(5120.0)).floor().max(0.0),
        )?;
    }
    if resources.ranges("ports").is_none() {
        resources.add_range("ports", 31000, 32000)?;
    }
    if resources.scalar("network_bandwidth") == 0.0 {
        resources.add_scalar(
            "network_bandwidth",
            link_speed_mbit().unwrap_or(DEFAULT_BANDWIDTH_MBIT),
        )?;
    }
    Ok(resources)
}

/// Egress offered when no interface reports its speed (virtual NICs often do not).
const DEFAULT_BANDWIDTH_MBIT: f64 = 1000.0;

/// The fastest link of the host's interfaces that are up (not loopback),
/// Mbit/s, as the kernel reports it in /sys/class/net/*/speed.
fn link_speed_mbit() -> Option<f64> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name() != "lo")
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("operstate")).is_ok_and(|s| s.trim() == "up")
        })
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("speed")).ok())
        .filter_map(|speed| speed.trim().parse::<f64>().ok())
        .filter(|&speed| speed > 0.0)
        .reduce(f64::max)
}

fn meminfo_total_kb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[allow(unsafe_code)]
fn disk_mb(path: &Path) -> Option<f64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct for a valid NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as f64 * stat.f_frsize as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_wins_and_the_rest_is_discovered() {
        let r = discover(Some("cpus:3;mem:1000"), Path::new("/")).unwrap();
        assert_eq!(r.scalar("cpus"), 3.0);
        assert_eq!(r.scalar("mem"), 1000.0);
        assert!(r.scalar("disk") > 0.0);
        assert_eq!(r.ranges("ports").unwrap().to_string(), "[31000-32000]");
        assert!(r.scalar("network_bandwidth") > 0.0);
        let given = discover(Some("network_bandwidth:250"), Path::new("/")).unwrap();
        assert_eq!(given.scalar("network_bandwidth"), 250.0);
        let discovered = discover(None, Path::new("/")).unwrap();
        assert!(discovered.scalar("cpus") >= 1.0 && discovered.scalar("mem") > 0.0);
    }

    #[test]
    fn memory_reserve_is_half_up_to_a_gib() {
        assert_eq!(memory_reserve_mb(1000.0), 500.0);
        assert_eq!(memory_reserve_mb(24_000.0), 1024.0);
    }
}
