"""Floor 0, the base: one-line errors, atomic writes, environment paths, devices and AMP, several ranks, interrupts (SIGTERM), typed requests.

Imports nothing else of medimgen."""
