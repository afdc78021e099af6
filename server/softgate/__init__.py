"""softgate: a gRPC loss service for GRPO-family LLM reinforcement learning."""

__version__ = "0.1.0"
