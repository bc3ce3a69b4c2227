"""dsec: a self-hostable RL sandbox platform."""
