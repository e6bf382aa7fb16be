//! The condition types and reasons the operator and the agents write, one
//! spelling for the writers, the tests and `kubectl wait --for=condition=…`.

/// Condition types.
pub mod condition {
    /// ModelDeployment: the model was found on some node and probed.
    pub const RESOLVED: &str = "Resolved";
    /// ModelDeployment: every replica has a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// ModelDeployment: at least one replica serves.
    pub const AVAILABLE: &str = "Available";
    /// ModelDeployment: placements are still loading (or one failed).
    pub const PROGRESSING: &str = "Progressing";
    /// ModelDeployment: the summary (resolved, every replica placed and ready,
    /// nothing loading), for `kubectl wait`, kstatus, Argo CD and Flux.
    /// ModelNode: the agent is serving.
    pub const READY: &str = "Ready";

    /// ModelDeployment conditions in the order the status lists them.
    pub const DEPLOYMENT: [&str; 5] = [READY, RESOLVED, SCHEDULED, AVAILABLE, PROGRESSING];
}

/// Condition reasons (and the reasons of the Events that repeat them).
pub mod reason {
    // Resolved
    pub const MODEL_FOUND: &str = "ModelFound";
    /// No node has the model yet; the agents download it from `spec.model.source`.
    pub const FROM_SOURCE: &str = "FromSource";
    pub const FORMAT_MISMATCH: &str = "FormatMismatch";
    pub const NOT_A_MAIN_MODEL: &str = "NotAMainModel";
    pub const UNSUPPORTED_MODEL: &str = "UnsupportedModel";
    pub const SHA256_MISMATCH: &str = "Sha256Mismatch";
    pub const NO_AGENTS: &str = "NoAgents";
    pub const MODEL_NOT_REPORTED: &str = "ModelNotReported";
    pub const MODEL_NOT_FOUND: &str = "ModelNotFound";
    // Scheduled
    pub const SCHEDULED: &str = "Scheduled";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const PREEMPTED: &str = "Preempted";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const MODEL_NOT_RESOLVED: &str = "ModelNotResolved";
    // Available
    pub const REPLICAS_READY: &str = "ReplicasReady";
    pub const NO_READY_REPLICAS: &str = "NoReadyReplicas";
    // Progressing
    pub const PLACEMENT_FAILED: &str = "PlacementFailed";
    pub const LOADING: &str = "Loading";
    pub const COMPLETE: &str = "Complete";
    // ModelNode Ready
    pub const AGENT_SERVING: &str = "AgentServing";
    // Events only
    pub const FAILED_RESOLVE: &str = "FailedResolve";
    pub const FAILED_SCHEDULING: &str = "FailedScheduling";
    pub const LOAD_FAILED: &str = "LoadFailed";
}
