"""TLS material for the orchestrator: certificates made here or obtained through certbot."""
