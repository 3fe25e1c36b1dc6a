//! Tool and proposal metrics (bounded labels: tool names of the registry, fixed outcomes).

pub const TOOL_CALLS: &str = "assistant_tool_calls_total";
pub const ACTIONS: &str = "proposed_actions_total";

pub fn describe() {
    ::metrics::describe_counter!(
        TOOL_CALLS,
        "Tool calls of the model by tool and outcome (ok, error, invalid, proposed)"
    );
    ::metrics::describe_counter!(
        ACTIONS,
        "Proposed actions by event (proposed, executed, failed, expired)"
    );
}

/// `tool`: a registry name, or `unknown`.
pub fn tool_call(tool: &str, outcome: &'static str) {
    let tool = super::find(tool).map_or("unknown", |t| t.name);
    ::metrics::counter!(TOOL_CALLS, "tool" => tool, "outcome" => outcome).increment(1);
}

pub fn action(event: &'static str, n: u64) {
    ::metrics::counter!(ACTIONS, "event" => event).increment(n);
}
