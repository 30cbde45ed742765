"""The control plane: the orchestrator that chains the stages (later: leader election)."""
