"""The dsec Python SDK: `Client`, `Sandbox`, `AsyncSandbox`."""
