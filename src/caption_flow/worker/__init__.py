"""The GPU worker: connects, receives its job, captions leased chunks, resends until acked."""
