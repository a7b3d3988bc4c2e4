//! The agent's GPUs: what it offers (`gpus` as whole devices, MIG instances
//! as `mig-<profile>`), which container holds which, the device nodes and
//! environment a task gets, and which GPUs turned faulty.

use std::collections::BTreeMap;

use butte_agent_ebpf::devices::{DeviceRule, Kind, RWM};
use butte_api::mesos::v1::{Attribute, Label, value};
use butte_api::resources::{ResourceError, Resources};
use butte_gpu::{Choice, GpuSample, Inventory, choose};

pub use butte_api::resources::MIG_PREFIX;

/// The GPUs (or MIG instances) one container was given.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// Whole GPUs, NVML indices ascending.
    pub gpus: Vec<u32>,
    /// Their UUIDs, or the MIG instances' UUIDs, in the same order.
    pub uuids: Vec<String>,
    /// The weakest link inside the set (`NV4`, `PIX`, `SYS`, `single`).
    pub interconnect: String,
    pub numa_node: Option<u32>,
    /// The device nodes the task may open: its GPUs (or instances and their
    /// parents) and the control nodes.
    pub devices: Vec<(u32, u32)>,
}

impl Assignment {
    /// `NVIDIA_VISIBLE_DEVICES` and `CUDA_VISIBLE_DEVICES` name the task's
    /// GPUs by UUID (CUDA's own numbering differs from NVML's), and
    /// `BUTTE_GPU_INDICES` by NVML index.
    pub fn env(&self) -> Vec<(String, String)> {
        let uuids = self.uuids.join(",");
        let indices: Vec<String> = self.gpus.iter().map(u32::to_string).collect();
        vec![
            ("NVIDIA_VISIBLE_DEVICES".into(), uuids.clone()),
            ("CUDA_VISIBLE_DEVICES".into(), uuids),
            ("BUTTE_GPU_INDICES".into(), indices.join(",")),
        ]
    }

    /// What the task's status shows of the choice.
    pub fn labels(&self) -> Vec<Label> {
        let indices: Vec<String> = self.gpus.iter().map(u32::to_string).collect();
        let mut labels = vec![
            label("butte.gpu.indices", &indices.join(",")),
            label("butte.gpu.uuids", &self.uuids.join(",")),
            label("butte.gpu.interconnect", &self.interconnect),
        ];
        if let Some(node) = self.numa_node {
            labels.push(label("butte.gpu.numa_node", &node.to_string()));
        }
        labels
    }

    /// Device-fence rules: read, write and mknod of each of its nodes.
    pub fn device_rules(&self) -> Vec<DeviceRule> {
        self.devices
            .iter()
            .map(|&(major, minor)| DeviceRule {
                kind: Kind::Char,
                major,
                minor,
                access: RWM,
            })
            .collect()
    }
}

pub fn label(key: &str, value: &str) -> Label {
    Label {
        key: key.to_owned(),
        value: Some(value.to_owned()),
    }
}

/// Why a container cannot have the GPUs it asks for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssignError {
    /// part of a whole GPU asked for
    #[error(
        "gpus must be a whole number of devices, not {0}; ask for MIG instances (mig-<profile>) for part of a GPU"
    )]
    FractionalGpus(f64),
    /// more whole GPUs than are free and healthy
    #[error("{wanted} GPUs asked, {free} free and healthy on this agent")]
    TooFewGpus { wanted: usize, free: usize },
    /// part of a MIG instance asked for
    #[error("mig-{profile} must be a whole number of instances, not {count}")]
    FractionalMig { profile: String, count: f64 },
    /// more MIG instances of a profile than are free and healthy
    #[error("{wanted} MIG instances of {profile} asked, {free} free and healthy")]
    TooFewMig {
        profile: String,
        wanted: f64,
        free: usize,
    },
}

/// The agent's GPU backend and its books.
pub struct Gpus {
    pub backend: std::sync::Arc<dyn butte_gpu::GpuBackend>,
    pub books: GpuBooks,
}

/// A GPU that turned faulty, and the container that held it, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub index: u32,
    pub uuid: String,
    pub reason: String,
    pub holder: Option<String>,
}

/// The agent's books over its GPUs.
pub struct GpuBooks {
    inventory: Inventory,
    /// GPU index → the container holding it.
    held: BTreeMap<u32, String>,
    /// MIG instance UUID → the container holding it.
    held_mig: BTreeMap<String, String>,
    /// Faulty GPUs (index → why); withdrawn until the agent restarts.
    faulty: BTreeMap<u32, String>,
    /// The newest reading of each GPU.
    pub samples: Vec<GpuSample>,
}

impl GpuBooks {
    pub fn new(inventory: Inventory) -> Self {
        Self {
            inventory,
            held: BTreeMap::new(),
            held_mig: BTreeMap::new(),
            faulty: BTreeMap::new(),
            samples: Vec::new(),
        }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn faulty(&self) -> &BTreeMap<u32, String> {
        &self.faulty
    }

    /// What the agent offers: healthy whole GPUs (not in MIG mode) as
    /// `gpus`, and the MIG instances of healthy GPUs as `mig-<profile>`.
    pub fn resources(&self) -> Result<Resources, ResourceError> {
        let mut resources = Resources::new();
        for gpu in &self.inventory.gpus {
            if self.faulty.contains_key(&gpu.index) {
                continue;
            }
            if gpu.mig.is_empty() {
                resources.add_scalar("gpus", 1.0)?;
            }
            for instance in &gpu.mig {
                resources.add_scalar(&format!("{MIG_PREFIX}{}", instance.profile), 1.0)?;
            }
        }
        Ok(resources)
    }

    /// Agent attributes that let a framework choose: the model, the
    /// smallest GPU memory, and the best link between two GPUs.
    pub fn attributes(&self) -> Vec<Attribute> {
        let Some(first) = self.inventory.gpus.first() else {
            return Vec::new();
        };
        let memory = self.inventory.gpus.iter().map(|g| g.memory_mib).min();
        let best = self
            .inventory
            .links
            .iter()
            .flatten()
            .flatten()
            .copied()
            .max_by_key(|link| link.rank());
        let mut attributes = vec![text_attribute("gpu_model", &first.model)];
        if let Some(memory) = memory {
            attributes.push(Attribute {
                name: "gpu_memory_mib".into(),
                r#type: value::Type::Scalar as i32,
                scalar: Some(value::Scalar {
                    value: memory as f64,
                }),
                ..Default::default()
            });
        }
        let interconnect = best.map_or_else(|| "single".to_owned(), |l| l.to_string());
        attributes.push(text_attribute("gpu_interconnect", &interconnect));
        attributes
    }

    /// Gives `container` what `resources` ask of GPUs: the best-connected
    /// free healthy GPUs, and free MIG instances of each profile asked.
    /// `Ok(None)` when it asks for none.
    pub fn assign(
        &mut self,
        container: &str,
        resources: &Resources,
    ) -> Result<Option<Assignment>, AssignError> {
        let count = resources.scalar("gpus");
        let mig: Vec<(String, f64)> = resources
            .scalars()
            .filter_map(|(name, n)| Some((name.strip_prefix(MIG_PREFIX)?.to_owned(), n)))
            .collect();
        if count <= 0.0 && mig.is_empty() {
            return Ok(None);
        }
        if count.fract() != 0.0 {
            return Err(AssignError::FractionalGpus(count));
        }
        let choice = self.free_gpus(count as usize)?;
        let instances = self.free_instances(&mig)?;
        let Choice {
            gpus,
            numa_node,
            interconnect,
        } = choice.unwrap_or(Choice {
            gpus: Vec::new(),
            numa_node: None,
            interconnect: "mig".into(),
        });
        let (uuids, devices) = self.nodes_of(&gpus, &instances);
        for &index in &gpus {
            self.held.insert(index, container.to_owned());
        }
        for instance in &instances {
            self.held_mig
                .insert(instance.uuid.clone(), container.to_owned());
        }
        Ok(Some(Assignment {
            gpus,
            uuids,
            interconnect,
            numa_node,
            devices,
        }))
    }

    /// The best-connected `wanted` free healthy whole GPUs (None: none asked).
    fn free_gpus(&self, wanted: usize) -> Result<Option<Choice>, AssignError> {
        if wanted == 0 {
            return Ok(None);
        }
        let free: Vec<u32> = self
            .inventory
            .gpus
            .iter()
            .filter(|g| g.mig.is_empty())
            .map(|g| g.index)
            .filter(|i| !self.held.contains_key(i) && !self.faulty.contains_key(i))
            .collect();
        let choice = choose(&self.inventory, &free, wanted).ok_or(AssignError::TooFewGpus {
            wanted,
            free: free.len(),
        })?;
        Ok(Some(choice))
    }

    /// The uuids and device nodes (major, minor) a container with `gpus`
    /// and `instances` may open: theirs, MIG parents and the control nodes.
    fn nodes_of(
        &self,
        gpus: &[u32],
        instances: &[butte_gpu::MigInstance],
    ) -> (Vec<String>, Vec<(u32, u32)>) {
        let mut uuids = Vec::new();
        let mut devices: Vec<(u32, u32)> = Vec::new();
        for &index in gpus {
            if let Some(gpu) = self.inventory.gpu(index) {
                uuids.push(gpu.uuid.clone());
                devices.push((gpu.major, gpu.minor));
            }
        }
        for instance in instances {
            uuids.push(instance.uuid.clone());
            devices.push((instance.major, instance.minor));
            if let Some(gi) = &instance.gi_device {
                devices.push((gi.major, gi.minor));
            }
            if let Some(parent) = self.inventory.gpu(instance.gpu_index) {
                devices.push((parent.major, parent.minor));
            }
        }
        devices.extend(
            self.inventory
                .control_devices
                .iter()
                .map(|c| (c.major, c.minor)),
        );
        devices.sort_unstable();
        devices.dedup();
        (uuids, devices)
    }

    /// Free MIG instances on healthy GPUs for each (profile, count) asked.
    fn free_instances(
        &self,
        asked: &[(String, f64)],
    ) -> Result<Vec<butte_gpu::MigInstance>, AssignError> {
        let mut chosen = Vec::new();
        for (profile, count) in asked {
            if count.fract() != 0.0 || *count < 0.0 {
                return Err(AssignError::FractionalMig {
                    profile: profile.clone(),
                    count: *count,
                });
            }
            let free: Vec<_> = self
                .inventory
                .gpus
                .iter()
                .filter(|g| !self.faulty.contains_key(&g.index))
                .flat_map(|g| g.mig.iter())
                .filter(|i| &i.profile == profile && !self.held_mig.contains_key(&i.uuid))
                .take(*count as usize)
                .cloned()
                .collect();
            if free.len() < *count as usize {
                return Err(AssignError::TooFewMig {
                    profile: profile.clone(),
                    wanted: *count,
                    free: free.len(),
                });
            }
            chosen.extend(free);
        }
        Ok(chosen)
    }

    /// The container ended: its GPUs are free again.
    /// Books again what a container recovered after a restart holds.
    pub fn restore(&mut self, container: &str, assignment: &Assignment) {
        for &index in &assignment.gpus {
            self.held.insert(index, container.to_owned());
        }
        if assignment.gpus.is_empty() {
            for uuid in &assignment.uuids {
                self.held_mig.insert(uuid.clone(), container.to_owned());
            }
        }
    }

    pub fn release(&mut self, container: &str) {
        self.held.retain(|_, holder| holder != container);
        self.held_mig.retain(|_, holder| holder != container);
    }

    /// The GPUs `container` holds.
    pub fn held_by(&self, container: &str) -> Vec<u32> {
        let mut held: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, holder)| *holder == container)
            .map(|(&index, _)| index)
            .collect();
        for (uuid, holder) in &self.held_mig {
            if holder == container
                && let Some(gpu) = self
                    .inventory
                    .gpus
                    .iter()
                    .find(|g| g.mig.iter().any(|i| &i.uuid == uuid))
            {
                held.push(gpu.index);
            }
        }
        held.sort_unstable();
        held.dedup();
        held
    }

    /// Takes a round of readings; returns the GPUs that turned faulty in it.
    pub fn record(&mut self, samples: Vec<GpuSample>) -> Vec<Fault> {
        let mut faults = Vec::new();
        for sample in &samples {
            let Some(reason) = sample.fault() else {
                continue;
            };
            if self.faulty.contains_key(&sample.index) {
                continue;
            }
            self.faulty.insert(sample.index, reason.clone());
            let holder = self.held.get(&sample.index).cloned().or_else(|| {
                let gpu = self.inventory.gpu(sample.index)?;
                gpu.mig
                    .iter()
                    .find_map(|i| self.held_mig.get(&i.uuid).cloned())
            });
            faults.push(Fault {
                index: sample.index,
                uuid: self
                    .inventory
                    .gpu(sample.index)
                    .map(|g| g.uuid.clone())
                    .unwrap_or_default(),
                reason,
                holder,
            });
        }
        self.samples = samples;
        faults
    }
}

fn text_attribute(name: &str, text: &str) -> Attribute {
    Attribute {
        name: name.to_owned(),
        r#type: value::Type::Text as i32,
        text: Some(value::Text {
            value: text.to_owned(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use butte_gpu::{Gpu, Link};
    use std::path::PathBuf;

    /// Eight GPUs, NVLink pairs (0,1),(2,3),(4,5),(6,7), NODE within a NUMA
    /// node of four, SYS across.
    fn node() -> Inventory {
        let gpus = (0..8)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                model: "Sim A100".into(),
                memory_mib: 81920,
                numa_node: Some(i / 4),
                pci_bus_id: format!("0000:0{i}:00.0"),
                device: PathBuf::from(format!("/dev/nvidia{i}")),
                major: 195,
                minor: i,
                mig: Vec::new(),
            })
            .collect();
        let links = (0..8u32)
            .map(|a| {
                (0..8u32)
                    .map(|b| {
                        (a != b).then_some(if a / 2 == b / 2 {
                            Link::NvLink(4)
                        } else if a / 4 == b / 4 {
                            Link::SameNuma
                        } else {
                            Link::CrossNuma
                        })
                    })
                    .collect()
            })
            .collect();
        Inventory {
            gpus,
            links,
            control_devices: vec![butte_gpu::ControlDevice {
                path: "/dev/nvidiactl".into(),
                major: 195,
                minor: 255,
            }],
        }
    }

    fn gpus(n: f64) -> Resources {
        Resources::parse(&format!("gpus:{n}")).unwrap()
    }

    #[test]
    fn a_pair_is_linked_and_names_its_devices_env_and_labels() {
        let mut books = GpuBooks::new(node());
        assert_eq!(books.resources().unwrap().scalar("gpus"), 8.0);
        let pair = books.assign("c1", &gpus(2.0)).unwrap().unwrap();
        assert_eq!(pair.gpus, vec![0, 1]);
        assert_eq!(pair.interconnect, "NV4");
        assert_eq!(pair.devices, vec![(195, 0), (195, 1), (195, 255)]);
        assert!(
            pair.env()
                .contains(&("CUDA_VISIBLE_DEVICES".into(), "GPU-0,GPU-1".into()))
        );
        assert!(pair.labels().contains(&label("butte.gpu.numa_node", "0")));
        let next = books.assign("c2", &gpus(2.0)).unwrap().unwrap();
        assert_eq!(next.gpus, vec![2, 3], "the next intact pair");
        books.release("c1");
        assert_eq!(
            books.assign("c3", &gpus(2.0)).unwrap().unwrap().gpus,
            vec![0, 1]
        );
    }

    #[test]
    fn too_many_or_fractional_gpus_are_refused_with_a_reason() {
        let mut books = GpuBooks::new(node());
        let error = books.assign("c", &gpus(9.0)).unwrap_err().to_string();
        assert!(error.contains("9 GPUs asked, 8 free"), "{error}");
        let error = books.assign("c", &gpus(0.5)).unwrap_err().to_string();
        assert!(error.contains("whole number"), "{error}");
        assert_eq!(books.assign("c", &Resources::new()).unwrap(), None);
    }

    #[test]
    fn a_faulty_gpu_is_withdrawn_and_its_holder_named() {
        let mut books = GpuBooks::new(node());
        books.assign("c1", &gpus(2.0)).unwrap();
        let mut samples: Vec<GpuSample> = (0..8)
            .map(|index| GpuSample {
                index,
                ..Default::default()
            })
            .collect();
        assert!(books.record(samples.clone()).is_empty());
        samples[1].ecc_uncorrectable = 2;
        let faults = books.record(samples.clone());
        assert_eq!(faults.len(), 1);
        assert_eq!(
            (faults[0].index, faults[0].holder.as_deref()),
            (1, Some("c1"))
        );
        assert!(books.record(samples).is_empty(), "reported once");
        assert_eq!(books.resources().unwrap().scalar("gpus"), 7.0);
        books.release("c1");
        let six = books.assign("c2", &gpus(7.0)).unwrap().unwrap();
        assert!(!six.gpus.contains(&1));
    }
}
