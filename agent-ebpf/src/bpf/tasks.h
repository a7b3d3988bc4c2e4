// Shared by every program object: the most tasks (cgroups) one agent tracks.
// Each per-task hash map is sized to it; the agent's books say the same
// (butte_agent_ebpf::MAX_TASKS). A hash map walks all its buckets (one per
// entry, rounded up to a power of two) for a batch read or a for-each, so
// this is sized to what a node runs, not to what the kernel allows.
#pragma once
#define MAX_TASKS 4096
