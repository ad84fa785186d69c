"""Training (docs/design.md §4): the recipe's configuration, setup, rollouts, scoring, the step,
checkpoints, preemption and the collapse guard. Only the command layer imports the trainer."""
