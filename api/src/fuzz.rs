//! The entry points the fuzz targets (`fuzz/`) drive, and that plain
//! `cargo test` replays every stored corpus and crash input through
//! (`gpu/tests/fuzz_corpus.rs`): each takes arbitrary bytes and must return,
//! whatever they are, without a panic, a hang or unbounded memory.

use prost::Message;

use crate::mesos::v1::Resource;
use crate::mesos::v1::scheduler::Call;
use crate::recordio::Decoder;
use crate::resources::Resources;

/// A scheduler call as the master reads it: JSON, then protobuf.
pub fn scheduler_call(data: &[u8]) {
    let _ = crate::json::from_json::<Call>(data);
    let _ = crate::json::from_protobuf::<Call>(data);
}

/// An operator call as the master (`/api/v1`) and the agent read it: JSON,
/// then protobuf.
pub fn operator_call(data: &[u8]) {
    use crate::mesos::v1::{agent, master};
    let _ = crate::json::from_json::<master::Call>(data);
    let _ = crate::json::from_protobuf::<master::Call>(data);
    let _ = crate::json::from_json::<agent::Call>(data);
    let _ = crate::json::from_protobuf::<agent::Call>(data);
}

/// A RecordIO stream fed in two chunks split at the first byte's value.
pub fn recordio(data: &[u8]) {
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let mut decoder = Decoder::new(1 << 16);
    for chunk in [&data[..split], &data[split..]] {
        if decoder.feed(chunk).is_err() {
            return;
        }
    }
}

/// Resources from protobuf and from text, then the arithmetic on them.
pub fn resources(data: &[u8]) {
    let mut parsed = Vec::new();
    if let Ok(resource) = Resource::decode(data)
        && let Ok(r) = Resources::from_proto(std::slice::from_ref(&resource))
    {
        parsed.push(r);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(r) = Resources::parse(text)
    {
        parsed.push(r);
    }
    for a in &parsed {
        for b in &parsed {
            let mut sum = a.clone();
            sum.add(b);
            let _ = sum.contains(a);
            let _ = sum.to_proto(None);
            let _ = sum.to_string();
        }
    }
}

/// A task checkpoint as an agent reads it back at recovery: the task, its
/// resources, its GPUs' JSON and its pending updates.
pub fn checkpoint(data: &[u8]) {
    if let Ok(checkpoint) = crate::agent_checkpoint::TaskCheckpoint::decode(data) {
        let _ = crate::json::to_value(&checkpoint.task);
        let _ = crate::resources::Resources::from_proto(&checkpoint.task.resources);
        let _ = serde_json::from_str::<serde_json::Value>(&checkpoint.gpus_json);
        for update in &checkpoint.pending {
            let _ = crate::json::to_value(&update.status);
        }
    }
}
