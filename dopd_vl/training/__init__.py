"""Training (docs/design.md §4): the recipe's configuration, setup, rollouts, scoring, the step,
checkpoints, preemption and the collapse guard. `setup_run` builds the `Run` every driver uses;
the step's parts are functions of it (step.py); the `Trainer` owns the loop's state."""
