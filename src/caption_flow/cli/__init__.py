"""The ``caption-flow`` command line: turns flags into config and wires components; no logic."""
