//! The control plane on Kubernetes: the node renews its own Lease and watches the placement map
//! ConfigMap the operator publishes (see docs/control-plane.md).
