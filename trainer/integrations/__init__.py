"""dsec inside other RL trainers: TRL (`trl_tools`) and SkyRL-gym (`skyrl_env`). Each module imports its trainer
lazily at use, so the rest of trainer/ never depends on them."""
