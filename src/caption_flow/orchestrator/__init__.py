"""The orchestrator: lists the dataset, leases chunks, makes results durable, serves monitors."""
