"""The preemption-safe trajectory log: durable, exactly-once tool calls that a resumed rollout replays.

The server side only: log backends, the step coordinator, export. The SDK's context manager
`dsec.trajectory("run-7/prompt-42/sample-3")` lives in `dsec.sdk.trajectory`; `dsec/__init__.py` makes this
package callable so that name keeps working once the package is imported.
"""
