"""The dsec gRPC server: sandbox lifecycle, exec/sessions/files, and the image and trajectory services."""
