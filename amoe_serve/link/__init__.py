"""The link between the HTTP ingress and a data plane's gateway: one authenticated TCP socket,
length-prefixed JSON frames (`wire`), the messages those frames carry (`messages`: one frozen
dataclass each, and the protocol), the gateway's side (`server`, run by
`engine/serve_gateway.py`), the ingress's side (`client`), and what the ingress sees of a data
plane (`api`: `DataPlaneLink`, `GenEvent`, `ModelInfo`, `DataPlaneError`)."""
