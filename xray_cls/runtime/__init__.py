"""Layer 1, the runtime: what a command runs in.
May import: core.

- `configs`: where the Hydra configs are, and the resolvers they use;
- `console`: a quiet console, a user's mistake as one line, how a command on a checkpoint starts;
- `run_folder`: claiming an output folder before anything is written into it;
- `interrupts`: SIGINT and SIGTERM as one line saying what to do;
- `slurm`, `slurm_watcher`: the SLURM job a run belongs to, and a sweep's job states.
"""
