"""Content-addressed image store: OCI/docker import and export, base images, build cache, registry pulls."""
