//! The task state machine, in one place for the agent and the master: which
//! states end a task and which changes are allowed.

use crate::mesos::v1::TaskState;

/// A terminal state ends the task: its resources are free again and no later
/// state applies.
pub fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::TaskFinished
            | TaskState::TaskFailed
            | TaskState::TaskKilled
            | TaskState::TaskError
            | TaskState::TaskLost
            | TaskState::TaskDropped
            | TaskState::TaskGone
            | TaskState::TaskGoneByOperator
    )
}

/// Whether a task in `from` may move to `to`. Terminal states are final;
/// an unreachable task may come back (its agent re-registered).
pub fn may_transition(from: TaskState, to: TaskState) -> bool {
    if is_terminal(from) {
        return false;
    }
    match to {
        // Nothing goes back to the states a launch starts in.
        TaskState::TaskStaging => from == TaskState::TaskStaging,
        TaskState::TaskStarting => matches!(from, TaskState::TaskStaging | TaskState::TaskStarting),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_are_final() {
        for to in [
            TaskState::TaskRunning,
            TaskState::TaskFinished,
            TaskState::TaskKilling,
        ] {
            assert!(!may_transition(TaskState::TaskFinished, to));
            assert!(!may_transition(TaskState::TaskKilled, to));
        }
    }

    #[test]
    fn launch_path_moves_forward_only() {
        assert!(may_transition(
            TaskState::TaskStaging,
            TaskState::TaskStarting
        ));
        assert!(may_transition(
            TaskState::TaskStarting,
            TaskState::TaskRunning
        ));
        assert!(may_transition(
            TaskState::TaskRunning,
            TaskState::TaskFailed
        ));
        assert!(!may_transition(
            TaskState::TaskRunning,
            TaskState::TaskStarting
        ));
        assert!(may_transition(
            TaskState::TaskUnreachable,
            TaskState::TaskRunning
        ));
    }
}
