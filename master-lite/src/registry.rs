//! The registry: what a restarted master must not lose (its id, frameworks,
//! agents, tasks), in an embedded redb file under `--work-dir`.
//!
//! Every change is written through in its own transaction, before the change
//! is acknowledged to whoever caused it. A write that fails (a full disk)
//! is refused to its caller; once an I/O error has hit it, redb refuses every
//! later transaction, so the store is closed and the next write reopens it
//! (redb repairs the file on open): writes resume by themselves when space
//! returns, with no restart.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use butte_api::mesos::v1::{AgentInfo, FrameworkInfo, Task};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const FRAMEWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("frameworks");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// The launch message of each task still staging, by its task's key, so
/// that a restarted master can send a launch the agent never got again.
const LAUNCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("launches");
/// When each unreachable agent became so (Unix seconds), by agent id, so
/// that a restarted master knows them as unreachable and when to forget them.
const UNREACHABLE: TableDefinition<&str, f64> = TableDefinition::new("unreachable");
/// The identity (client certificate's DNS names) each agent id is bound
/// to: the one that first registered it.
const AGENT_IDENTITIES: TableDefinition<&str, &str> = TableDefinition::new("agent_identities");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// the store could not be opened, read or written
    #[error("registry {what} failed: {detail}")]
    Store { what: &'static str, detail: String },
    /// a stored record does not decode
    #[error("registry record {key} in {table} is corrupt: {detail}")]
    Corrupt {
        table: &'static str,
        key: String,
        detail: String,
    },
}

fn store(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> RegistryError {
    move |e| RegistryError::Store {
        what,
        detail: e.to_string(),
    }
}

/// Everything read back at start.
#[derive(Debug, Default)]
pub struct Recovered {
    pub master_id: Option<String>,
    pub next_framework: u64,
    pub next_agent: u64,
    /// Agents the operator marked gone (MARK_AGENT_GONE): never admitted again.
    pub gone_agents: Vec<String>,
    pub frameworks: Vec<FrameworkInfo>,
    pub agents: Vec<AgentInfo>,
    /// Unreachable agents with the Unix time they became so.
    pub unreachable: Vec<(String, f64)>,
    /// Agent ids with the identity bound to each.
    pub agent_identities: Vec<(String, String)>,
    pub tasks: Vec<Task>,
    /// Launch messages of tasks that were staging.
    pub launches: Vec<butte_api::agent_link::v1::LaunchTasks>,
}

pub struct Registry {
    path: PathBuf,
    /// None after a failed write, until the next write reopens it.
    db: Mutex<Option<Database>>,
}

fn task_key(task: &Task) -> String {
    format!("{}/{}", task.framework_id.value, task.task_id.value)
}

impl Registry {
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = open_database(path)?;
        Ok(Self {
            path: path.to_owned(),
            db: Mutex::new(Some(db)),
        })
    }

    fn database(&self) -> MutexGuard<'_, Option<Database>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn recover(&self) -> Result<Recovered, RegistryError> {
        let err = store("read");
        let mut guard = self.database();
        if guard.is_none() {
            *guard = Some(open_database(&self.path)?);
        }
        let db = guard.as_ref().ok_or_else(|| err(&"the store is closed"))?;
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let mut recovered = Recovered::default();
        let meta = txn.open_table(META).map_err(|e| err(&e))?;
        recovered.master_id = meta
            .get("master_id")
            .map_err(|e| err(&e))?
            .map(|v| v.value().to_owned());
        let counter = |key: &str| -> Result<u64, RegistryError> {
            Ok(meta
                .get(key)
                .map_err(|e| err(&e))?
                .and_then(|v| v.value().parse().ok())
                .unwrap_or(0))
        };
        recovered.next_framework = counter("next_framework")?;
        recovered.next_agent = counter("next_agent")?;
        recovered.gone_agents = meta
            .get("gone_agents")
            .map_err(|e| err(&e))?
            .map(|v| {
                v.value()
                    .lines()
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        recovered.frameworks = read_all(&txn, FRAMEWORKS, "frameworks")?;
        recovered.agents = read_all(&txn, AGENTS, "agents")?;
        let unreachable = txn.open_table(UNREACHABLE).map_err(|e| err(&e))?;
        for item in unreachable.iter().map_err(|e| err(&e))? {
            let (id, since) = item.map_err(|e| err(&e))?;
            recovered
                .unreachable
                .push((id.value().to_owned(), since.value()));
        }
        let identities = txn.open_table(AGENT_IDENTITIES).map_err(|e| err(&e))?;
        for item in identities.iter().map_err(|e| err(&e))? {
            let (id, identity) = item.map_err(|e| err(&e))?;
            recovered
                .agent_identities
                .push((id.value().to_owned(), identity.value().to_owned()));
        }
        recovered.tasks = read_all(&txn, TASKS, "tasks")?;
        recovered.launches = read_all(&txn, LAUNCHES, "launches")?;
        Ok(recovered)
    }

    pub fn put_meta(&self, key: &str, value: &str) -> Result<(), RegistryError> {
        self.write(|txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    pub fn put_framework(&self, info: &FrameworkInfo) -> Result<(), RegistryError> {
        let key = info.id.as_ref().map_or("", |f| f.value.as_str()).to_owned();
        self.put(FRAMEWORKS, &key, &info.encode_to_vec())
    }

    /// Removes a framework and all its tasks.
    pub fn remove_framework(&self, framework_id: &str) -> Result<(), RegistryError> {
        let prefix = format!("{framework_id}/");
        self.write(|txn| {
            txn.open_table(FRAMEWORKS)?.remove(framework_id)?;
            let mut tasks = txn.open_table(TASKS)?;
            // '0' sorts right after '/', so this range is exactly the framework's tasks.
            let end = format!("{framework_id}0");
            let keys: Vec<String> = tasks
                .range(prefix.as_str()..end.as_str())?
                .map(|item| item.map(|(k, _)| k.value().to_owned()))
                .collect::<Result<_, _>>()?;
            for key in keys {
                tasks.remove(key.as_str())?;
            }
            Ok(())
        })
    }

    /// A (re-)registered agent: known, and reachable; bound to `identity`
    /// where it has one.
    pub fn put_agent(&self, info: &AgentInfo, identity: Option<&str>) -> Result<(), RegistryError> {
        let key = info.id.as_ref().map_or("", |a| a.value.as_str()).to_owned();
        let value = info.encode_to_vec();
        self.write(|txn| {
            txn.open_table(AGENTS)?
                .insert(key.as_str(), value.as_slice())?;
            txn.open_table(UNREACHABLE)?.remove(key.as_str())?;
            if let Some(identity) = identity {
                txn.open_table(AGENT_IDENTITIES)?
                    .insert(key.as_str(), identity)?;
            }
            Ok(())
        })
    }

    /// The agent became unreachable at `since` (Unix seconds).
    pub fn put_unreachable(&self, agent_id: &str, since: f64) -> Result<(), RegistryError> {
        self.write(|txn| {
            txn.open_table(UNREACHABLE)?.insert(agent_id, since)?;
            Ok(())
        })
    }

    /// Forgets an agent and the given tasks of it, in one write.
    pub fn remove_agent(&self, agent_id: &str, tasks: &[Task]) -> Result<(), RegistryError> {
        let keys: Vec<String> = tasks.iter().map(task_key).collect();
        self.write(|txn| {
            txn.open_table(AGENTS)?.remove(agent_id)?;
            txn.open_table(UNREACHABLE)?.remove(agent_id)?;
            txn.open_table(AGENT_IDENTITIES)?.remove(agent_id)?;
            let mut table = txn.open_table(TASKS)?;
            let mut launches = txn.open_table(LAUNCHES)?;
            for key in &keys {
                table.remove(key.as_str())?;
                launches.remove(key.as_str())?;
            }
            Ok(())
        })
    }

    pub fn put_task(&self, task: &Task) -> Result<(), RegistryError> {
        self.put(TASKS, &task_key(task), &task.encode_to_vec())
    }

    pub fn remove_task(&self, task: &Task) -> Result<(), RegistryError> {
        let key = task_key(task);
        self.write(|txn| {
            txn.open_table(TASKS)?.remove(key.as_str())?;
            txn.open_table(LAUNCHES)?.remove(key.as_str())?;
            Ok(())
        })
    }

    /// A staging task and the message that launches it, in one write.
    pub fn put_staging_task(
        &self,
        task: &Task,
        launch: &butte_api::agent_link::v1::LaunchTasks,
    ) -> Result<(), RegistryError> {
        let key = task_key(task);
        let (task, launch) = (task.encode_to_vec(), launch.encode_to_vec());
        self.write(|txn| {
            txn.open_table(TASKS)?
                .insert(key.as_str(), task.as_slice())?;
            txn.open_table(LAUNCHES)?
                .insert(key.as_str(), launch.as_slice())?;
            Ok(())
        })
    }

    /// A task no longer staging: its launch message is not needed.
    pub fn remove_launch(&self, framework_id: &str, task_id: &str) -> Result<(), RegistryError> {
        let key = format!("{framework_id}/{task_id}");
        self.write(|txn| {
            txn.open_table(LAUNCHES)?.remove(key.as_str())?;
            Ok(())
        })
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), RegistryError> {
        self.write(|txn| {
            txn.open_table(table)?.insert(key, value)?;
            Ok(())
        })
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), RegistryError> {
        let err = store("write");
        let mut guard = self.database();
        if guard.is_none() {
            *guard = Some(open_database(&self.path)?);
            tracing::info!(path = %self.path.display(), "registry reopened; writes resume");
        }
        let db = guard.as_ref().ok_or_else(|| err(&"the store is closed"))?;
        let result = db.begin_write().map_err(|e| err(&e)).and_then(|txn| {
            body(&txn).map_err(|e| err(&e))?;
            txn.commit().map_err(|e| err(&e))
        });
        if let Err(error) = &result {
            // Closed now (its file lock released), reopened by the next write.
            tracing::error!(%error, "registry write failed; the store is closed until the next write reopens it");
            *guard = None;
        }
        result
    }
}

/// Opens (or creates) the store with its tables.
fn open_database(path: &Path) -> Result<Database, RegistryError> {
    let db = Database::create(path).map_err(|e| RegistryError::Store {
        what: "open",
        detail: format!("{}: {e}", path.display()),
    })?;
    let txn = db.begin_write().map_err(|e| store("open")(&e))?;
    {
        txn.open_table(META).map_err(|e| store("open")(&e))?;
        txn.open_table(FRAMEWORKS).map_err(|e| store("open")(&e))?;
        txn.open_table(AGENTS).map_err(|e| store("open")(&e))?;
        txn.open_table(TASKS).map_err(|e| store("open")(&e))?;
        txn.open_table(LAUNCHES).map_err(|e| store("open")(&e))?;
        txn.open_table(UNREACHABLE).map_err(|e| store("open")(&e))?;
        txn.open_table(AGENT_IDENTITIES)
            .map_err(|e| store("open")(&e))?;
    }
    txn.commit().map_err(|e| store("open")(&e))?;
    Ok(db)
}

fn read_all<M: Message + Default>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
    name: &'static str,
) -> Result<Vec<M>, RegistryError> {
    let err = store("read");
    let table = txn.open_table(table).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for item in table.iter().map_err(|e| err(&e))? {
        let (key, value) = item.map_err(|e| err(&e))?;
        let message = M::decode(value.value()).map_err(|e| RegistryError::Corrupt {
            table: name,
            key: key.value().to_owned(),
            detail: e.to_string(),
        })?;
        out.push(message);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use butte_api::mesos::v1::{FrameworkId, TaskId};

    #[test]
    fn framework_removal_takes_only_its_tasks() {
        let dir = tempdir();
        let registry = Registry::open(&dir.join("registry.redb")).unwrap();
        for fw in ["f1", "f10", "f2"] {
            registry
                .put_framework(&FrameworkInfo {
                    id: Some(FrameworkId { value: fw.into() }),
                    ..Default::default()
                })
                .unwrap();
            registry
                .put_task(&Task {
                    framework_id: FrameworkId { value: fw.into() },
                    task_id: TaskId { value: "t".into() },
                    ..Default::default()
                })
                .unwrap();
        }
        registry.remove_framework("f1").unwrap();
        drop(registry);
        let recovered = Registry::open(&dir.join("registry.redb"))
            .unwrap()
            .recover()
            .unwrap();
        let fws: Vec<_> = recovered
            .frameworks
            .iter()
            .map(|f| f.id.clone().unwrap().value)
            .collect();
        assert_eq!(fws, ["f10", "f2"]);
        assert_eq!(recovered.tasks.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("butte-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
