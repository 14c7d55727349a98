"""The guest side: the agent kernel module's sources, the guest image builder, the init shim,
the scenarios and the mailbox decoder (package ``memtrace.guest``)."""
