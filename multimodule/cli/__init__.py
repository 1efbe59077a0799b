"""Command-line entry points: ``mmctl`` (the operator's tool) and its IPC::Transit aliases."""
