"""slinfer in Kubernetes: the API seam, the names and labels, the objects, the agent's publisher, the controller's
sync and leader election. The agent and the controller only wire these up."""
