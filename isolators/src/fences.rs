//! The eBPF fences over every task of one agent: ports, devices, network
//! bandwidth and accounting, attached once at the agent's v2 subtree. A task
//! is fenced by writing its entries in each program's maps, keyed by its v2
//! cgroup id; its container id is all a caller needs to remove them again.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use butte_agent_ebpf::FenceError;
use butte_agent_ebpf::accounting::{Accounting, Events, TaskStats};
use butte_agent_ebpf::books::{Books, CgroupBooks, Counters};
use butte_agent_ebpf::devices::{DeviceFence, DeviceRule, default_rules};
use butte_agent_ebpf::network::{self, NetStats, Network};
use butte_agent_ebpf::pins::Pins;
use butte_agent_ebpf::ports::{PortFence, cgroup_id};
use butte_agent_ebpf::runq::{Histogram, RunqHistograms};

/// What one task's container is fenced to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFence {
    /// Port ranges it may bind (none: only port 0).
    pub ports: Vec<(u16, u16)>,
    /// Devices it was granted beyond the defaults every container gets.
    pub granted_devices: Vec<DeviceRule>,
    /// Egress limit in Mbit/s (None: unlimited).
    pub egress_mbit_per_s: Option<f64>,
    /// Whether ingress is policed to the egress limit too.
    pub police_ingress: bool,
    /// Whether its run-queue latency histogram is kept (the scheduler's
    /// tracepoint runs only while some task has one).
    pub runqueue_histogram: bool,
}

impl TaskFence {
    /// Every device the container may open: the defaults, then what it was granted.
    pub fn device_rules(&self) -> Vec<DeviceRule> {
        let mut rules = default_rules();
        rules.extend_from_slice(&self.granted_devices);
        rules
    }
}

/// A fence whose program could not load: what it would have enforced is not.
#[derive(Debug)]
pub struct Unenforced {
    pub fence: Fence,
    pub error: FenceError,
}

/// The four fences, by what they enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// binds outside the task's port ranges
    Ports,
    /// opens of devices the task was not granted
    Devices,
    /// egress beyond the task's `network_bandwidth`, and network accounting
    Network,
    /// per-task CPU time, run-queue latency and process events
    Accounting,
    /// the kernel's per-cgroup books (CPU, memory, pressure) read in one pass
    Books,
}

/// What the kernel counted for every fenced container, read whole this round.
#[derive(Default)]
pub struct Counts {
    /// The kernel's own books (rstat CPU, memcg usage, PSI), by v2 cgroup id.
    pub books: HashMap<u64, CgroupBooks>,
    pub cpu: HashMap<u64, TaskStats>,
    pub net: HashMap<u64, NetStats>,
    pub denied_binds: HashMap<u64, u64>,
    pub denied_opens: HashMap<u64, u64>,
}

/// The loaded fences and the key of every container fenced.
#[derive(Default)]
pub struct Fences {
    ports: Option<PortFence>,
    devices: Option<DeviceFence>,
    network: Option<Network>,
    accounting: Option<Accounting>,
    /// Run-queue histograms in cgroup storage, where CPU comes from the
    /// books and the kernel has cgroup storage (else `accounting` keeps them).
    runq: Option<RunqHistograms>,
    /// The kernel's per-cgroup books, read by a cgroup iterator.
    books: Option<Books>,
    /// Whether the last read of the books failed (logged once per spell).
    books_failing: bool,
    /// eBPF map keys (v2 cgroup ids) by container id.
    keys: HashMap<String, u64>,
    /// Where the fences are pinned, so that they hold while no agent runs.
    pins: Option<Pins>,
}

impl Fences {
    /// Loads every program and attaches the cgroup ones at `subtree` (a v2
    /// cgroup directory); with `pins`, pinned there (the fences then hold
    /// while no agent runs, and a later agent takes them over). A fence
    /// that cannot load is left out and named in the second value: the
    /// caller must not offer what it would enforce.
    pub fn attach(subtree: &Path, pins: Option<Pins>) -> (Self, Vec<Unenforced>) {
        let mut unenforced = Vec::new();
        let mut keep =
            |fence: Fence, error: FenceError| unenforced.push(Unenforced { fence, error });
        let pinned = pins.as_ref();
        let ports = PortFence::attach(subtree, pinned)
            .map_err(|e| keep(Fence::Ports, e))
            .ok();
        let devices = DeviceFence::attach(subtree, pinned)
            .map_err(|e| keep(Fence::Devices, e))
            .ok();
        let network = Network::attach(subtree, pinned)
            .map_err(|e| keep(Fence::Network, e))
            .ok();
        // The books read the fences' counters in their own pass.
        let counters = match (&ports, &devices, &network) {
            (Some(ports), Some(devices), Some(network)) => Some(Counters {
                net: network.stats_map(),
                denied_binds: ports.denied_map(),
                denied_opens: devices.denied_map(),
            }),
            _ => None,
        };
        // Run-queue histograms in cgroup storage, read by the books' walk.
        let runq = RunqHistograms::load()
            .map_err(|error| tracing::info!(%error, "run-queue histograms are kept by the accounting program's hash map: no cgroup storage here (6.2 on)"))
            .ok();
        let books = Books::load(
            subtree,
            counters,
            runq.as_ref().and_then(RunqHistograms::map),
        )
        .map_err(|e| keep(Fence::Books, e))
        .ok();
        // Without the books' CPU, the scheduler's tracepoint counts it, and
        // keeps the histograms too (one program on sched_switch, not two).
        let cpu_from_books = books.as_ref().is_some_and(|b| b.flushes().is_some());
        let runq = runq.filter(|_| cpu_from_books);
        let fences = Self {
            ports,
            devices,
            network,
            accounting: Accounting::attach(!cpu_from_books)
                .map_err(|e| keep(Fence::Accounting, e))
                .ok(),
            runq,
            books,
            books_failing: false,
            keys: HashMap::new(),
            pins,
        };
        (fences, unenforced)
    }

    /// Takes over the links an earlier agent pinned, switching them to
    /// this agent's programs: call once every recovered container is fenced
    /// again (until then the earlier programs, with their maps, enforce).
    pub fn commit(&mut self) {
        let results = [
            ("ports", self.ports.as_mut().map(PortFence::commit)),
            ("devices", self.devices.as_mut().map(DeviceFence::commit)),
            ("network", self.network.as_mut().map(Network::commit)),
        ];
        for (fence, result) in results {
            if let Some(Err(error)) = result {
                tracing::error!(fence, %error, "cannot take over the pinned links; the previous agent's programs still run");
            }
        }
    }

    /// Removes the pins (the agent is drained): the programs detach.
    pub fn unpin(&mut self) {
        if let Some(pins) = self.pins.take() {
            pins.remove();
        }
    }

    /// Every fence, or the first that cannot load (benchmarks and tests,
    /// which measure all of them). Not pinned.
    pub fn attach_all(subtree: &Path) -> Result<Self, FenceError> {
        let (fences, unenforced) = Self::attach(subtree, None);
        match unenforced.into_iter().next() {
            Some(missing) => Err(missing.error),
            None => Ok(fences),
        }
    }

    /// Whether a fence loaded.
    pub fn enforces(&self, fence: Fence) -> bool {
        match fence {
            Fence::Ports => self.ports.is_some(),
            Fence::Devices => self.devices.is_some(),
            Fence::Network => self.network.is_some(),
            Fence::Accounting => self.accounting.is_some(),
            Fence::Books => self.books.is_some(),
        }
    }

    /// The ring buffer of process events (once; None without accounting).
    pub fn take_events(&mut self) -> Option<Events> {
        self.accounting.as_mut().and_then(Accounting::take_events)
    }

    /// Writes the entries of `container_id`, whose v2 cgroup is `cgroup`, in
    /// every loaded fence; its map key. On failure nothing of it is left.
    pub fn fence(
        &mut self,
        container_id: &str,
        cgroup: &Path,
        fence: &TaskFence,
    ) -> Result<u64, FenceError> {
        self.write_entries(container_id, cgroup, fence, false)
    }

    /// Writes the entries of a container recovered after a restart: as
    /// `fence`, but the counts it has in pinned maps are kept.
    pub fn refence(
        &mut self,
        container_id: &str,
        cgroup: &Path,
        fence: &TaskFence,
    ) -> Result<u64, FenceError> {
        self.write_entries(container_id, cgroup, fence, true)
    }

    fn write_entries(
        &mut self,
        container_id: &str,
        cgroup: &Path,
        fence: &TaskFence,
        keep_counts: bool,
    ) -> Result<u64, FenceError> {
        let key = cgroup_id(cgroup)?;
        // Recorded before any entry is written, so that a failure below
        // removes whatever was written.
        self.keys.insert(container_id.to_owned(), key);
        let written = self.write(key, cgroup, fence, keep_counts);
        if written.is_err() {
            self.unfence(container_id);
        }
        written.map(|()| key)
    }

    fn write(
        &mut self,
        key: u64,
        cgroup: &Path,
        fence: &TaskFence,
        keep_counts: bool,
    ) -> Result<(), FenceError> {
        if let Some(ports) = self.ports.as_mut() {
            ports.allow(key, &fence.ports)?;
        }
        if let Some(devices) = self.devices.as_mut() {
            devices.allow(key, &fence.device_rules())?;
        }
        if let Some(network) = self.network.as_mut() {
            let limits = network::Limits {
                egress_mbit_per_s: fence.egress_mbit_per_s,
                police_ingress: fence.police_ingress,
            };
            network.track(key, limits, keep_counts)?;
        }
        let histogram = fence.runqueue_histogram;
        let in_storage = histogram && self.runq.is_some();
        if let Some(accounting) = self.accounting.as_mut() {
            accounting.track(key, histogram && !in_storage)?;
        }
        if let Some(runq) = self.runq.as_mut().filter(|_| in_storage) {
            runq.track(key, cgroup)?;
        }
        Ok(())
    }

    /// Removes the container's entries from every fence; its key, if it was fenced.
    pub fn unfence(&mut self, container_id: &str) -> Option<u64> {
        let key = self.keys.remove(container_id)?;
        self.forget(key);
        Some(key)
    }

    /// Removes the entries under a cgroup's key (a container left by a
    /// previous run, whose entries the pinned maps still hold).
    pub fn forget(&mut self, key: u64) {
        if let Some(ports) = self.ports.as_mut() {
            ports.forget(key);
        }
        if let Some(devices) = self.devices.as_mut() {
            devices.forget(key);
        }
        if let Some(network) = self.network.as_mut() {
            network.forget(key);
        }
        if let Some(accounting) = self.accounting.as_mut() {
            accounting.forget(key);
        }
        if let Some(runq) = self.runq.as_mut() {
            runq.forget(key);
        }
    }

    /// The map key of a fenced container.
    pub fn key(&self, container_id: &str) -> Option<u64> {
        self.keys.get(container_id).copied()
    }

    /// Container ids by map key, for events that carry only the key.
    pub fn containers_by_key(&self) -> HashMap<u64, String> {
        self.keys
            .iter()
            .map(|(id, &key)| (key, id.clone()))
            .collect()
    }

    /// The kernel's books, where they loaded.
    pub fn books(&self) -> Option<&Books> {
        self.books.as_ref()
    }

    /// Whether CPU time comes from the kernel's books (rstat, flushed at
    /// each read) rather than from the scheduler's tracepoint and a walk
    /// of every thread.
    pub fn cpu_from_books(&self) -> bool {
        self.books.as_ref().is_some_and(|b| b.flushes().is_some())
    }

    /// Brings every task's CPU time up to now (before `counts`); a no-op
    /// where CPU comes from the kernel's books (read current).
    pub fn flush(&mut self) {
        if self.cpu_from_books() {
            return;
        }
        if let Some(accounting) = self.accounting.as_mut()
            && let Err(error) = accounting.flush()
        {
            tracing::warn!(%error, "cannot flush CPU time; every task's CPU figure holds still until a flush succeeds");
        }
    }

    /// Every fenced container's counts, each map read whole in a few
    /// syscalls rather than one lookup per task; a map that cannot be read
    /// this round is empty (and logged).
    pub fn counts(&mut self) -> Counts {
        let read = self.books.as_mut().map(Books::read);
        let mut counted = false;
        let books = match read {
            Some(Ok(read)) => {
                if std::mem::take(&mut self.books_failing) {
                    tracing::info!("the kernel's books are readable again");
                }
                counted = self.books.as_ref().is_some_and(Books::shares_counters);
                read
            }
            Some(Err(error)) => {
                if !std::mem::replace(&mut self.books_failing, true) {
                    tracing::warn!(%error, "cannot read the kernel's books; tasks have no CPU, memory-from-the-books or pressure figures until they can be read");
                }
                Default::default()
            }
            None => Default::default(),
        };
        // The counters came with the books (their own maps are not read
        // again); only fenced containers have them.
        let (net, denied_binds, denied_opens) = if counted {
            let fenced: std::collections::HashSet<u64> = self.keys.values().copied().collect();
            let ours = books.iter().filter(|(key, _)| fenced.contains(key));
            let mut counts = (HashMap::new(), HashMap::new(), HashMap::new());
            for (key, book) in ours {
                counts.0.insert(*key, book.net);
                counts.1.insert(*key, book.denied_binds);
                counts.2.insert(*key, book.denied_opens);
            }
            counts
        } else {
            (
                whole(self.network.as_ref().map(Network::all_stats)),
                whole(self.ports.as_ref().map(PortFence::all_denied)),
                whole(self.devices.as_ref().map(DeviceFence::all_denied)),
            )
        };
        let mut cpu = whole(self.accounting.as_mut().map(|a| a.all_stats()));
        // Histograms kept in cgroup storage join the accounting's figures:
        // from the walk where it shares their map, else one lookup each.
        let histograms: HashMap<u64, Histogram> = match self.runq.as_ref() {
            Some(_) if self.books.as_ref().is_some_and(Books::shares_runq) => books
                .iter()
                .filter_map(|(key, book)| Some((*key, book.runq?)))
                .collect(),
            Some(runq) => runq.all(),
            None => HashMap::new(),
        };
        for (key, histogram) in histograms {
            let stats = cpu.entry(key).or_default();
            stats.runq_count = histogram.count;
            stats.runq_total_ns = histogram.total_ns;
            stats.runq_slots = histogram.slots;
            stats.runq_wanted = true;
        }
        Counts {
            books,
            cpu,
            net,
            denied_binds,
            denied_opens,
        }
    }

    /// Kernel time the programs with run-time stats ran, and how many runs.
    pub fn run_time(&self) -> (Duration, u64) {
        let accounting = self
            .accounting
            .as_ref()
            .map_or((Duration::ZERO, 0), |a| (a.run_time(), a.run_count()));
        let network = self
            .network
            .as_ref()
            .map_or((Duration::ZERO, 0), |n| (n.run_time(), n.run_count()));
        let runq = self
            .runq
            .as_ref()
            .map_or((Duration::ZERO, 0), |r| (r.run_time(), r.run_count()));
        (
            accounting.0 + network.0 + runq.0,
            accounting.1 + network.1 + runq.1,
        )
    }
}

/// A map read whole, or empty when its program is not loaded or the read failed.
fn whole<V>(read: Option<Result<HashMap<u64, V>, FenceError>>) -> HashMap<u64, V> {
    match read {
        Some(Ok(entries)) => entries,
        Some(Err(error)) => {
            tracing::debug!(%error, "cannot read per-task counts this round");
            HashMap::new()
        }
        None => HashMap::new(),
    }
}
