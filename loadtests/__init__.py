"""Load-test tooling for AMoE-serve (Locust workloads, SSE client, plotting)."""
