"""Layer 5, training: fitting a run with Lightning's Trainer.
May import: core, runtime, data, metrics, models.

- `options`: loss.*, checkpoint.*, the trainer's (no torch import);
- `trainer`: the Trainer a run fits with, its callbacks and durable checkpoint writer;
- `losses`: the loss's class weights and smoothing, and the options that depend on the classes;
- `callbacks`, `fine_tuning`: the run's Lightning callbacks;
- `loggers`: the experiment trackers and curves.csv;
- `resume`, `training_state`: continuing an interrupted run, and the check of its checkpoint.
"""
