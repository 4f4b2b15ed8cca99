"""The vLLM tier: a real vLLM (CPU build) serving a tiny local model. Run with `make test-vllm`."""
