package api

// Status is the one-screen view of a cluster (GET /v1/status, `lupool
// status`): its nodes and whether they answer, the primary, the LUs by
// health and each node's pool against its thresholds. Any node answers it,
// asking the others over the peer port.
type Status struct {
	// Node is the node that answered.
	Node string `json:"node"`
	// Primary is the metadata leader, which runs placement and failure
	// handling; empty when there is none (no quorum).
	Primary string       `json:"primary"`
	Nodes   []NodeStatus `json:"nodes"`
	LUs     LUSummary    `json:"lus"`
	// Pool adds up the pools of the nodes that answered.
	Pool PoolSummary `json:"pool"`
}

// Node states in NodeStatus.State.
const (
	// NodeUp answered within the status deadline.
	NodeUp = "up"
	// NodeUnreachable did not answer; Error says why.
	NodeUnreachable = "unreachable"
)

// NodeStatus is one member as the answering node sees it.
type NodeStatus struct {
	Node
	State string `json:"state"`
	// Error is why the node did not answer (State unreachable).
	Error string `json:"error,omitempty"`
	// Pool is the node's storage pool; nil when it did not answer.
	Pool *PoolStatus `json:"pool,omitempty"`
}

// LU health in LUHealth.Health.
const (
	// LUHealthy: every copy asked for is recorded in sync.
	LUHealthy = "healthy"
	// LUResyncing: every copy that is not in sync is being caught up.
	LUResyncing = "resyncing"
	// LUDegraded: a copy is out of sync, new or missing, and nothing is
	// catching it up yet (its node is away, or the rebuild has not begun).
	LUDegraded = "degraded"
)

// LUSummary counts LUs by health and names the ones that are not healthy.
type LUSummary struct {
	Total     int `json:"total"`
	Healthy   int `json:"healthy"`
	Resyncing int `json:"resyncing"`
	Degraded  int `json:"degraded"`
	// NotHealthy lists the LUs that are resyncing or degraded.
	NotHealthy []LUHealth `json:"not_healthy"`
}

// LUHealth is one LU's health and the copies behind it.
type LUHealth struct {
	Name     string    `json:"name"`
	Health   string    `json:"health"`
	Writer   string    `json:"writer"`
	Copies   int       `json:"copies"`
	Replicas []Replica `json:"replicas"`
}

// PoolSummary is the sum of the pools of the nodes that answered.
type PoolSummary struct {
	CapacityBytes    int64 `json:"capacity_bytes"`
	FreeBytes        int64 `json:"free_bytes"`
	AllocatedBytes   int64 `json:"allocated_bytes"`
	ProvisionedBytes int64 `json:"provisioned_bytes"`
	// Level is the worst level of any node (one full node fails the
	// writes of the LUs it holds).
	Level string `json:"level"`
	// NodesCounted is how many nodes' pools are in the sums.
	NodesCounted int `json:"nodes_counted"`
}
