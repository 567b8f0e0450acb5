"""HTTP serving: the OpenAI-compatible Ray Serve ingress and its link to data-plane gateways."""
