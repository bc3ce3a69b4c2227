"""HTTP front door: E2B- and SandboxFusion-compatible APIs served as a gRPC client of the dsec API (docs/compat.md)."""
